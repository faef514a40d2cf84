"""The real model's shapes without its weights: the hub's files with RANDOM weights, natively.

Speed and memory do not depend on the weights' values, so this measures the real code path
(``inference.phi3v``: the image embedding, the processor's crops and token counts, the
language model) on a machine that cannot download the 8 GB of weights. No hub code runs: only
the hub's config, processor and tokenizer files are read; the weights are written with the hub
checkpoint's key names, so the directory loads exactly as the real model. ``layers`` keeps only
the first N language-model layers, for a smoke run on a CPU. The answers are gibberish.
"""

from __future__ import annotations

import json
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
    """Write ``target``: the hub's config, processor and tokenizer files (never its ``*.py``)
    and random weights made on ``device`` in ``dtype``, saved as the hub checkpoint is."""
    from inference.phi3v import Phi3VConfig, Phi3VForCausalLM, hub_state_dict, save_hub_checkpoint

    started = time.perf_counter()
    target.mkdir(parents=True, exist_ok=True)
    for name in HUB_FILES:
        if (hub_files / name).is_file():
            shutil.copy(hub_files / name, target / name)
    if layers is not None:
        config_path = target / "config.json"
        config_json = json.loads(config_path.read_text())
        config_json["num_hidden_layers"] = layers
        config_path.write_text(json.dumps(config_json, indent=2))
    config = Phi3VConfig.from_pretrained(target)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in dtype: no float32 copy of 4 billion weights first
    try:
        with torch.device(device):
            model = Phi3VForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    save_hub_checkpoint(hub_state_dict(model), target, max_shard_size="5GB")
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
