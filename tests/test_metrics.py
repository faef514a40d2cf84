"""The metrics, through the engine wrapper and the question block: each outcome, the line, the state."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from bot.images import ImageProblem
from bot.limits import Refused
from bot.metrics import MeteredEngine, Metrics
from inference import Conversation, EngineError, GenerationError, GenerationRequest, StartProgress
from inference.engine import PromptTooLong


class ScriptedEngine:
    """Waits in line until `go` is set, then streams `pieces` or raises `error`."""

    def __init__(
        self, pieces: list[str], error: Exception | None = None, start_error: Exception | None = None
    ) -> None:
        self.pieces = pieces
        self.error = error
        self.start_error = start_error
        self.go = asyncio.Event()
        self.waiting = asyncio.Event()

    async def start(self, on_progress: StartProgress | None = None) -> None:
        if self.start_error is not None:
            raise self.start_error

    async def close(self) -> None:
        pass

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        assert request.on_queue_position is not None
        request.on_queue_position(1)
        self.waiting.set()
        await self.go.wait()
        request.on_queue_position(0)
        if self.error is not None:
            raise self.error
        for piece in self.pieces:
            yield piece


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


async def ask(metrics: Metrics, engine: MeteredEngine, kind: str = "mention") -> str:
    with metrics.question(kind):
        pieces = engine.stream(GenerationRequest(Conversation.single("hi")))
        async with contextlib.aclosing(pieces):  # type: ignore[type-var]
            return "".join([piece async for piece in pieces])


async def test_an_answer_is_timed_and_counted_and_the_line_is_measured() -> None:
    metrics = Metrics()
    scripted = ScriptedEngine(["a", "b", "c", "d"])
    engine = MeteredEngine(scripted, metrics)
    assert value(metrics, "seebot_engine", seebot_engine="starting") == 1
    await engine.start()
    assert value(metrics, "seebot_engine", seebot_engine="ready") == 1
    asking = asyncio.create_task(ask(metrics, engine, "ocr"))
    await scripted.waiting.wait()  # the question is in line
    assert value(metrics, "seebot_queue_length") == 1
    scripted.go.set()
    assert await asking == "abcd"
    assert value(metrics, "seebot_queue_length") == 0
    assert value(metrics, "seebot_questions_total", kind="ocr", outcome="answered") == 1
    assert value(metrics, "seebot_time_in_line_seconds_count") == 1
    assert value(metrics, "seebot_time_to_first_token_seconds_count") == 1
    assert value(metrics, "seebot_answer_tokens_sum") == 4
    assert value(metrics, "seebot_tokens_per_second_count") == 1
    await engine.close()
    assert value(metrics, "seebot_engine", seebot_engine="stopped") == 1


@pytest.mark.parametrize(
    ("error", "outcome"),
    [(GenerationError("boom"), "failed"), (PromptTooLong("too long"), "refused")],
)
async def test_a_failed_or_too_long_question_is_counted_as_such(error: Exception, outcome: str) -> None:
    metrics = Metrics()
    scripted = ScriptedEngine([], error)
    scripted.go.set()
    engine = MeteredEngine(scripted, metrics)
    await engine.start()
    with pytest.raises(type(error)):
        await ask(metrics, engine, "ask")
    assert value(metrics, "seebot_questions_total", kind="ask", outcome=outcome) == 1
    assert value(metrics, "seebot_answer_tokens_count") == 0


async def test_a_question_cancelled_while_it_waits_leaves_the_line_uncounted_as_time_in_line() -> None:
    metrics = Metrics()
    scripted = ScriptedEngine(["x"])
    engine = MeteredEngine(scripted, metrics)
    await engine.start()
    asking = asyncio.create_task(ask(metrics, engine, "compare"))
    await scripted.waiting.wait()
    assert value(metrics, "seebot_queue_length") == 1
    asking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asking
    assert value(metrics, "seebot_queue_length") == 0
    assert value(metrics, "seebot_time_in_line_seconds_count") == 0
    assert value(metrics, "seebot_questions_total", kind="compare", outcome="cancelled") == 1


@pytest.mark.parametrize("refusal", [Refused("busy"), ImageProblem("not an image")])
async def test_a_question_refused_before_the_model_is_counted_as_refused(refusal: Exception) -> None:
    metrics = Metrics()
    with pytest.raises(type(refusal)), metrics.question("follow-up"):
        raise refusal
    assert value(metrics, "seebot_questions_total", kind="follow-up", outcome="refused") == 1


async def test_a_model_that_cannot_start_is_failed() -> None:
    metrics = Metrics()
    engine = MeteredEngine(ScriptedEngine([], start_error=EngineError("no model")), metrics)
    with pytest.raises(EngineError):
        await engine.start()
    assert engine.state == "failed"
    assert value(metrics, "seebot_engine", seebot_engine="failed") == 1
    assert value(metrics, "seebot_gpu_memory_bytes", kind="allocated") == 0  # no CUDA here
