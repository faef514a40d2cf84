"""HF ``generate`` vs the engine (eager, compiled), in one run, on real prompt lengths.

The same native model answers the same questions (one 1280x720 picture at 16 crops: 2,377
prompt tokens with the real processor's numbers; and text only), every answer exactly
``max_new_tokens`` long (``generate`` with ``min_new_tokens``, the engine with a steering
that bans the stop tokens), greedy:

- *generate*: ``model.generate`` one request at a time (the cookbook's way, natively);
- *engine, eager*: the engine (continuous batching) with ``COMPILE=off``;
- *engine, compiled*: ``COMPILE=on`` (CUDA graphs per bucket on CUDA, inductor on the CPU),
  after its warm-up.

For each: the start (load + warm-up) and the warm-up alone; alone, the time to the first
token and the decode speed (tokens after the first / time after the first, median), each
engine request followed by the same one through ``generate`` on the same model, so that an
engine's "vs generate" compares requests run minutes apart, not phases of the run (on
shared cores a phase can run tens of percent faster or slower than the next); then
total tokens/s at 1, 4, 8 and 16 concurrent clients arriving at random times (seeded: every
engine gets the same arrivals), with the CUDA peak memory of each row, each row between two
runs of ``generate`` one request at a time, against whose mean its ratio is. ``generate`` serves
one request at a time, so its tokens/s is its one-at-a-time rate whatever the concurrency.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from inference import Conversation, GenerationRequest, InferenceSettings
from inference.loading import LoadedModel, load_model
from inference.local_engine import LocalEngine
from inference.prompt_inputs import PromptEncoder
from inference.runner import round_up

from . import stats
from .model import BenchModel, chart_image, running_engine, timed_request

log = logging.getLogger(__name__)

ENGINE_MODES = (("engine, eager", "off"), ("engine, compiled", "on"))
KINDS = ("one image", "text only")
PICTURE_SIZE = (1280, 720)
MAX_ROWS = 16


@dataclass(frozen=True)
class FastPathConfig:
    max_new_tokens: int
    concurrency: tuple[int, ...]
    requests_per_client: int
    alone_runs: int  # requests alone, for the first-token time and the decode speed
    seed: int = 0
    modes: tuple[str, ...] = tuple(name for name, _ in ENGINE_MODES)  # engine modes to run


@dataclass(frozen=True)
class LoadRow:
    kind: str
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    first_piece_p50_s: float
    latency_p50_s: float
    peak_memory_gib: float | None


class NeverStop:
    """A steering (inference/steering.py) that bans the stop tokens: every answer runs to
    ``max_new_tokens``, as ``generate`` does with ``min_new_tokens``."""

    def __init__(self, stop_token_ids: list[int]) -> None:
        self._stops = torch.tensor(stop_token_ids, dtype=torch.long)

    def begin(self, request: GenerationRequest, prompt_ids: list[int]) -> NeverStop:
        return self

    def steer(self, step: int, logits: torch.Tensor) -> None:
        if self._stops.device != logits.device:
            self._stops = self._stops.to(logits.device)  # once: no host-to-device copy per step
        logits.index_fill_(0, self._stops, float("-inf"))


def picture() -> Image.Image:
    return chart_image().resize(PICTURE_SIZE)


def ask(kind: str, n: int, max_new_tokens: int) -> GenerationRequest:
    text = f"What does picture {n} show? Describe it in detail."
    images = [picture()] if kind == "one image" else []
    return GenerationRequest(Conversation.single(text, images), max_new_tokens=max_new_tokens)


def _peak_memory_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def _reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


# --- HF generate, one request at a time ------------------------------------------------------


class _Clock(BaseStreamer):
    """When each new token came (``generate`` hands the prompt over first)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self._prompt:
            self._prompt = False
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _generate_once(
    loaded: LoadedModel, encoder: PromptEncoder, request: GenerationRequest
) -> tuple[float, float]:
    """(seconds to the first token, seconds in all) of one ``generate`` call."""
    max_new_tokens = int(request.max_new_tokens or 1)
    started = time.perf_counter()  # the prompt's encoding counts, as it does for the engine
    inputs = encoder.encode(request, max_new_tokens)
    on_device = {name: tensor.to(loaded.device) for name, tensor in inputs.items()}
    if "pixel_values" in on_device:
        on_device["pixel_values"] = on_device["pixel_values"].to(loaded.dtype)
    clock = _Clock()
    with torch.inference_mode():
        loaded.model.generate(
            **on_device,
            attention_mask=torch.ones_like(on_device["input_ids"]),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=loaded.stop_token_ids,
            pad_token_id=loaded.tokenizer.pad_token_id,
            streamer=clock,
        )
    return clock.times[0] - started, time.perf_counter() - started


def _measure_generate(
    loaded: LoadedModel, settings: InferenceSettings, config: FastPathConfig, device: str
) -> dict[str, Any]:
    encoder = PromptEncoder(loaded.processor, settings, None)
    result: dict[str, Any] = {"mode": "generate", "decoding": "HF generate, one at a time"}
    for kind in KINDS:
        _generate_once(loaded, encoder, ask(kind, 999, 4))  # warm-up
        _reset_peak_memory(device)
        firsts, rates, totals = [], [], []
        for n in range(config.alone_runs):
            first, total = _generate_once(loaded, encoder, ask(kind, n, config.max_new_tokens))
            firsts.append(first)
            totals.append(total)
            rates.append((config.max_new_tokens - 1) / (total - first))
        one_at_a_time = config.max_new_tokens * len(totals) / sum(totals)
        result[kind] = {
            "first_piece_s": stats.summary(firsts),
            "decode_tokens_per_s": stats.summary(rates),
            "rows": [
                asdict(
                    LoadRow(
                        kind,
                        concurrency,
                        len(totals),
                        config.max_new_tokens * len(totals),
                        sum(totals),
                        one_at_a_time,
                        stats.percentile(firsts, 50),
                        stats.percentile(totals, 50),
                        _peak_memory_gib(device),
                    )
                )
                for concurrency in config.concurrency
            ],
        }
        log.info(
            "generate, %s: decode %.0f tokens/s alone", kind, result[kind]["decode_tokens_per_s"]["median"]
        )
    return result


# --- the engine ----------------------------------------------------------------------------


async def _alone(
    engine: LocalEngine, kind: str, config: FastPathConfig, generate: Callable[[GenerationRequest], float]
) -> dict[str, Any]:
    """Requests alone, each followed by the same question through ``generate`` (its decode
    tokens/s): the two alternate, so a shared machine's drift hits both alike."""
    firsts: list[float] = []
    rates: list[float] = []
    generate_rates: list[float] = []
    for n in range(config.alone_runs):
        timed = await timed_request(engine, ask(kind, n, config.max_new_tokens))
        assert timed.first_piece is not None
        firsts.append(timed.first_piece - timed.started)
        rates.append((config.max_new_tokens - 1) / (timed.ended - timed.first_piece))
        generate_rates.append(await asyncio.to_thread(generate, ask(kind, n, config.max_new_tokens)))
    return {
        "first_piece_s": stats.summary(firsts),
        "decode_tokens_per_s": stats.summary(rates),
        "generate_decode_tokens_per_s": stats.summary(generate_rates),
    }


async def _load_row(
    engine: LocalEngine, kind: str, concurrency: int, config: FastPathConfig, pause_s: float, device: str
) -> LoadRow:
    """``concurrency`` clients, arriving at random times (the same ones for every engine)."""
    rng = random.Random(config.seed * 1000 + concurrency)
    plans = [
        (rng.uniform(0, pause_s), [rng.expovariate(1 / pause_s) for _ in range(config.requests_per_client)])
        for _ in range(concurrency)
    ]
    first_pieces: list[float] = []
    latencies: list[float] = []

    async def client(number: int, start: float, pauses: list[float]) -> None:
        await asyncio.sleep(start)
        for n, pause in enumerate(pauses):
            timed = await timed_request(engine, ask(kind, number * 100 + n, config.max_new_tokens))
            latencies.append(timed.total)
            if timed.to_first_piece is not None:
                first_pieces.append(timed.to_first_piece)
            await asyncio.sleep(pause)

    _reset_peak_memory(device)
    started = time.perf_counter()
    await asyncio.gather(*(client(n, start, pauses) for n, (start, pauses) in enumerate(plans)))
    wall = time.perf_counter() - started
    tokens = config.max_new_tokens * len(latencies)
    return LoadRow(
        kind=kind,
        concurrency=concurrency,
        requests=len(latencies),
        tokens=tokens,
        wall_s=wall,
        tokens_per_s=tokens / wall,
        first_piece_p50_s=stats.percentile(first_pieces, 50),
        latency_p50_s=stats.percentile(latencies, 50),
        peak_memory_gib=_peak_memory_gib(device),
    )


async def _measure_engine(
    loaded: LoadedModel, settings: InferenceSettings, name: str, config: FastPathConfig, device: str
) -> dict[str, Any]:
    started = time.perf_counter()
    steering = NeverStop(loaded.stop_token_ids)
    encoder = PromptEncoder(loaded.processor, settings, None)

    def generate(request: GenerationRequest) -> float:
        """``generate``'s decode tokens/s for the request (the engine's thread is idle meanwhile)."""
        first, total = _generate_once(loaded, encoder, request)
        return (int(request.max_new_tokens or 1) - 1) / (total - first)

    def one_at_a_time(kind: str) -> float:
        """``generate``'s total tokens/s over ``alone_runs`` requests one at a time, run right
        before and after each load row, so that the row's ratio compares neighbours, not
        phases of the run."""
        totals = [
            _generate_once(loaded, encoder, ask(kind, 500 + n, config.max_new_tokens))[1]
            for n in range(config.alone_runs)
        ]
        return config.max_new_tokens * len(totals) / sum(totals)

    async with running_engine(settings, steering, loader=lambda _: loaded) as engine:
        result: dict[str, Any] = {
            "mode": name,
            "decoding": engine.decoding,  # what it really ran (a failing compile decodes eagerly)
            "start_s": time.perf_counter() - started,
            "warm_up_s": engine.warm_up_seconds,
        }
        for kind in KINDS:
            alone = await _alone(engine, kind, config, generate)
            single = (
                alone["first_piece_s"]["median"]
                + config.max_new_tokens / alone["decode_tokens_per_s"]["median"]
            )
            rows = []
            # generate one at a time right before and right after each row (the mean of the two:
            # a drift of the shared cores during the row hits both alike); after one row is
            # before the next.
            beside: dict[str, float] = {}
            before = await asyncio.to_thread(one_at_a_time, kind)
            for concurrency in config.concurrency:
                # Pauses between a client's requests: about a tenth of one answer alone.
                row = await _load_row(engine, kind, concurrency, config, single / 10, device)
                log.info("%s, %s x%d: %.0f tokens/s", name, kind, concurrency, row.tokens_per_s)
                rows.append(asdict(row))
                after = await asyncio.to_thread(one_at_a_time, kind)
                beside[str(concurrency)] = (before + after) / 2
                before = after
            result[kind] = {**alone, "rows": rows, "generate_tokens_per_s_beside": beside}
    return result


async def measure_fast_path(model: BenchModel, config: FastPathConfig) -> dict[str, Any]:
    settings = model.settings(max_new_tokens=config.max_new_tokens, max_batch_size=MAX_ROWS)
    loaded = await asyncio.to_thread(load_model, settings)
    encoder = PromptEncoder(loaded.processor, settings, None)
    prompt = int(
        encoder.encode(ask("one image", 0, config.max_new_tokens), config.max_new_tokens)["input_ids"].shape[
            1
        ]
    )
    text_prompt = int(encoder.encode(ask("text only", 0, 1), 1)["input_ids"].shape[1])
    # Every one of MAX_ROWS slots holds one picture question and its answer.
    max_batch_tokens = MAX_ROWS * round_up(prompt + config.max_new_tokens, 256)
    settings = model.settings(
        max_new_tokens=config.max_new_tokens, max_batch_size=MAX_ROWS, max_batch_tokens=max_batch_tokens
    )
    log.info("one picture question: %d prompt tokens; MAX_BATCH_TOKENS=%d", prompt, max_batch_tokens)
    baseline = await asyncio.to_thread(_measure_generate, loaded, settings, config, model.device)
    modes = [baseline]
    for name, compile_setting in ENGINE_MODES:
        if name in config.modes:
            changed = dataclasses.replace(settings, compile=compile_setting)
            modes.append(await _measure_engine(loaded, changed, name, config, model.device))
    for mode in modes:
        for kind in KINDS:
            part = mode[kind]
            # Against the generate requests interleaved with this engine's, where there are any.
            interleaved = (part.get("generate_decode_tokens_per_s") or {}).get("median")
            part["decode_vs_generate"] = _ratio(_decode(part), interleaved or _decode(baseline[kind]))
            # Against generate one at a time right before and after the row (the engines).
            beside = part.get("generate_tokens_per_s_beside") or {}
            part["tokens_per_s_vs_generate"] = {
                str(row["concurrency"]): row["tokens_per_s"]
                / beside.get(str(row["concurrency"]), base["tokens_per_s"])
                for row, base in zip(part["rows"], baseline[kind]["rows"], strict=True)
            }
    return {
        "max_new_tokens": config.max_new_tokens,
        "prompt_tokens": prompt,
        "text_prompt_tokens": text_prompt,
        "picture": f"{PICTURE_SIZE[0]}x{PICTURE_SIZE[1]}",
        "max_batch_size": MAX_ROWS,
        "max_batch_tokens": max_batch_tokens,
        "requests_per_client": config.requests_per_client,
        "kinds": list(KINDS),
        "modes": modes,
    }


def _decode(part: dict[str, Any]) -> float | None:
    return (part.get("decode_tokens_per_s") or {}).get("median")


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return None if not ours or not theirs else ours / theirs
