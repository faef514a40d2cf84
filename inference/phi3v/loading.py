"""Loading a Phi-3-vision checkpoint (hub id or local directory) with the native classes.

transformers' own ``from_pretrained`` does the work: the hub cache, ``revision``, offline mode,
one file or a sharded index, the hub's download bars, any stored dtype. The checkpoint must
match the model exactly: a missing, unexpected or misshapen weight is an error, not a model
with random parts.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from .config import Phi3VConfig
from .modeling import Phi3VForCausalLM
from .processing import Phi3VProcessor

__all__ = ["CheckpointMismatch", "load_phi3v", "register"]


class CheckpointMismatch(ValueError):
    """The checkpoint's weights do not fit the model its config describes (one line)."""


def register() -> None:
    """Let ``AutoConfig``/``AutoModelForCausalLM`` (and ``AutoTokenizer``'s config lookup) know
    ``phi3_v`` without the hub's code."""
    AutoConfig.register(Phi3VConfig.model_type, Phi3VConfig, exist_ok=True)
    AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)


class _DropLoadReport(logging.Filter):
    """transformers logs a table of mismatched keys; ``load_phi3v`` raises one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextmanager
def _without_load_report() -> Iterator[None]:
    logger = logging.getLogger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    logger.addFilter(report_filter)
    try:
        yield
    finally:
        logger.removeFilter(report_filter)


def _describe(kind: str, keys: Any) -> str:
    keys = sorted(str(key if isinstance(key, str) else key[0]) for key in keys)
    shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    return f"{len(keys)} {kind} ({shown})"


def load_phi3v(
    source: str,
    *,
    revision: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attention: str = "sdpa",
    quantization: Any = None,
) -> tuple[Phi3VForCausalLM, Phi3VProcessor]:
    """The model (eval mode, on ``device``, in ``dtype``) and its processor.

    ``quantization``: a transformers quantization config (``BitsAndBytesConfig``), or None.

    Raises what transformers raises for a missing checkpoint or file (``OSError``), and
    ``CheckpointMismatch`` when the weights do not match the config.
    """
    register()
    device = torch.device(device)
    config = Phi3VConfig.from_pretrained(source, revision=revision)
    processor = Phi3VProcessor.from_pretrained(source, revision=revision)
    with _without_load_report():
        model, info = Phi3VForCausalLM.from_pretrained(
            source,
            config=config,
            revision=revision,
            dtype=dtype,
            attn_implementation=attention,
            quantization_config=quantization,
            # Straight onto the GPU: no full copy of the weights in CPU memory first.
            device_map={"": device} if device.type == "cuda" else None,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below as one line, the model not kept
        )
    problems = [
        _describe(kind, info.get(name) or ())
        for name, kind in (
            ("missing_keys", "missing weight(s)"),
            ("unexpected_keys", "unexpected weight(s)"),
            ("mismatched_keys", "weight(s) of the wrong shape"),
        )
        if info.get(name)
    ]
    if problems:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise CheckpointMismatch("the checkpoint does not match its config.json: " + "; ".join(problems))
    model.to(device)
    model.eval()
    return model, processor
