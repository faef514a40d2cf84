"""A tiny Phi-3-vision look-alike, built offline for tests.

``build_tiny_model(directory, script=...)`` writes a model directory that loads through the
same code path as the hub model (``AutoProcessor`` / ``AutoModelForCausalLM`` with
``trust_remote_code=True``). The remote-code modules here (``configuration_*``,
``modeling_*``, ``image_processing_*``, ``processing_*``) are copied into that directory;
they import only torch, transformers, PIL, numpy and the standard library.
"""

from .builder import (
    REMOTE_CODE_FILES,
    build_tiny_model,
    build_tokenizer,
    copy_with_load_gate,
    copy_with_longrope,
)
from .image_processing_tiny_phi3_v import num_image_tokens
from .modeling_tiny_phi3_v import DEFAULT_AFTER_END

# Scripted-reply rules used when a test does not pass its own (none: random weights).
DEFAULT_SCRIPT: list[dict] = []

__all__ = [
    "DEFAULT_AFTER_END",
    "DEFAULT_SCRIPT",
    "REMOTE_CODE_FILES",
    "build_tiny_model",
    "build_tokenizer",
    "copy_with_load_gate",
    "copy_with_longrope",
    "num_image_tokens",
]
