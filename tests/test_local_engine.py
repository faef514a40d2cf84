"""The local engine on the tiny native model: streaming, stopping, limits, cancelling, errors.

Replies are scripted (tests/scripted.py steers the real model's token choice by
tests/conftest.py's SCRIPT); unscripted questions get the random weights' own text.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from inference import (
    Conversation,
    EngineError,
    GenerationError,
    GenerationRequest,
    InferenceSettings,
    Turn,
    build_prompt,
)
from inference.engine import PromptTooLong
from inference.loading import LoadedModel, ModelLoadError, load_model
from inference.local_engine import LocalEngine
from tests.conftest import SCRIPT
from tests.scripted import ScriptedReplies

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def red() -> Image.Image:
    return Image.new("RGB", (64, 48), "red")


def ask(question: str, images: list[Image.Image] | None = None, **kwargs: object) -> GenerationRequest:
    return GenerationRequest(Conversation.single(question, images or []), **kwargs)  # type: ignore[arg-type]


async def collect(engine: LocalEngine, request: GenerationRequest) -> list[str]:
    return [piece async for piece in engine.stream(request)]


@pytest.fixture(scope="module")
def settings(tiny_model_dir: Path) -> InferenceSettings:
    return InferenceSettings(model_id=str(tiny_model_dir), device="cpu", max_new_tokens=64)


def scripted(settings: InferenceSettings, **kwargs: object) -> LocalEngine:
    return LocalEngine(settings, steering=ScriptedReplies(SCRIPT, settings.model_id), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def engine(settings: InferenceSettings) -> AsyncIterator[LocalEngine]:
    engine = scripted(settings)
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture
async def one_at_a_time(settings: InferenceSettings) -> AsyncIterator[LocalEngine]:
    """One answer at a time (MAX_BATCH_SIZE=1): the others wait in line."""
    engine = scripted(replace(settings, max_batch_size=1))
    await engine.start()
    yield engine
    await engine.close()


async def test_answer_streams_in_pieces_and_stops_at_end_of_turn(engine: LocalEngine) -> None:
    pieces = await collect(engine, ask("Say hello", [red()]))
    # The tiny model, like the real one, runs on past <|end|> when only eos stops it.
    assert "".join(pieces) == "Hello there, my friend! How are you today?"
    assert len(pieces) > 1


async def test_text_only_question(engine: LocalEngine) -> None:
    assert "".join(await collect(engine, ask("Say hello"))) == "Hello there, my friend! How are you today?"


async def test_the_model_sees_every_image_of_the_conversation(engine: LocalEngine) -> None:
    conversation = Conversation(
        (
            Turn("user", "What are these?", (red(), red())),
            Turn("assistant", "Two red squares."),
            Turn("user", "count images please", (red(),)),
        )
    )
    text = "".join(await collect(engine, GenerationRequest(conversation)))
    assert text == "I see 3 images."


async def test_max_new_tokens_bounds_an_answer_that_never_ends(engine: LocalEngine) -> None:
    tokenizer = engine.loaded.tokenizer  # type: ignore[union-attr]
    short = "".join(await collect(engine, ask("ramble on", [red()], max_new_tokens=5)))
    longer = "".join(await collect(engine, ask("ramble on", [red()], max_new_tokens=20)))
    assert short and longer.startswith(short)
    assert len(tokenizer(short, add_special_tokens=False).input_ids) <= 6
    assert len(tokenizer(longer, add_special_tokens=False).input_ids) > 10


async def test_each_answer_says_why_it_ended(engine: LocalEngine) -> None:
    ends: list[str] = []
    await collect(engine, ask("ramble on", [red()], max_new_tokens=5, on_end=ends.append))
    await collect(engine, ask("Say hello", [red()], on_end=ends.append))
    together = [ask("ramble on", max_new_tokens=4, on_end=ends.append), ask("Say hello", on_end=ends.append)]
    await asyncio.gather(*(collect(engine, request) for request in together))
    assert ends == ["length", "stop", "length", "stop"]


async def test_greedy_answers_are_repeatable(engine: LocalEngine) -> None:
    first = await collect(engine, ask("ramble on", [red()], max_new_tokens=12))
    second = await collect(engine, ask("ramble on", [red()], max_new_tokens=12))
    assert first == second


async def test_cancelling_the_consumer_stops_the_generation_and_frees_the_worker(engine: LocalEngine) -> None:
    # "slow story" takes 0.05 s a token for 400 tokens: 20 s if nothing stopped it.
    stream = engine.stream(ask("slow story", max_new_tokens=400))
    async with contextlib.aclosing(stream):
        first = await anext(stream)
    assert first
    cancelled_at = time.monotonic()
    assert "".join(await collect(engine, ask("Say hello"))).startswith("Hello")
    assert time.monotonic() - cancelled_at < 5


async def test_cancelling_the_task_stops_the_generation(engine: LocalEngine) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.stream(ask("slow story", max_new_tokens=400)):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    cancelled_at = time.monotonic()
    await collect(engine, ask("Say hello"))
    assert time.monotonic() - cancelled_at < 5


async def test_requests_at_once_each_get_their_own_answer(engine: LocalEngine) -> None:
    answers = await asyncio.gather(
        collect(engine, ask("Say hello")),
        collect(engine, ask("count images", [red(), red()])),
        collect(engine, ask("Say hello")),
    )
    assert ["".join(a) for a in answers] == [
        "Hello there, my friend! How are you today?",
        "I see 2 images.",
        "Hello there, my friend! How are you today?",
    ]


async def test_event_loop_stays_free_during_generation(engine: LocalEngine) -> None:
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await collect(engine, ask("slow story", [red()], max_new_tokens=30))
    stop.set()
    await ticker
    assert len(gaps) > 50
    assert max(gaps) < 0.5


async def test_an_error_in_the_worker_reaches_the_caller_and_the_engine_goes_on(
    settings: InferenceSettings,
) -> None:
    failing = {"on": True}

    def loader(settings: InferenceSettings) -> LoadedModel:
        loaded = load_model(settings)
        embed_prompt = loaded.model.embed_prompt

        def flaky_embed_prompt(*args: object, **kwargs: object) -> object:
            if failing["on"]:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return embed_prompt(*args, **kwargs)

        loaded.model.embed_prompt = flaky_embed_prompt
        return loaded

    engine = scripted(settings, loader=loader)
    await engine.start()
    try:
        with pytest.raises(GenerationError, match="out of memory"):
            await collect(engine, ask("Say hello", [red()]))
        failing["on"] = False
        assert "".join(await collect(engine, ask("Say hello", [red()]))).startswith("Hello")
    finally:
        await engine.close()


async def test_a_model_that_cannot_be_loaded_fails_start(settings: InferenceSettings, tmp_path: Path) -> None:
    engine = LocalEngine(replace(settings, model_id=str(tmp_path / "no-such-model")))
    with pytest.raises(ModelLoadError, match="no-such-model"):
        await engine.start()
    await engine.close()


async def test_a_closed_engine_refuses_requests(settings: InferenceSettings) -> None:
    engine = LocalEngine(settings)
    await engine.start()
    await engine.close()
    with pytest.raises(EngineError):
        await collect(engine, ask("Say hello"))


async def test_waiting_requests_are_told_their_place_in_line(one_at_a_time: LocalEngine) -> None:
    engine = one_at_a_time
    places: dict[str, list[int]] = {"first": [], "second": [], "third": []}
    third_in_line = asyncio.Event()

    def request(name: str, question: str) -> GenerationRequest:
        def tell(place: int) -> None:
            places[name].append(place)
            if name == "third":
                third_in_line.set()

        return GenerationRequest(Conversation.single(question), max_new_tokens=8, on_queue_position=tell)

    first = engine.stream(request("first", "slow story"))
    first_piece = await anext(first)  # the first request is running
    others = asyncio.gather(
        collect(engine, request("second", "Say hello")), collect(engine, request("third", "Say hello"))
    )
    await third_in_line.wait()
    assert first_piece and places["first"][-1] == 0
    assert engine.waiting == 2
    await collect_rest(first)
    await others
    assert places["second"] == [1, 0]
    assert places["third"] == [2, 1, 0]  # it moves up as the line moves


async def collect_rest(stream: AsyncIterator[str]) -> None:
    async for _ in stream:
        pass


async def test_a_request_cancelled_while_waiting_leaves_the_line(one_at_a_time: LocalEngine) -> None:
    engine = one_at_a_time
    places: list[int] = []
    second_in_line = asyncio.Event()

    def tell(place: int) -> None:
        places.append(place)
        second_in_line.set()

    first = engine.stream(ask("slow story", max_new_tokens=8))
    await anext(first)
    waiting = asyncio.create_task(collect(engine, ask("Say hello")))
    behind = asyncio.create_task(
        collect(engine, GenerationRequest(Conversation.single("count images"), on_queue_position=tell))
    )
    await second_in_line.wait()
    assert places == [2]
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert engine.waiting == 1 and places == [2, 1]  # moved up when the one ahead left
    await collect_rest(first)
    assert "".join(await behind) == "I see 0 images."


async def test_oldest_exchanges_are_left_out_to_fit_the_context(settings: InferenceSettings) -> None:
    last_question = Turn("user", "count images", (red(),))
    conversation = Conversation(
        (Turn("user", "What are these?", (red(), red())), Turn("assistant", "Two squares."), last_question)
    )
    probe = scripted(settings)
    await probe.start()
    processor = probe.loaded.processor  # type: ignore[union-attr]
    processor.image_processor.num_crops = 16
    alone = processor(build_prompt(Conversation((last_question,))), [red()], return_tensors="pt")
    await probe.close()
    fits_only_the_last = alone["input_ids"].shape[1] + 10 + 2
    engine = scripted(replace(settings, max_context_tokens=fits_only_the_last))
    await engine.start()
    try:
        text = "".join(await collect(engine, GenerationRequest(conversation, max_new_tokens=10)))
        assert text == "I see 1 images."  # the first two images went with the first exchange
        with pytest.raises(PromptTooLong, match="tokens"):
            await collect(engine, GenerationRequest(conversation, max_new_tokens=fits_only_the_last))
        assert "".join(await collect(engine, ask("Say hello", max_new_tokens=10))).startswith("Hello")
    finally:
        await engine.close()
