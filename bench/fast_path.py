"""Plain path vs fast path, in one run: decode speed, throughput, first token, memory, warm-up.

Three engines answer the same questions about one 1280x720 picture, one after another:

- *plain*: the remote model's own ``generate`` (``FAST_PATH=off``), micro-batched;
- *fast, eager*: native Phi-3 + continuous batching (``FAST_PATH=on COMPILE=off``);
- *fast, compiled*: the same with the decode step compiled (``COMPILE=on``: CUDA graphs on
  CUDA, inductor alone on the CPU), after its warm-up at start-up.

For each: the time to start (load + warm-up; the warm-up alone as the engine measured it),
the time to the first piece of one request alone (median), the decode speed of one request
alone (tokens after the first / time after the first piece, median), then total tokens/s at
1, 4, 8 and 16 concurrent clients whose requests arrive at random times (each client starts
at a random moment and pauses a random, exponentially distributed while between requests;
seeded, so every engine gets the same arrivals), with the CUDA peak memory of each row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image

from inference import GenerationRequest
from inference.conversation import build_prompt
from inference.fast_path import cache_length
from inference.local_engine import LocalEngine

from . import stats
from .model import BenchModel, chart_image, question, running_engine, timed_request

log = logging.getLogger(__name__)

MODES = (
    ("plain", {"fast_path": "off"}),
    ("fast, eager", {"fast_path": "on", "compile": "off"}),
    ("fast, compiled", {"fast_path": "on", "compile": "on"}),
)
PICTURE_SIZE = (1280, 720)
MAX_ROWS = 16


@dataclass(frozen=True)
class FastPathConfig:
    max_new_tokens: int
    concurrency: tuple[int, ...]
    requests_per_client: int
    alone_runs: int  # requests alone, for the first-token time and the decode speed
    seed: int = 0


@dataclass(frozen=True)
class LoadRow:
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    first_piece_p50_s: float
    latency_p50_s: float
    peak_memory_gib: float | None


def picture() -> Image.Image:
    return chart_image().resize(PICTURE_SIZE)


def _ask(n: int, image: Image.Image, max_new_tokens: int) -> GenerationRequest:
    return question(f"What does picture {n} show? Describe it in detail.", image, max_new_tokens)


def _count_tokens(engine: LocalEngine, model: BenchModel, text: str, max_new_tokens: int) -> int:
    """Exact for the tiny model (its unscripted answers never stop early); re-encoded otherwise."""
    if model.tiny:
        return max_new_tokens
    loaded = engine.loaded
    assert loaded is not None
    return len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])


def _prompt_tokens(engine: LocalEngine, request: GenerationRequest) -> int:
    loaded = engine.loaded
    assert loaded is not None
    images = list(request.conversation.images)
    encoded = loaded.processor(build_prompt(request.conversation), images or None, return_tensors="pt")
    return int(encoded["input_ids"].shape[1])


def _peak_memory_gib(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    return torch.cuda.max_memory_allocated() / 2**30


def _reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


async def _alone(
    engine: LocalEngine, model: BenchModel, image: Image.Image, config: FastPathConfig
) -> dict[str, Any]:
    first_pieces: list[float] = []
    decode_rates: list[float] = []
    for n in range(config.alone_runs):
        pieces: list[float] = []
        text: list[str] = []
        started = time.perf_counter()
        async for piece in engine.stream(_ask(n, image, config.max_new_tokens)):
            pieces.append(time.perf_counter())
            text.append(piece)
        tokens = _count_tokens(engine, model, "".join(text), config.max_new_tokens)
        first_pieces.append(pieces[0] - started)
        if len(pieces) > 1 and tokens > 1:
            decode_rates.append((tokens - 1) / (pieces[-1] - pieces[0]))
    return {
        "first_piece_s": stats.summary(first_pieces),
        "decode_tokens_per_s": stats.summary(decode_rates) if decode_rates else None,
    }


async def _load_row(
    engine: LocalEngine,
    model: BenchModel,
    image: Image.Image,
    concurrency: int,
    config: FastPathConfig,
    pause_s: float,
) -> LoadRow:
    """``concurrency`` clients, arriving at random times (the same ones for every engine)."""
    rng = random.Random(config.seed * 1000 + concurrency)
    plans = [
        (rng.uniform(0, pause_s), [rng.expovariate(1 / pause_s) for _ in range(config.requests_per_client)])
        for _ in range(concurrency)
    ]
    first_pieces: list[float] = []
    latencies: list[float] = []
    tokens = 0

    async def client(number: int, start: float, pauses: list[float]) -> None:
        nonlocal tokens
        await asyncio.sleep(start)
        for n, pause in enumerate(pauses):
            timed = await timed_request(engine, _ask(number * 100 + n, image, config.max_new_tokens))
            latencies.append(timed.total)
            if timed.to_first_piece is not None:
                first_pieces.append(timed.to_first_piece)
            tokens += _count_tokens(engine, model, timed.text, config.max_new_tokens)
            await asyncio.sleep(pause)

    _reset_peak_memory(model.device)
    started = time.perf_counter()
    await asyncio.gather(*(client(n, start, pauses) for n, (start, pauses) in enumerate(plans)))
    wall = time.perf_counter() - started
    return LoadRow(
        concurrency=concurrency,
        requests=len(latencies),
        tokens=tokens,
        wall_s=wall,
        tokens_per_s=tokens / wall,
        first_piece_p50_s=stats.percentile(first_pieces, 50),
        latency_p50_s=stats.percentile(latencies, 50),
        peak_memory_gib=_peak_memory_gib(model.device),
    )


async def _measure_mode(
    model: BenchModel, name: str, changes: dict[str, Any], config: FastPathConfig, max_batch_tokens: int
) -> dict[str, Any]:
    image = picture()
    settings = model.settings(
        max_new_tokens=config.max_new_tokens,
        max_batch_size=MAX_ROWS,
        max_batch_tokens=max_batch_tokens,
        **changes,
    )
    started = time.perf_counter()
    async with running_engine(settings) as engine:
        start_s = time.perf_counter() - started
        alone = await _alone(engine, model, image, config)
        # Pauses between a client's requests: about a tenth of one answer alone.
        decode = (alone["decode_tokens_per_s"] or {}).get("median") or 1.0
        single = alone["first_piece_s"]["median"] + config.max_new_tokens / decode
        rows = []
        for concurrency in config.concurrency:
            row = await _load_row(engine, model, image, concurrency, config, pause_s=single / 10)
            log.info(
                "%s x%d: %d requests, %.0f tokens/s, first piece p50 %.3f s",
                name,
                concurrency,
                row.requests,
                row.tokens_per_s,
                row.first_piece_p50_s,
            )
            rows.append(asdict(row))
        return {
            "mode": name,
            "decoding": engine.decoding,  # what it really ran (a fast path that fails falls back)
            "start_s": start_s,
            "warm_up_s": engine.warm_up_seconds,
            **alone,
            "rows": rows,
        }


async def measure_fast_path(model: BenchModel, config: FastPathConfig) -> dict[str, Any]:
    # Every row of MAX_ROWS gets a slot of one question's need (prompt + answer), bucketed.
    settings = model.settings(max_new_tokens=config.max_new_tokens)
    async with running_engine(dataclasses.replace(settings, fast_path="off")) as probe:
        prompt = _prompt_tokens(probe, _ask(0, picture(), config.max_new_tokens))
    max_batch_tokens = MAX_ROWS * cache_length(prompt, config.max_new_tokens)
    log.info("one question: %d prompt tokens; MAX_BATCH_TOKENS=%d", prompt, max_batch_tokens)
    modes = [await _measure_mode(model, name, changes, config, max_batch_tokens) for name, changes in MODES]
    plain = modes[0]
    for mode in modes:
        mode["decode_vs_plain"] = _ratio(_decode_median(mode), _decode_median(plain))
        mode["tokens_per_s_vs_plain"] = {
            str(row["concurrency"]): row["tokens_per_s"] / base["tokens_per_s"]
            for row, base in zip(mode["rows"], plain["rows"], strict=True)
        }
    return {
        "max_new_tokens": config.max_new_tokens,
        "prompt_tokens": prompt,
        "picture": f"{PICTURE_SIZE[0]}x{PICTURE_SIZE[1]}",
        "max_batch_size": MAX_ROWS,
        "max_batch_tokens": max_batch_tokens,
        "requests_per_client": config.requests_per_client,
        "modes": modes,
    }


def _decode_median(mode: dict[str, Any]) -> float | None:
    return (mode["decode_tokens_per_s"] or {}).get("median")


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return None if not ours or not theirs else ours / theirs
