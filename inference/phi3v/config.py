"""Phi-3-vision's configuration: the hub's ``config.json`` read as it is, on transformers' Phi-3.

The language model is Phi-3-mini (``Phi3Config``); ``embd_layer`` and ``img_processor`` carry
the hub's image-embedding settings. ``vision_config`` (a ``CLIPVisionConfig``) is the vision
tower's shape: the hub checkpoints have none and get CLIP ViT-L/14-336, the shape the hub code
hard-codes; small test models carry their own. The hub's rope scaling ``su`` is transformers'
``longrope``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig, Phi3Config
from transformers.configuration_utils import SubConfigSpec

__all__ = ["CLIP_VIT_L_14_336", "Phi3VConfig"]

# The vision tower of every Phi-3-vision checkpoint on the hub (openai/clip-vit-large-patch14-336).
CLIP_VIT_L_14_336: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-5,
}
_HUB_ROPE_NAMES = ("su", "longrope")


@strict
class Phi3VConfig(Phi3Config):
    """``Phi3Config`` plus the image embedding (``embd_layer``, ``img_processor``, ``vision_config``)."""

    model_type = "phi3_v"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "vision_config": SubConfigSpec(config_class=CLIPVisionConfig, init_kwargs=CLIP_VIT_L_14_336),
    }

    embd_layer: dict | None = None
    img_processor: dict | None = None
    vision_config: dict | CLIPVisionConfig | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        # The hub's config.json names the attention its authors ran (flash_attention_2); the
        # loader chooses what this machine has.
        kwargs.pop("_attn_implementation", None)
        super().__post_init__(**kwargs)
        if self.img_processor is not None:
            # The projection reads the vision tower's width, whatever the hub config says.
            self.img_processor = {**self.img_processor, "image_dim_out": self.vision_config.hidden_size}

    def convert_rope_params_to_dict(
        self, default_theta: int | float = 10_000.0, ignore_keys: set | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        rope = kwargs.get("rope_scaling")
        if isinstance(rope, dict) and (rope.get("type") in _HUB_ROPE_NAMES or rope.get("rope_type") == "su"):
            rope = {key: value for key, value in rope.items() if key != "type"}
            rope["rope_type"] = "longrope"
            # Same number transformers derives from the two lengths; given, it spares a warning.
            original = kwargs.get("original_max_position_embeddings", self.original_max_position_embeddings)
            rope.setdefault("factor", max(1.0, self.max_position_embeddings / original))
            kwargs["rope_scaling"] = rope
        return super().convert_rope_params_to_dict(default_theta, ignore_keys, **kwargs)

    @property
    def tokens_per_crop_side(self) -> int:
        """Image features per side of one crop after the 2x2 merge (12 for ViT-L/14-336)."""
        return self.vision_config.image_size // self.vision_config.patch_size // 2
