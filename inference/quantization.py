"""QUANTIZE: the language model's linear layers in bitsandbytes int8 (``8bit``) or nf4 (``4bit``).

Only the language model's linear layers are quantized: the vision tower, the image
projection, the token embeddings and ``lm_head`` stay in the model's dtype (they are small,
and the image features and the logits are where precision shows). transformers'
``BitsAndBytesConfig`` does the work at load time; this module chooses its settings, checks
that bitsandbytes is installed and runs on the device (one ``ModelLoadError`` line if not),
and keeps a normal run's log free of bitsandbytes' per-call notes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from .engine import ModelLoadError
from .settings import QUANTIZE_CHOICES

__all__ = [
    "GENERIC_KEPT",
    "PHI3V_KEPT",
    "QUANTIZE_CHOICES",
    "compile_refusal",
    "describe",
    "is_quantized_linear",
    "quantization_config",
    "quiet_bitsandbytes",
]

log = logging.getLogger(__name__)

# Module names (prefixes) kept in the model's dtype on the native Phi-3-vision model.
PHI3V_KEPT = ("model.vision_embed_tokens", "model.embed_tokens", "lm_head")
# The same on the generic path, as patterns transformers matches from the start of a name:
# the vision towers, projectors and connectors of transformers' vision-language models.
GENERIC_KEPT = (
    r"(?:.*\.)?(?:vision_tower|vision_model|visual|vision_embed_tokens|image_encoder)",
    r"(?:.*\.)?(?:multi_modal_projector|mm_projector|connector|merger|image_newline)",
    r"(?:.*\.)?embed_tokens",
    "lm_head",
)
INSTALL_HINT = "install it with pip install -e '.[quant]', or set QUANTIZE=none"


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


_QUIET = {
    # The optional `kernels` package fetches a faster CPU 4-bit kernel from the hub; without it
    # bitsandbytes uses its own, which is what a run offline gets anyway.
    "bitsandbytes.backends.cpu.ops": _DropMessages("Failed to load CPU gemm_4bit_forward"),
    # LLM.int8 quantizes its inputs from float16 by design: a note on every matmul, not a fault.
    "bitsandbytes.autograd._functions": _DropMessages("MatMul8bitLt: inputs will be cast"),
}


def quiet_bitsandbytes() -> None:
    """Drop bitsandbytes' two notes that say nothing an operator can act on (idempotent)."""
    for name, quiet in _QUIET.items():
        logger = logging.getLogger(name)
        if quiet not in logger.filters:
            logger.addFilter(quiet)


def _bitsandbytes(setting: str, device: torch.device) -> Any:
    """bitsandbytes, imported and able to run on ``device``, or one ModelLoadError line."""
    quiet_bitsandbytes()
    try:
        import bitsandbytes
    except ImportError as error:
        raise ModelLoadError(
            f"QUANTIZE={setting} needs bitsandbytes, which is not installed: {INSTALL_HINT}"
        ) from error
    except Exception as error:  # a broken build raises what it likes at import
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise ModelLoadError(
            f"QUANTIZE={setting}: bitsandbytes does not import ({reason}); {INSTALL_HINT}"
        ) from error
    supported = getattr(bitsandbytes, "supported_torch_devices", {"cpu", "cuda"})
    if device.type not in supported:
        raise ModelLoadError(
            f"QUANTIZE={setting}: bitsandbytes does not run on {device.type} (it runs on "
            f"{', '.join(sorted(supported))}); set QUANTIZE=none"
        )
    if device.type == "cuda":
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

        if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
            raise ModelLoadError(
                f"QUANTIZE={setting}: bitsandbytes found no CUDA library for this GPU and torch "
                f"(torch CUDA {torch.version.cuda}); reinstall bitsandbytes for it, or set QUANTIZE=none"
            )
    return bitsandbytes


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """What the quantized layers compute in: bf16 on CUDA (fp16 if the model is in fp16, for
    GPUs without bf16), the model's dtype elsewhere."""
    if device.type == "cuda":
        return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    return dtype


def quantization_config(setting: str, device: torch.device, dtype: torch.dtype, kept: Sequence[str]) -> Any:
    """transformers' ``BitsAndBytesConfig`` for QUANTIZE=``setting`` (None for ``none``),
    leaving the modules named by ``kept`` in the model's dtype."""
    if setting == "none":
        return None
    if setting not in QUANTIZE_CHOICES:
        raise ModelLoadError(f"QUANTIZE must be one of {', '.join(QUANTIZE_CHOICES)}; got {setting!r}")
    _bitsandbytes(setting, device)
    from transformers import BitsAndBytesConfig

    if setting == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(kept))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype(device, dtype),
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=list(kept),
    )


def compile_refusal(setting: str, device_type: str) -> str | None:
    """Why the decode step must not be compiled with these weights on this device (None: it
    may; a compile that fails anyway falls back to eager decoding at the warm-up)."""
    if setting == "8bit" and device_type == "cuda":
        return (
            "int8 layers (QUANTIZE=8bit) choose their outlier columns at every step, "
            "which CUDA graphs cannot replay"
        )
    return None


def is_quantized_linear(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes int8 or 4-bit linear layer."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


def describe(setting: str) -> str:
    """For the load log line: what the weights are stored in."""
    return {"8bit": "int8 weights", "4bit": "nf4 weights"}.get(setting, "")
