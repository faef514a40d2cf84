"""Loading a Phi-3-vision model and its processor onto the chosen device.

Runs on the engine's worker thread: loading takes minutes for the real model and must not
block the event loop.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import torch

from .engine import ModelLoadError
from .settings import InferenceSettings

__all__ = ["LoadedModel", "ModelLoadError", "load_model"]

log = logging.getLogger(__name__)

END_OF_TURN_TOKEN = "<|end|>"


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    device: torch.device
    dtype: torch.dtype
    attention: str
    # The model ends a turn with <|end|>; the tokenizer's eos is <|endoftext|>. Stop on both.
    stop_token_ids: list[int]

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.warning("no CUDA GPU found: running on the CPU, which is very slow for this model")
        return torch.device("cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"DEVICE={setting} but torch sees no CUDA GPU")
    return device


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        # bf16 halves memory on GPUs; CPUs are slow and often wrong in half precision.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, setting)


def choose_attention(device: torch.device) -> str:
    """flash_attention_2 when it can run, else eager: the model declares no sdpa support."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        try:
            import flash_attn  # noqa: F401
        except Exception as error:  # a broken build must not stop the bot
            log.warning("flash-attn is installed but does not import (%s); using eager", error)
            return "eager"
        return "flash_attention_2"
    return "eager"


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def stop_token_ids(tokenizer: Any) -> list[int]:
    ids: list[int] = []
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
    if isinstance(end_id, int) and end_id != tokenizer.unk_token_id:
        ids.append(end_id)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def load_model(settings: InferenceSettings) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoProcessor

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    attention = choose_attention(device)
    source = settings.model_id
    log.info("loading %s on %s (%s, %s attention)", source, device, dtype, attention)
    common: dict[str, Any] = {"trust_remote_code": True, "revision": settings.model_revision}
    try:
        processor = AutoProcessor.from_pretrained(source, **common)
        model = AutoModelForCausalLM.from_pretrained(
            source,
            torch_dtype=dtype,
            _attn_implementation=attention,
            # Straight onto the GPU: no full copy of the weights in CPU memory first.
            device_map={"": device} if device.type == "cuda" else None,
            **common,
        )
    except (OSError, ValueError, ImportError, KeyError) as error:
        raise ModelLoadError(f"cannot load model {source!r}: {_first_line(error)}") from error
    if device.type != "cuda":
        model.to(device)
    model.eval()
    stops = stop_token_ids(processor.tokenizer)
    log.info("model ready: %s, stop tokens %s", type(model).__name__, stops)
    return LoadedModel(model, processor, device, dtype, attention, stops)
