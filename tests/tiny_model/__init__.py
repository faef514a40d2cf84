"""Tiny native Phi-3-vision checkpoints, built offline for tests (see ``builder``).

``build_tiny_model(directory, ...)`` writes the hub's file layout (no Python code in it); the
project loads it with ``inference.loading.load_model`` like any user's checkpoint.
"""

from .builder import (
    NUM_CROPS,
    build_tiny_model,
    build_tokenizer,
    copy_with_load_gate,
    copy_with_longrope,
    hub_state_dict,
    image_shapes,
    num_image_tokens,
    save_hub_weights,
    wait_for_load_gate,
)

__all__ = [
    "NUM_CROPS",
    "build_tiny_model",
    "build_tokenizer",
    "copy_with_load_gate",
    "copy_with_longrope",
    "hub_state_dict",
    "image_shapes",
    "num_image_tokens",
    "save_hub_weights",
    "wait_for_load_gate",
]
