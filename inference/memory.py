"""What the model's memory costs (weight bytes as loaded, KV-cache bytes per token) and what the
device has free.

The KV cache holds, per token, a key and a value vector per layer and per key/value head:
``layers x 2 x kv_heads x head_dim x dtype size`` (Phi-3-vision in bf16: 384 KiB a token).
"""

from __future__ import annotations

from typing import Any

import torch


def kv_geometry(config: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a (Phi-3-style) language model config, or of a VLM
    config's text part."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    return int(text.num_hidden_layers), kv_heads, head_dim


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """KV-cache bytes one token costs for a (Phi-3-style) language model config."""
    layers, kv_heads, head_dim = kv_geometry(config)
    return layers * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the loaded model's parameters and buffers take (quantized layers as stored)."""
    tensors = [*model.parameters(), *model.buffers()]
    total = sum(t.numel() * t.element_size() for t in tensors)
    # bitsandbytes keeps each layer's scales beside its weights (nf4: absmax; int8: SCB).
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        for scales in (getattr(state, "absmax", None), getattr(weight, "SCB", None)):
            if isinstance(scales, torch.Tensor):
                total += scales.numel() * scales.element_size()
    return total


def device_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of ``device`` as its driver reports them (other processes, the
    CUDA context and torch's cached blocks count as in use); None where there is no such
    figure (the CPU). The one figure MAX_BATCH_TOKENS=auto is sized from."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def cache_budget_tokens(free: int, total: int, fraction: float, per_token: int) -> int:
    """Tokens a KV cache may hold in ``fraction`` of ``total`` less what is in use."""
    in_use = total - free
    return max(0, (int(fraction * total) - in_use) // per_token)


def is_out_of_memory(error: BaseException) -> bool:
    """A device allocation failed (torch's OutOfMemoryError, or a kernel saying so)."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
