"""QUANTIZE none vs 8bit vs 4bit: weight bytes, KV bytes per token, tokens/s, time to first token.

One engine per setting (the same model, loaded with ``QUANTIZE``): weight bytes as loaded,
the KV cache's bytes per token, decode tokens/s with 1 and with 8 clients asking at once
(closed loop, unscripted answers of exactly ``max_new_tokens``), and the time to the first
piece of one question alone. The tiny model on the CPU by default; ``--gpu --hub-files`` runs
it at the real shapes.

``memory_table``: the memory each setting needs on a GPU for the real Phi-3-vision (its shapes
built on the meta device: no weights, no download), for N concurrent one-image questions:
README's "Which GPU runs what".
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from inference.memory import kv_bytes_per_token, weight_bytes

from .model import BenchModel, chart_image, question, running_engine, timed_request

log = logging.getLogger(__name__)

MODES = ("none", "8bit", "4bit")

# Phi-3-vision-128k-instruct's config.json, the numbers that size it.
REAL_CONFIG: dict[str, Any] = {
    "model_type": "phi3_v",
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32064,
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "embd_layer": {
        "embedding_cls": "image",
        "hd_transform_order": "sub_glb",
        "projection_cls": "mlp",
        "use_hd_transform": True,
        "with_learnable_separator": True,
    },
    "img_processor": {
        "image_dim_out": 1024,
        "model_name": "openai/clip-vit-large-patch14-336",
        "name": "clip_vision_model",
        "num_img_tokens": 144,
    },
    "rope_scaling": {"long_factor": [1.0] * 48, "short_factor": [1.0] * 48, "type": "su"},
}
# A question about one 1280x720 picture at 16 crops (the hub's token count), and its answer.
ONE_IMAGE_PROMPT_TOKENS = 2371
SLOT_BUCKET = 256  # the engine's slots are whole 256-token buckets with CUDA graphs
# The CUDA context, the allocator's slack, CLIP's and the prefill's activations (measured
# peaks beyond weights + cache on an H100 are under 1 GiB).
OVERHEAD_BYTES = 1 << 30
NF4_BLOCK = 64  # bitsandbytes' default: one float32 absmax per 64 weights
CONCURRENT = (1, 2, 4, 8)
GPU_SIZES_GIB = (8, 12, 16, 24)


@dataclass(frozen=True)
class QuantConfig:
    max_new_tokens: int
    requests_per_client: int
    ttft_runs: int
    modes: tuple[str, ...] = MODES


@dataclass(frozen=True)
class QuantRow:
    mode: str
    weight_bytes: int
    kv_bytes_per_token: int
    tokens_per_s_1: float
    tokens_per_s_8: float
    ttft_s: float
    decoding: str


async def _tokens_per_s(engine: Any, model: BenchModel, clients: int, config: QuantConfig) -> float:
    image = chart_image()
    texts: list[str] = []

    async def client(number: int) -> None:
        for n in range(config.requests_per_client):
            timed = await timed_request(
                engine, question(f"Tell me about {number}-{n}.", image, config.max_new_tokens)
            )
            texts.append(timed.text)

    started = time.perf_counter()
    await asyncio.gather(*(client(number) for number in range(clients)))
    wall = time.perf_counter() - started
    tokenizer = engine.loaded.tokenizer
    tokens = (
        len(texts) * config.max_new_tokens
        if model.tiny
        else sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)
    )
    return tokens / wall


async def _row(model: BenchModel, mode: str, config: QuantConfig) -> QuantRow:
    settings = model.settings(quantize=mode, max_new_tokens=config.max_new_tokens, max_batch_size=8)
    async with running_engine(settings) as engine:
        loaded = engine.loaded
        assert loaded is not None
        image = chart_image()
        await asyncio.gather(*(timed_request(engine, question(f"Warm up {n}.", image, 8)) for n in range(8)))
        firsts = []
        for n in range(config.ttft_runs):
            timed = await timed_request(engine, question(f"First piece {n}.", image, 4))
            assert timed.to_first_piece is not None
            firsts.append(timed.to_first_piece)
        row = QuantRow(
            mode=mode,
            weight_bytes=weight_bytes(loaded.model),
            kv_bytes_per_token=kv_bytes_per_token(loaded.model.config, loaded.dtype),
            tokens_per_s_1=await _tokens_per_s(engine, model, 1, config),
            tokens_per_s_8=await _tokens_per_s(engine, model, 8, config),
            ttft_s=statistics.median(firsts),
            decoding=engine.decoding,
        )
    log.info(
        "QUANTIZE=%s: weights %.2f MiB, %d KV bytes/token, %.0f / %.0f tokens/s at 1 / 8, first piece %.3f s",
        mode,
        row.weight_bytes / 2**20,
        row.kv_bytes_per_token,
        row.tokens_per_s_1,
        row.tokens_per_s_8,
        row.ttft_s,
    )
    return row


def real_weight_bytes() -> dict[str, int]:
    """Weight bytes of the real Phi-3-vision per QUANTIZE setting, the kept parts in bf16."""
    from inference.phi3v import Phi3VConfig, Phi3VForCausalLM

    with torch.device("meta"):
        model = Phi3VForCausalLM(Phi3VConfig(**REAL_CONFIG))
    total = sum(p.numel() for p in model.parameters())
    linears = [
        module
        for name, module in model.named_modules()
        if name.startswith("model.layers.") and isinstance(module, torch.nn.Linear)
    ]
    quantized = sum(module.weight.numel() for module in linears)
    rows = sum(module.out_features for module in linears)
    kept = (total - quantized) * 2
    return {
        "none": total * 2,
        "8bit": kept + quantized + rows * 4,  # int8 weights + a float32 scale per row
        "4bit": kept + quantized // 2 + quantized // NF4_BLOCK * 4,  # nf4 + float32 absmax per block
        "parameters": total,
        "quantized_parameters": quantized,
    }


def memory_table(max_new_tokens: int = 1000) -> dict[str, Any]:
    """GPU memory per QUANTIZE setting: weights, and weights + KV cache + overhead for N
    concurrent one-image questions (each a slot of prompt + MAX_NEW_TOKENS, whole buckets; the
    cache holds nothing else)."""
    weights = real_weight_bytes()
    per_token = 32 * 2 * 32 * 96 * 2  # layers x (K, V) x kv heads x head dim x bf16
    slot_tokens = -(-(ONE_IMAGE_PROMPT_TOKENS + max_new_tokens) // SLOT_BUCKET) * SLOT_BUCKET
    rows = []
    slot = slot_tokens * per_token

    def need(mode: str, questions: int) -> int:
        return weights[mode] + questions * slot + OVERHEAD_BYTES

    for mode in MODES:
        needs = {str(n): need(mode, n) for n in CONCURRENT}
        fits = {
            str(gib): max((n for n in range(1, 65) if need(mode, n) <= gib * 2**30 * 0.90), default=0)
            for gib in GPU_SIZES_GIB
        }
        rows.append(
            {"mode": mode, "weight_bytes": weights[mode], "needs_bytes": needs, "questions_fit": fits}
        )
    return {
        "parameters": weights["parameters"],
        "quantized_parameters": weights["quantized_parameters"],
        "kv_bytes_per_token": per_token,
        "prompt_tokens": ONE_IMAGE_PROMPT_TOKENS,
        "max_new_tokens": max_new_tokens,
        "slot_tokens": slot_tokens,
        "overhead_bytes": OVERHEAD_BYTES,
        "gpu_memory_fraction": 0.90,
        "rows": rows,
    }


async def measure_quant(model: BenchModel, config: QuantConfig) -> dict[str, Any]:
    rows = [await _row(model, mode, config) for mode in config.modes]
    return {
        "max_new_tokens": config.max_new_tokens,
        "requests_per_client": config.requests_per_client,
        "rows": [asdict(row) for row in rows],
        "memory_table": memory_table(),
    }


def _gib(value: float) -> str:
    return f"{value / 2**30:.1f} GiB"


def quant_tables(result: dict[str, Any]) -> str:
    """The measured table and the real model's memory table, in Markdown."""
    from .report import table

    rows = [
        [
            f"`{row['mode']}`",
            f"{row['weight_bytes'] / 2**20:.2f} MiB",
            f"{row['kv_bytes_per_token']:,}",
            f"{row['tokens_per_s_1']:.0f}",
            f"{row['tokens_per_s_8']:.0f}",
            f"{row['ttft_s'] * 1000:.0f}",
            row["decoding"],
        ]
        for row in result["rows"]
    ]
    header = [
        "QUANTIZE",
        "weights",
        "KV bytes/token",
        "tokens/s, 1",
        "tokens/s, 8",
        "first piece (ms)",
        "decoding",
    ]
    memory = result["memory_table"]
    gpu_header = ["QUANTIZE", "weights", *[f"{n} question(s)" for n in CONCURRENT]]
    gpu_rows = [
        [
            f"`{row['mode']}`",
            _gib(row["weight_bytes"]),
            *[_gib(row["needs_bytes"][str(n)]) for n in CONCURRENT],
        ]
        for row in memory["rows"]
    ]
    fit_header = ["QUANTIZE", *[f"{gib} GiB GPU" for gib in GPU_SIZES_GIB]]
    fit_rows = [
        [f"`{row['mode']}`", *[str(row["questions_fit"][str(gib)]) for gib in GPU_SIZES_GIB]]
        for row in memory["rows"]
    ]
    return "\n\n".join(
        [
            f"### QUANTIZE ({result['max_new_tokens']} new tokens per request, 1 and 8 clients)",
            table(header, rows),
            f"#### Which GPU runs what (real shapes: {memory['parameters'] / 1e9:.2f}e9 parameters, "
            f"{memory['quantized_parameters'] / 1e9:.2f}e9 in the quantized linear layers; "
            f"{memory['kv_bytes_per_token'] // 1024} KiB KV/token; one-image question = "
            f"{memory['prompt_tokens']:,} prompt + {memory['max_new_tokens']} answer tokens = a "
            f"{memory['slot_tokens']:,}-token slot; + "
            f"{memory['overhead_bytes'] / 2**30:.0f} GiB overhead)",
            table(gpu_header, gpu_rows),
            f"Concurrent one-image questions that fit in {memory['gpu_memory_fraction']:.0%} of a GPU:",
            table(fit_header, fit_rows),
        ]
    )
