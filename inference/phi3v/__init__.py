"""Phi-3-vision natively on transformers: configuration, processor, model and loading.

No code from the hub runs: the hub checkpoint's ``config.json`` (``model_type: phi3_v``),
``tokenizer.json``, ``preprocessor_config.json`` and safetensors are read as they are.
"""

from .checkpoint import hub_state_dict, save_hub_checkpoint
from .config import Phi3VConfig
from .loading import CheckpointMismatch, load_phi3v, register
from .modeling import LongRopeRotaryEmbedding, Phi3VForCausalLM, Phi3VImageEmbedding, Phi3VModel
from .processing import Phi3VImageProcessor, Phi3VProcessor, hd_size, num_image_tokens

register()

__all__ = [
    "CheckpointMismatch",
    "LongRopeRotaryEmbedding",
    "Phi3VConfig",
    "Phi3VForCausalLM",
    "Phi3VImageEmbedding",
    "Phi3VImageProcessor",
    "Phi3VModel",
    "Phi3VProcessor",
    "hd_size",
    "hub_state_dict",
    "load_phi3v",
    "num_image_tokens",
    "register",
    "save_hub_checkpoint",
]
