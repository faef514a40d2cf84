"""Phi-3-vision on transformers' own building blocks: CLIP's vision tower, Phi-3's language model.

The checkpoint keys are the hub's: the language model under ``model.*`` and ``lm_head`` with
transformers' Phi-3 names, the image embedding under ``model.vision_embed_tokens.*``
(``img_processor`` is a ``CLIPVisionModel``, ``glb_GN``, ``sub_GN``, ``img_projection.{0,2}``).
The token embedding is stored once, as ``model.embed_tokens``.

What the image embedding computes (the hub's ``sub_glb`` HD layout): CLIP's second-to-last
hidden states without CLS; 2x2 neighbouring patches merged into one feature (24x24x1024 ->
12x12x4096 for ViT-L/14-336); the crops of an image tiled to (h*12, w*12) with ``sub_GN`` at
the end of every row; then ``glb_GN``; then the global view, 12 rows of 12 + ``sub_GN``; all
of it through the projection (Linear, GELU, Linear). Prompt positions with id < 0 take these
features in order.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers import CLIPVisionModel, GenerationMixin, Phi3ForCausalLM, Phi3Model
from transformers import initialization as init
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.phi3.modeling_phi3 import Phi3PreTrainedModel, Phi3RotaryEmbedding

from .config import Phi3VConfig

__all__ = ["LongRopeRotaryEmbedding", "Phi3VForCausalLM", "Phi3VImageEmbedding", "Phi3VModel"]


class LongRopeRotaryEmbedding(Phi3RotaryEmbedding):
    """LongRoPE chosen per row, without data-dependent control flow.

    Both frequency vectors are made up front; each forward picks, for every row, the long one
    when that row's largest position + 1 exceeds ``original_max_position_embeddings``
    (``torch.where``, so CUDA graphs and a fullgraph compile hold). transformers' longrope and
    the hub code make that test over the whole batch; per row, a row's numbers never depend on
    which rows share its batch. For one row they are transformers' numbers exactly. Without
    longrope scaling both vectors are the plain RoPE frequencies.

    ``as_of(x, position_ids, length)``: rows choose as if they reached ``length`` positions: a
    chunk of a long prompt gets the factors one forward over the whole prompt would
    (``generate``'s); the engine's runner calls it so.
    """

    def __init__(self, config: Phi3VConfig) -> None:
        super().__init__(config)  # inv_freq: the short factors (or plain RoPE)
        self.original_max_position_embeddings = int(
            config.rope_parameters.get("original_max_position_embeddings")
            or config.original_max_position_embeddings
        )
        self.long_inv_freq = nn.Buffer(self._frequencies(long=True), persistent=False)

    def _frequencies(self, *, long: bool) -> torch.Tensor:
        if self.rope_type != "longrope":
            return self.compute_default_rope_parameters(self.config)[0]
        seq_len = self.original_max_position_embeddings + 1 if long else None
        return ROPE_INIT_FUNCTIONS["longrope"](self.config, None, seq_len=seq_len)[0]

    def reset_frequencies(self) -> None:
        """Recompute the (non-persistent) buffers: from_pretrained builds them on the meta device."""
        short = self._frequencies(long=False)
        init.copy_(self.inv_freq, short)
        init.copy_(self.original_inv_freq, short)
        init.copy_(self.long_inv_freq, self._frequencies(long=True))

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.as_of(x, position_ids)

    @torch.no_grad()
    def as_of(
        self, x: torch.Tensor, position_ids: torch.Tensor, length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for ``position_ids`` (rows x positions); ``length``: each row chooses as
        if it reached that many positions (see the class docstring)."""
        longest = position_ids.amax(dim=-1, keepdim=True) + 1  # (rows, 1): each row's own
        if length is not None:
            longest = longest.clamp(min=length)
        inv_freq = torch.where(
            longest > self.original_max_position_embeddings,
            self.long_inv_freq.to(device=x.device, dtype=torch.float)[None, :],
            self.inv_freq.to(device=x.device, dtype=torch.float)[None, :],
        )  # (rows, dim / 2)
        # The same operations as Phi3RotaryEmbedding.forward from here on.
        freqs = position_ids[..., None].float() * inv_freq[:, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


class Phi3VImageEmbedding(nn.Module):
    """The vision tower, the HD feature layout and the projection into the language model."""

    def __init__(self, config: Phi3VConfig) -> None:
        super().__init__()
        vision = config.vision_config
        settings = {**(config.img_processor or {}), **(config.embd_layer or {})}
        order = settings.get("hd_transform_order", "sub_glb")
        if order != "sub_glb" or settings.get("type_feature", "patch") != "patch":
            raise ValueError(
                f"unsupported Phi-3-vision image layout: {order}, {settings.get('type_feature')}"
            )
        layer_idx = int(settings.get("layer_idx", -2))
        # The features are hidden_states[layer_idx]: the CLIP layers after it never count (the
        # hub runs them all; vLLM builds the tower without them).
        self.layers_used = layer_idx if layer_idx >= 0 else vision.num_hidden_layers + 1 + layer_idx
        if not 0 <= self.layers_used <= vision.num_hidden_layers:
            raise ValueError(
                f"layer_idx {layer_idx} is outside the vision tower's {vision.num_hidden_layers} layers"
            )
        self.side = vision.image_size // vision.patch_size  # patches per crop side (24)
        if self.side % 2:
            raise ValueError(f"the vision tower's {self.side}x{self.side} patches cannot be merged 2x2")
        self.crop_size = vision.image_size
        merged = vision.hidden_size * 4
        self.img_processor = CLIPVisionModel(vision)
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, merged))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, merged))
        self.img_projection = nn.Sequential(
            nn.Linear(merged, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )

    def _merge_2x2(self, features: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        """(rows*columns crops, side*side, C) -> (rows*side/2, columns*side/2, 4C), crops row-major."""
        half = self.side // 2
        channels = features.shape[-1]
        return (
            features.reshape(rows, columns, half, 2, half, 2, channels)
            .permute(0, 2, 1, 4, 3, 5, 6)  # rows, half, columns, half, 2, 2, C
            .reshape(rows * half, columns * half, 4 * channels)
        )

    def _with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        """(H, W, D) -> (H * (W + 1), D): ``sub_GN`` closes every row."""
        newline = self.sub_GN.reshape(1, 1, -1).expand(grid.shape[0], 1, -1).to(grid.dtype)
        return torch.cat([grid, newline], dim=1).reshape(-1, grid.shape[-1])

    def _clip_features(self, crops: torch.Tensor) -> torch.Tensor:
        """CLIP's hidden states after ``layers_used`` layers (its ``hidden_states[layer_idx]``)."""
        tower = self.img_processor
        hidden = tower.pre_layrnorm(tower.embeddings(crops))
        for layer in tower.encoder.layers[: self.layers_used]:
            hidden = layer(hidden, None)
        return hidden

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | list) -> torch.Tensor:
        """(images, crops + 1, 3, S, S) and (images, 2) padded H x W -> (image tokens, hidden)."""
        sizes = [(int(h), int(w)) for h, w in torch.as_tensor(image_sizes).reshape(-1, 2).tolist()]
        grids = [(h // self.crop_size, w // self.crop_size) for h, w in sizes]
        # Only the crops an image uses go through CLIP: the global view and its h*w tiles, the
        # first of its slots (slices: one image's are a view, an index gather copies slowly).
        used = [pixel_values[i, : 1 + rows * columns] for i, (rows, columns) in enumerate(grids)]
        tower_dtype = self.img_processor.embeddings.patch_embedding.weight.dtype
        crops = (used[0] if len(used) == 1 else torch.cat(used)).to(tower_dtype)
        hidden = self._clip_features(crops)
        patches = hidden[:, 1:]  # no CLS
        pieces: list[torch.Tensor] = []
        start = 0
        glb = self.glb_GN.reshape(1, -1)
        for rows, columns in grids:
            global_view = self._with_newlines(self._merge_2x2(patches[start : start + 1], 1, 1))
            tiles = patches[start + 1 : start + 1 + rows * columns]
            pieces += [
                self._with_newlines(self._merge_2x2(tiles, rows, columns)),
                glb.to(tiles.dtype),
                global_view,
            ]
            start += 1 + rows * columns
        projection = self.img_projection[0].weight
        return self.img_projection(torch.cat(pieces).to(device=projection.device, dtype=projection.dtype))


class Phi3VModel(Phi3Model):
    """transformers' ``Phi3Model`` holding the image embedding, with LongRoPE per row."""

    config_class = Phi3VConfig

    def __init__(self, config: Phi3VConfig) -> None:
        super().__init__(config)
        self.vision_embed_tokens = Phi3VImageEmbedding(config)
        self.rotary_emb = LongRopeRotaryEmbedding(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, LongRopeRotaryEmbedding):
            module.reset_frequencies()
        elif isinstance(module, Phi3VImageEmbedding):
            init.zeros_(module.glb_GN)
            init.zeros_(module.sub_GN)
        else:
            super()._init_weights(module)


class Phi3VForCausalLM(Phi3ForCausalLM):
    """Phi-3-vision: ``Phi3ForCausalLM`` whose prompt embedding takes images.

    ``forward``/``generate`` take the processor's ``input_ids``, ``pixel_values`` and
    ``image_sizes``; the images go in only while the cache is empty (the first step).
    ``embed_prompt`` is the same embedding for callers that drive ``model.model`` themselves.
    """

    config_class = Phi3VConfig
    # Written by the hub code when it saves (its image embedding holds the token embedding too).
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [r"model\.vision_embed_tokens\.wte\.weight"]

    def __init__(self, config: Phi3VConfig) -> None:
        # Phi3ForCausalLM.__init__ less its Phi3Model: building the language model twice costs
        # gigabytes at the real size.
        Phi3PreTrainedModel.__init__(self, config)
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def embed_prompt(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | list | None = None,
    ) -> torch.Tensor:
        """(rows, seq) ids -> (rows, seq, hidden) embeddings; ids < 0 take the image features.

        The images are those of all rows, in row order, each row's tags numbered from 1 (the
        processor's layout); padding (ids >= 0) may be on either side. ``input_ids`` is not
        changed.
        """
        embeds = self.model.embed_tokens(input_ids.clamp(min=0))
        if pixel_values is None:
            return embeds
        if image_sizes is None:
            raise ValueError("pixel_values without image_sizes")
        features = self.model.vision_embed_tokens(pixel_values, image_sizes)
        image_positions = input_ids < 0
        slots = int(image_positions.sum())
        if slots != features.shape[0]:
            raise ValueError(
                f"the prompt has {slots} image positions but its {len(pixel_values)} image(s) make "
                f"{features.shape[0]} features"
            )
        return embeds.masked_scatter(image_positions[..., None], features.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if inputs_embeds is None and input_ids is not None:
            if pixel_values is None and input_ids.shape[-1] > 1 and bool((input_ids < 0).any()):
                raise ValueError("the prompt has image positions (ids < 0) but no pixel_values were given")
            inputs_embeds = self.embed_prompt(input_ids, pixel_values, image_sizes)
        return super().forward(
            input_ids=None,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: Any = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        # GenerationMixin's own (it passes pixel_values/image_sizes on the first step only), not
        # Phi3ForCausalLM's, which drops the cache when a generation crosses the LongRoPE switch:
        # the hub model keeps it, and so do rows decoded by the engine.
        return GenerationMixin.prepare_inputs_for_generation(
            self,
            input_ids,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            **kwargs,
        )
