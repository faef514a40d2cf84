"""Event-loop lag while the local engine generates.

A ticker coroutine sleeps `TICK_SECONDS` again and again and records how late it wakes. With
the model on its worker thread, the loop should stay on time (Discord heartbeats, other
users' messages); a blocked loop shows up as lag of the generation's length. Three phases:
the engine idle (the floor), one request at a time, and bursts of `CONCURRENT` requests at
once (a batch, with the engine's default MAX_BATCH_SIZE).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from . import stats
from .model import BenchModel, chart_image, question, running_engine, timed_request

log = logging.getLogger(__name__)

TICK_SECONDS = 0.010
TARGET_P99_MS = 20.0
CONCURRENT = 8


@dataclass(frozen=True)
class LagConfig:
    generations: int  # one after another
    bursts: int  # of CONCURRENT requests at once
    max_new_tokens: int
    idle_seconds: float


class Ticker:
    """Records, in ms, how late each `asyncio.sleep(TICK_SECONDS)` returns."""

    def __init__(self) -> None:
        self.lags_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(TICK_SECONDS)
            self.lags_ms.append((time.perf_counter() - before - TICK_SECONDS) * 1000.0)

    def start(self) -> None:
        self.lags_ms = []
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> list[float]:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        return list(self.lags_ms)


def _phase(name: str, lags_ms: list[float], seconds: float, requests: int) -> dict[str, Any]:
    summary = stats.summary(lags_ms, (50, 99))
    log.info(
        "loop lag %s (%.1f s): %d ticks, p50 %.2f ms, p99 %.2f ms, max %.2f ms",
        name,
        seconds,
        len(lags_ms),
        summary["p50"],
        summary["p99"],
        summary["max"],
    )
    return {"phase": name, "seconds": seconds, "requests": requests, "lag_ms": summary}


async def measure_loop_lag(model: BenchModel, config: LagConfig) -> dict[str, Any]:
    image = chart_image()
    tokens = config.max_new_tokens
    ticker = Ticker()
    phases = []
    async with running_engine(model.settings(max_new_tokens=tokens)) as engine:
        await timed_request(engine, question("Warm up: describe this chart.", image, 8))

        ticker.start()
        await asyncio.sleep(config.idle_seconds)
        phases.append(_phase("idle engine", await ticker.stop(), config.idle_seconds, 0))

        ticker.start()
        started = time.perf_counter()
        for n in range(config.generations):
            await timed_request(engine, question(f"Describe chart number {n} in detail.", image, tokens))
        seconds = time.perf_counter() - started
        name = f"{config.generations} generations of {tokens} tokens, one at a time"
        phases.append(_phase(name, await ticker.stop(), seconds, config.generations))

        ticker.start()
        started = time.perf_counter()
        for burst in range(config.bursts):
            await asyncio.gather(
                *(
                    timed_request(engine, question(f"Describe chart {burst}-{n} in detail.", image, tokens))
                    for n in range(CONCURRENT)
                )
            )
        seconds = time.perf_counter() - started
        name = f"{config.bursts} x {CONCURRENT} concurrent generations of {tokens} tokens"
        phases.append(_phase(name, await ticker.stop(), seconds, config.bursts * CONCURRENT))
    busy = [phase for phase in phases if phase["requests"]]
    worst_p99 = max(phase["lag_ms"]["p99"] for phase in busy)
    return {
        "tick_ms": TICK_SECONDS * 1000.0,
        "max_new_tokens": tokens,
        "phases": phases,
        "worst_p99_ms_during_generation": worst_p99,
        "target_p99_ms": TARGET_P99_MS,
        "target_met": worst_p99 < TARGET_P99_MS,
    }
