"""Continuous batching on the fast path gives each request the plain path's answer alone.

CPU, float32, the tiny model with random weights (unscripted: scripted replies do not apply
on the native path), greedy. The reference for every request is the PLAIN path alone
(FAST_PATH=off, MAX_BATCH_SIZE=1); the fast engine runs requests alone, together, joining a
running batch, leaving it early, cancelled midway, and across the LongRoPE switch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from inference import Conversation, GenerationError, GenerationRequest, InferenceSettings, Turn
from inference.local_engine import LocalEngine
from tests.test_fast_path import _conversation, _image
from tests.tiny_model import build_tiny_model, copy_with_longrope

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ORIGINAL_MAX = 64
SHAPES = [(0, 1), (1, 1), (2, 1), (3, 1), (0, 3), (3, 2)]  # (images, turns)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("continuous") / "tiny", script=[])


@pytest.fixture(scope="module")
def longrope_dir(tiny_dir: Path) -> Path:
    """The same weights with Phi-3-vision's rope scaling ("su"), switching at 64 positions."""
    return copy_with_longrope(tiny_dir, tiny_dir.parent / "tiny-longrope", ORIGINAL_MAX)


def _settings(directory: Path, **extra: object) -> InferenceSettings:
    values: dict[str, object] = {
        "model_id": str(directory),
        "device": "cpu",
        "dtype": "float32",
        "max_new_tokens": 32,
        "max_batch_size": 4,
        "max_batch_tokens": 1024,  # 4 slots x 256 tokens
        "fast_path": "on",
        "compile": "off",
        **extra,
    }
    return InferenceSettings(**values)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def _engine(settings: InferenceSettings) -> AsyncIterator[LocalEngine]:
    engine = LocalEngine(settings)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


def _ask(conversation: Conversation, max_new_tokens: int, **extra: object) -> GenerationRequest:
    return GenerationRequest(conversation, max_new_tokens=max_new_tokens, **extra)  # type: ignore[arg-type]


async def _text(engine: LocalEngine, request: GenerationRequest) -> str:
    return "".join([piece async for piece in engine.stream(request)])


async def _plain_alone(directory: Path, requests: list[GenerationRequest]) -> list[str]:
    async with _engine(_settings(directory, fast_path="off", max_batch_size=1)) as plain:
        assert plain._slots is None
        return [await _text(plain, request) for request in requests]


def _requests(limits: list[int]) -> list[GenerationRequest]:
    pairs = zip(SHAPES, limits, strict=True)
    return [_ask(_conversation(images, turns), limit) for (images, turns), limit in pairs]


async def test_alone_and_together_same_text_as_the_plain_path(tiny_dir: Path) -> None:
    requests = _requests([40, 24, 33, 17, 29, 36])
    expected = await _plain_alone(tiny_dir, requests)
    assert all(expected)
    async with _engine(_settings(tiny_dir)) as fast:
        assert fast._slots is not None
        alone = [await _text(fast, request) for request in requests]
        assert alone == expected
        assert fast.joined_running == 0
        # All six at once: four slots, the other two take slots as rows finish.
        together = await asyncio.gather(*(_text(fast, request) for request in requests))
        assert list(together) == expected
        assert fast._slots.slots == 4


async def test_a_request_joins_a_running_batch(tiny_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    long = _ask(_conversation(1, 2), 200)
    others = [_ask(_conversation(images, turns), 20) for images, turns in ((0, 1), (2, 1), (3, 1))]
    expected = await _plain_alone(tiny_dir, [long, *others])
    positions: list[list[int]] = [[] for _ in others]
    others = [
        _ask(request.conversation, 20, on_queue_position=heard.append)
        for request, heard in zip(others, positions, strict=True)
    ]
    caplog.set_level("INFO", logger="inference")
    async with _engine(_settings(tiny_dir)) as fast:
        stream = fast.stream(long)
        pieces = [await anext(stream)]  # the long one is decoding

        async def rest() -> str:
            return "".join([*pieces, *[piece async for piece in stream]])

        long_task = asyncio.create_task(rest())
        answers = await asyncio.gather(*(_text(fast, request) for request in others))
        assert not long_task.done()  # the short ones joined, finished and left; it goes on
        assert [await long_task, *answers] == expected
        assert fast.joined_running == 3
    assert "request(s) joined a running batch" in caplog.text
    assert all(heard and heard[-1] == 0 for heard in positions)


async def test_one_cancelled_midway_while_the_others_finish(tiny_dir: Path) -> None:
    requests = [_ask(_conversation(images, turns), 48) for images, turns in ((2, 1), (0, 3), (1, 1))]
    expected = await _plain_alone(tiny_dir, requests)
    async with _engine(_settings(tiny_dir, max_batch_size=2, max_batch_tokens=512)) as fast:
        stream = fast.stream(requests[0])
        first = [await anext(stream) for _ in range(3)]
        assert expected[0].startswith("".join(first))
        others = [asyncio.create_task(_text(fast, request)) for request in requests[1:]]
        await asyncio.sleep(0.05)
        await stream.aclose()  # leaves the batch; its slot goes to the third request
        assert await asyncio.gather(*others) == expected[1:]
        assert fast.joined_running >= 1
        # The engine goes on serving, with the same answers.
        assert await _text(fast, requests[0]) == expected[0]


async def test_across_the_longrope_switch(longrope_dir: Path) -> None:
    short = Conversation.single("hi")
    mid = Conversation(
        (Turn("user", "a", (_image(20, 16, 1),)), Turn("assistant", "b"), Turn("user", "what now?"))
    )
    requests = [
        _ask(mid, 90),
        _ask(short, 80),
        _ask(_conversation(0, 1), 70),
        _ask(_conversation(3, 2), 30),  # already past the switch
    ]
    expected = await _plain_alone(longrope_dir, requests)
    async with _engine(_settings(longrope_dir)) as fast:
        stream = fast.stream(requests[0])
        head = await anext(stream)

        async def rest() -> str:
            return head + "".join([piece async for piece in stream])

        first = asyncio.create_task(rest())
        answers = []
        for request in requests[1:]:  # each joins later, so rows cross at different steps
            answers.append(asyncio.create_task(_text(fast, request)))
            await asyncio.sleep(0.01)
        assert [await first, *await asyncio.gather(*answers)] == expected
        assert fast.joined_running >= 1
        # All at once: they are prefilled together, short rows padded beside long ones.
        assert await asyncio.gather(*(_text(fast, request) for request in requests)) == expected


async def test_errors_reach_only_the_affected_requests(tiny_dir: Path) -> None:
    requests = [_ask(_conversation(images, 1), 24) for images in (0, 1, 2)]
    expected = await _plain_alone(tiny_dir, requests)
    async with _engine(_settings(tiny_dir)) as fast:
        decoder = fast._slots
        assert decoder is not None
        prefill, step = decoder.prefill_many, decoder.step
        calls = {"prefill": 0, "step": 0}

        def failing_prefill(prompts: list) -> object:
            calls["prefill"] += 1
            if calls["prefill"] == 2:
                raise RuntimeError("CUDA out of memory (simulated)")
            return prefill(prompts)

        decoder.prefill_many = failing_prefill  # type: ignore[method-assign]
        running = fast.stream(requests[0])
        head = await anext(running)  # decoding; the next request's prefill fails

        async def rest() -> str:
            return head + "".join([piece async for piece in running])

        first = asyncio.create_task(rest())
        with pytest.raises(GenerationError):
            await _text(fast, requests[1])
        assert await _text(fast, requests[2]) == expected[2]  # joins the running batch
        assert await first == expected[0]

        def failing_step(tokens: dict) -> object:
            calls["step"] += 1
            if calls["step"] == 3:
                raise RuntimeError("decode failed (simulated)")
            return step(tokens)

        decoder.prefill_many, decoder.step = prefill, failing_step  # type: ignore[method-assign]
        results = await asyncio.gather(*(_text(fast, r) for r in requests[:2]), return_exceptions=True)
        assert all(isinstance(r, GenerationError) for r in results)
        assert decoder.cache is None or not decoder.slots  # released
        # The worker goes on.
        assert await asyncio.gather(*(_text(fast, r) for r in requests)) == expected
