"""Configuration of the tiny Phi-3-vision stand-in used by the tests.

This file is remote code: the builder copies it into the model directory and transformers
imports it from ``$HF_HOME/modules`` when the directory is loaded with
``trust_remote_code=True``. It may import only torch, transformers, PIL, numpy and the
standard library, and its siblings only through relative imports.
"""

from __future__ import annotations

from transformers import Phi3Config


class TinyPhi3VConfig(Phi3Config):
    """A transformers ``Phi3Config`` plus the few fields of the tiny image embedder.

    The text part is an ordinary Phi-3 configuration, so a native ``Phi3ForCausalLM`` can be
    built from the same values and share the weights.

    Extra fields:
        image_dim_out: width of the stand-in image encoder's features.
        crop_size: side in pixels of one image crop (the real model uses 336).
        tokens_per_crop: image tokens per crop (the real model uses 144).
        script: scripted replies, a list of ``{"when", "reply", "seconds_per_token",
            "after_end"}`` rules (see ``modeling_tiny_phi3_v``).
    """

    model_type = "tiny_phi3_v"

    def __init__(
        self,
        image_dim_out: int = 16,
        crop_size: int = 16,
        tokens_per_crop: int = 2,
        script: list[dict] | None = None,
        **kwargs,
    ) -> None:
        self.image_dim_out = image_dim_out
        self.crop_size = crop_size
        self.tokens_per_crop = tokens_per_crop
        self.script = [dict(rule) for rule in (script or [])]
        super().__init__(**kwargs)
