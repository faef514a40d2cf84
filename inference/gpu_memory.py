"""GPU memory this process holds, for the bot's metrics (without importing torch for it)."""

from __future__ import annotations

import sys


def gpu_memory_bytes() -> dict[str, int]:
    """Bytes "allocated" (tensors) and "reserved" (torch's cache) on every CUDA device; zeros
    when torch is not loaded (the openai engine) or CUDA was never used."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return {"allocated": 0, "reserved": 0}
    devices = range(torch.cuda.device_count())
    return {
        "allocated": sum(torch.cuda.memory_allocated(d) for d in devices),
        "reserved": sum(torch.cuda.memory_reserved(d) for d in devices),
    }
