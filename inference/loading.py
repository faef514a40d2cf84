"""Loading the model and its processor onto the chosen device.

A Phi-3-vision checkpoint (``model_type: phi3_v``) loads with the project's own native classes
(``inference.phi3v``): no code from the hub runs. Any other model goes to the generic path
(``inference.generic``). Either way a checkpoint that cannot be loaded is one ``ModelLoadError``
line that says what is wrong and what to do, and nothing stays half-loaded.

Runs on the engine's worker thread: loading takes minutes for the real model and must not
block the event loop.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .engine import ModelLoadError
from .settings import InferenceSettings

__all__ = ["LoadedModel", "ModelLoadError", "is_phi3v", "load_model"]

log = logging.getLogger(__name__)

END_OF_TURN_TOKEN = "<|end|>"
PHI3V_MODEL_TYPE = "phi3_v"


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    device: torch.device
    dtype: torch.dtype
    attention: str
    # The model ends a turn with <|end|>; the tokenizer's eos is <|endoftext|>. Stop on both.
    stop_token_ids: list[int]
    # "phi3v": inference.phi3v's native model and processor; "generic": inference.generic's.
    kind: str = "phi3v"

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


def choose_attention(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """flash_attention_2 when it can run (CUDA, half precision, flash-attn imports), else sdpa."""
    half = dtype in (torch.bfloat16, torch.float16)
    if device.type == "cuda" and half and importlib.util.find_spec("flash_attn") is not None:
        try:
            import flash_attn  # noqa: F401
        except Exception as error:  # a broken build must not stop the bot
            log.warning("flash-attn is installed but does not import (%s); using sdpa", error)
            return "sdpa"
        return "flash_attention_2"
    return "sdpa"


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


def is_phi3v(config: dict[str, Any]) -> bool:
    """Whether a checkpoint's config.json (as a dict) is a Phi-3-vision model."""
    return config.get("model_type") == PHI3V_MODEL_TYPE


def _config_dict(source: str, revision: str | None) -> dict[str, Any]:
    """The checkpoint's config.json, read without resolving any class or running any code."""
    from transformers import PretrainedConfig

    what_to_do = "set MODEL_ID to a hub model id or a local model directory"
    if _looks_like_a_path(source) and not Path(source).is_dir():
        raise ModelLoadError(f"cannot load model {source!r}: no such directory ({what_to_do})")
    try:
        config, _ = PretrainedConfig.get_config_dict(source, revision=revision)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load model {source!r}: {_first_line(error)} ({what_to_do})") from error
    return config


def _looks_like_a_path(source: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else that names a place is a directory."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or os.sep in source.replace("/", "")


def _load_phi3v(settings: InferenceSettings, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from .phi3v import CheckpointMismatch, load_phi3v
    from .quantization import PHI3V_KEPT, describe, quantization_config

    source = settings.model_id
    attention = choose_attention(device, dtype)
    quantization = quantization_config(settings.quantize, device, dtype, PHI3V_KEPT)
    weights = f", {describe(settings.quantize)}" if quantization is not None else ""
    log.info("loading %s on %s (%s, %s attention%s)", source, device, dtype, attention, weights)
    try:
        model, processor = load_phi3v(
            source,
            revision=settings.model_revision,
            device=device,
            dtype=dtype,
            attention=attention,
            quantization=quantization,
        )
    except CheckpointMismatch as error:
        raise ModelLoadError(
            f"cannot load model {source!r}: {error} (use the checkpoint's own config.json and weights)"
        ) from error
    except OSError as error:
        raise ModelLoadError(
            f"cannot load model {source!r}: {_first_line(error)} "
            "(a model directory needs config.json, tokenizer.json, preprocessor_config.json and its "
            "safetensors weights)"
        ) from error
    except (ValueError, KeyError, TypeError, RuntimeError, ImportError) as error:
        raise ModelLoadError(f"cannot load model {source!r}: {_first_line(error)}") from error
    stops = stop_token_ids(processor.tokenizer)
    log.info("model ready: %s, stop tokens %s", type(model).__name__, stops)
    return LoadedModel(model, processor, device, dtype, attention, stops, kind="phi3v")


def load_model(settings: InferenceSettings) -> LoadedModel:
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    config = _config_dict(settings.model_id, settings.model_revision)
    if is_phi3v(config):
        return _load_phi3v(settings, device, dtype)
    from .generic import load_generic  # imports this module: imported here, not at the top

    return load_generic(settings, device, dtype)
