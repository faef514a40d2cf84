"""Prometheus metrics: how many questions, how they ended, how long people wait, how fast it answers.

`Metrics` owns the collectors (in a registry of its own, served by bot/ops_server.py).
`Metrics.question(kind)` wraps the handling of one question and counts it by its outcome;
`MeteredEngine` wraps the engine, so the timings are measured at the engine interface and
the bot's answering code stays as it is. The outcome is learned where it happens: a refusal
at the gate, the engine's end (answered, failed, cancelled) in the wrapper, which finds the
question it serves through a context variable (tasks started for it inherit it).

Answer tokens are counted as the text pieces the engine streams: one per generated token
(a piece held back for an incomplete character joins the next).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram

from inference import Engine, EngineClosed, EngineError, GenerationRequest, StartProgress
from inference.engine import PromptTooLong
from inference.gpu_memory import gpu_memory_bytes

from .images import ImageProblem
from .limits import Refused

KINDS = ("mention", "follow-up", "dm", "ask", "ocr", "compare")
OUTCOMES = ("answered", "refused", "failed", "cancelled")
ENGINE_STATES = ("starting", "ready", "failed", "stopped")
ENGINE_PROBLEMS = {  # for /healthz
    "starting": "the model is loading",
    "failed": "the model failed; the bot is stopping",
    "stopped": "the model is stopped",
}


@dataclasses.dataclass
class _Question:
    kind: str
    outcome: str | None = None  # set by the engine wrapper once the engine was asked


_current_question: ContextVar[_Question | None] = ContextVar("seebot_question", default=None)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.questions = Counter(
            "seebot_questions", "Questions by kind (how asked) and outcome", ["kind", "outcome"], registry=r
        )
        for kind in KINDS:
            for outcome in OUTCOMES:
                self.questions.labels(kind, outcome)
        self.queue_length = Gauge(
            "seebot_queue_length", "Questions waiting in line for the model", registry=r
        )
        self.time_in_line = Histogram(
            "seebot_time_in_line_seconds",
            "From joining the line to the model starting on the question",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900),
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "seebot_time_to_first_token_seconds",
            "From joining the line to the answer's first text",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.answer_tokens = Histogram(
            "seebot_answer_tokens",
            "Tokens per answer",
            buckets=(8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "seebot_tokens_per_second",
            "Decoding speed of one answer, after its first token",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
            registry=r,
        )
        gpu_memory = Gauge("seebot_gpu_memory_bytes", "GPU memory this process holds", ["kind"], registry=r)
        for kind in ("allocated", "reserved"):
            gpu_memory.labels(kind).set_function(lambda kind=kind: gpu_memory_bytes()[kind])
        self.engine_state = Enum("seebot_engine", "The model's state", states=list(ENGINE_STATES), registry=r)

    def count(self, kind: str, outcome: str) -> None:
        self.questions.labels(kind, outcome).inc()

    @contextlib.contextmanager
    def question(self, kind: str) -> Iterator[None]:
        """Count the question handled in this block by how it ended."""
        question = _Question(kind)
        token = _current_question.set(question)
        ended = "refused"  # not given to the model: no question in it, a bad image
        try:
            yield
        except (Refused, ImageProblem):
            raise
        except asyncio.CancelledError:
            ended = "cancelled"
            raise
        except BaseException:
            ended = "failed"
            raise
        finally:
            _current_question.reset(token)
            self.count(kind, question.outcome or ended)


class MeteredEngine:
    """The engine, measured: time in line, first token, tokens, speed, queue length, state."""

    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self._engine = engine
        self._metrics = metrics
        self._closing = False
        self.state = "starting"
        metrics.engine_state.state(self.state)

    def _set_state(self, state: str) -> None:
        self.state = state
        self._metrics.engine_state.state(state)

    async def start(self, on_progress: StartProgress | None = None) -> None:
        try:
            await self._engine.start(on_progress)
        except BaseException:
            self._set_state("failed")
            raise
        self._set_state("ready")

    async def close(self) -> None:
        self._closing = True
        try:
            await self._engine.close()
        finally:
            self._set_state("stopped")

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        metrics = self._metrics
        question = _current_question.get()
        joined = time.monotonic()
        in_line = True
        metrics.queue_length.inc()

        def leave_line(*, started: bool = True) -> None:
            nonlocal in_line
            if in_line:
                in_line = False
                metrics.queue_length.dec()
                if started:
                    metrics.time_in_line.observe(time.monotonic() - joined)

        def on_place(place: int) -> None:
            if place == 0:
                leave_line()
            if request.on_queue_position is not None:
                request.on_queue_position(place)

        pieces = self._engine.stream(dataclasses.replace(request, on_queue_position=on_place))
        outcome = "cancelled"  # closed before its end: Cancel, the time limit, a shutdown
        first: float | None = None
        tokens = 0
        try:
            async for piece in pieces:
                if first is None:
                    leave_line()  # engines without a line of their own start with their text
                    first = time.monotonic()
                    metrics.time_to_first_token.observe(first - joined)
                tokens += 1
                yield piece
            outcome = "answered"
        except PromptTooLong:
            outcome = "refused"
            raise
        except EngineClosed:
            outcome = "failed"
            if not self._closing:
                self._set_state("failed")
            raise
        except EngineError:
            outcome = "failed"
            raise
        finally:
            leave_line(started=False)  # withdrawn from the line, or failed before starting
            aclose = getattr(pieces, "aclose", None)
            if aclose is not None:
                await aclose()
            if tokens:
                metrics.answer_tokens.observe(tokens)
                elapsed = time.monotonic() - (first or joined)
                if tokens > 1 and elapsed > 0:
                    metrics.tokens_per_second.observe((tokens - 1) / elapsed)
            if question is not None:
                question.outcome = outcome
