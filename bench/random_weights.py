"""The real model's shapes without its weights: a model directory built from the hub's files
(config, remote code, processor, tokenizer; no weights) with RANDOM weights.

Speed and memory do not depend on the weights' values, so this measures the real code path
(the hub's remote modeling code, its image embedder, the processor's crops and token counts)
on a machine that cannot download the 8 GB of weights. ``layers`` keeps only the first N
language-model layers, for a smoke run on a CPU. The answers are gibberish.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

HUB_FILES = (
    "config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def build_random_weights_model(
    hub_files: Path, target: Path, *, device: str, dtype: torch.dtype, layers: int | None = None
) -> Path:
    """Write ``target``: the hub files' code, config, processor and tokenizer, and random
    weights made on ``device`` in ``dtype``, saved the way ``save_pretrained`` saves them, so
    the engine loads it exactly as the real model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    started = time.perf_counter()
    target.mkdir(parents=True, exist_ok=True)
    for path in hub_files.iterdir():  # the remote code and the processor/tokenizer files
        if path.suffix == ".py" or path.name in HUB_FILES:
            shutil.copy(path, target / path.name)
    config = AutoConfig.from_pretrained(target, trust_remote_code=True)
    if layers is not None:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=True, torch_dtype=dtype, attn_implementation="eager"
        )
    # As the hub's checkpoint: the image embedder's copy of the token embedding (the same
    # tensor, shared in memory) is not stored.
    state = {name: tensor for name, tensor in model.state_dict().items() if not name.endswith(".wte.weight")}
    model.save_pretrained(target, state_dict=state)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    log.info(
        "random weights: %.2fB parameters (%d layers) written to %s in %.0f s",
        parameters / 1e9,
        config.num_hidden_layers,
        target,
        time.perf_counter() - started,
    )
    return target
