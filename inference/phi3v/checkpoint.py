"""Writing a Phi-3-vision model as the hub stores it: its key names, safetensors, shards + index.

transformers' ``save_pretrained`` writes this model's CLIP weights without the
``vision_model.`` part of their names (it maps them back when loading); the hub checkpoint
has it, and so do the files written here, which load like the hub's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from torch import nn

__all__ = ["hub_state_dict", "save_hub_checkpoint"]

_CLIP = ".img_processor."


def hub_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights under the hub checkpoint's names (CLIP under ``img_processor.vision_model``)."""
    return {
        key.replace(_CLIP, _CLIP + "vision_model.", 1): tensor.detach().contiguous()
        for key, tensor in model.state_dict().items()
    }


def save_hub_checkpoint(
    state_dict: dict[str, torch.Tensor], directory: Path, *, max_shard_size: int | str = "5GB"
) -> list[str]:
    """``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` and
    ``model.safetensors.index.json`` when the weights are larger than ``max_shard_size``.
    Returns the file names written."""
    directory = Path(directory)
    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({key: state_dict[key] for key in keys}, directory / filename, metadata={"format": "pt"})
    if split.is_sharded:
        total = sum(tensor.numel() * tensor.element_size() for tensor in state_dict.values())
        index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return list(split.filename_to_tensors)
