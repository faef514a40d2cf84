"""Throughput: tokens/s, requests/s and latency at 1, 4, 8 and 16 concurrent requests.

Each row is a closed loop: `concurrency` clients each send a request, wait for the whole
answer, and send the next, `per_client` times. Requests are unscripted (random clean text
from the model, which never stops early) with a small picture, each exactly
`max_new_tokens` long, so every token costs real compute. Two engine settings are compared:
``MAX_BATCH_SIZE=1`` (one request at a time, the cookbook's way) and batched
(``MAX_BATCH_SIZE=8``, or 16 for the 16-concurrency row).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image

from inference.local_engine import LocalEngine

from . import stats
from .model import BenchModel, chart_image, question, running_engine, timed_request

log = logging.getLogger(__name__)

CONCURRENCY = (1, 4, 8, 16)
TARGET_SPEEDUP_AT_8 = 3.0


@dataclass(frozen=True)
class ThroughputConfig:
    max_new_tokens: int
    rounds: int  # requests per client
    min_requests: int  # per row: low-concurrency rows send more per client


@dataclass(frozen=True)
class Row:
    mode: str
    max_batch_size: int
    concurrency: int
    requests: int
    tokens: int
    # The answers' text encoded again: a check for the tiny model (BPE may merge differently),
    # the count for a real model (which may stop before max_new_tokens).
    retokenized_tokens: int
    wall_s: float
    tokens_per_s: float
    requests_per_s: float
    latency_p50_s: float
    latency_p95_s: float


def batch_size_for(concurrency: int) -> int:
    return 16 if concurrency > 8 else 8


async def _run_row(
    engine: LocalEngine,
    model: BenchModel,
    mode: str,
    concurrency: int,
    image: Image.Image,
    config: ThroughputConfig,
) -> Row:
    per_client = max(config.rounds, math.ceil(config.min_requests / concurrency))
    latencies: list[float] = []
    texts: list[str] = []

    async def client(number: int) -> None:
        for n in range(per_client):
            timed = await timed_request(
                engine,
                question(f"Tell me about picture {number}-{n}.", image, config.max_new_tokens),
            )
            latencies.append(timed.total)
            texts.append(timed.text)

    started = time.perf_counter()
    await asyncio.gather(*(client(number) for number in range(concurrency)))
    wall = time.perf_counter() - started
    loaded = engine.loaded
    assert loaded is not None
    tokenizer = loaded.tokenizer
    retokenized = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)
    if any(not text.strip() for text in texts):
        log.warning("%s x%d: some answers were empty", mode, concurrency)
    requests = len(latencies)
    # The tiny model's unscripted answers never stop early; a real model's may.
    tokens = requests * config.max_new_tokens if model.tiny else retokenized
    row = Row(
        mode=mode,
        max_batch_size=engine.settings.max_batch_size,
        concurrency=concurrency,
        requests=requests,
        tokens=tokens,
        retokenized_tokens=retokenized,
        wall_s=wall,
        tokens_per_s=tokens / wall,
        requests_per_s=requests / wall,
        latency_p50_s=stats.percentile(latencies, 50),
        latency_p95_s=stats.percentile(latencies, 95),
    )
    log.info(
        "throughput %s (batch %d) x%d: %d requests in %.2f s, %.0f tokens/s, p50 %.3f s",
        mode,
        row.max_batch_size,
        concurrency,
        requests,
        wall,
        row.tokens_per_s,
        row.latency_p50_s,
    )
    return row


async def _rows_with(
    model: BenchModel,
    mode: str,
    batch_size: int,
    concurrencies: list[int],
    config: ThroughputConfig,
) -> list[Row]:
    image = chart_image()
    settings = model.settings(max_new_tokens=config.max_new_tokens, max_batch_size=batch_size)
    async with running_engine(settings) as engine:
        # Warm-up: a single request, then a full batch at once.
        await timed_request(engine, question("Warm up.", image, 8))
        await asyncio.gather(
            *(timed_request(engine, question(f"Warm up {n}.", image, 8)) for n in range(batch_size))
        )
        return [await _run_row(engine, model, mode, c, image, config) for c in concurrencies]


async def measure_throughput(model: BenchModel, config: ThroughputConfig) -> dict[str, Any]:
    rows = await _rows_with(model, "one at a time", 1, list(CONCURRENCY), config)
    for batch_size in sorted({batch_size_for(c) for c in CONCURRENCY}):
        concurrencies = [c for c in CONCURRENCY if batch_size_for(c) == batch_size]
        rows += await _rows_with(model, "batched", batch_size, concurrencies, config)
    single = {row.concurrency: row for row in rows if row.max_batch_size == 1}
    speedups = {
        str(row.concurrency): row.tokens_per_s / single[row.concurrency].tokens_per_s
        for row in rows
        if row.max_batch_size > 1
    }
    at_8 = speedups["8"]
    return {
        "max_new_tokens": config.max_new_tokens,
        "rounds": config.rounds,
        "min_requests": config.min_requests,
        "tokens_counted_by": "max_new_tokens x requests (the tiny model never stops early)"
        if model.tiny
        else "the tokenizer, on the answers' text",
        "rows": [asdict(row) for row in rows],
        "batched_speedup_tokens_per_s": speedups,
        "target_speedup_at_8": TARGET_SPEEDUP_AT_8,
        "target_met": at_8 >= TARGET_SPEEDUP_AT_8,
    }
