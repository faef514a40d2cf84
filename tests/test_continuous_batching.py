"""The engine's answers are HF ``generate``'s on the same native model, token for token.

CPU, float32, the tiny native Phi-3-vision with random weights (no steering), greedy. The
reference for every request is ``model.generate`` on the engine's own model object, one
request at a time; the engine runs requests alone, together, joining a running batch,
leaving it early, cancelled midway, with long prompts prefilled in chunks, and across the
LongRoPE switch at 4,096 positions. The answers are compared as the text their tokens
decode to, and by token count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from inference import Conversation, GenerationRequest, InferenceSettings, Turn
from inference.kv_cache import SlotCache
from inference.local_engine import LocalEngine
from inference.prompt_inputs import PromptEncoder
from tests.tiny_model import copy_with_longrope

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SWITCH = 4096  # Phi-3-vision's original_max_position_embeddings


def image(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def conversation(images: int, turns: int = 1, words: int = 0) -> Conversation:
    """``turns`` user turns (assistant answers between), ``images`` spread over them."""
    pictures = [image(40 + 13 * n, 30 + 7 * n, n) for n in range(images)]
    result: list[Turn] = []
    for turn in range(turns):
        mine = tuple(pictures[turn::turns])
        text = f"question {turn}: what is here?" + " and more" * words
        result.append(Turn("user", text, mine))
        if turn < turns - 1:
            result.append(Turn("assistant", f"answer {turn}"))
    return Conversation(tuple(result))


def settings_for(directory: Path, **extra: object) -> InferenceSettings:
    values: dict[str, object] = {
        "model_id": str(directory),
        "device": "cpu",
        "dtype": "float32",
        "max_new_tokens": 32,
        "max_batch_size": 4,
        "max_batch_tokens": 1024,  # 4 slots x 256 tokens
        "compile": "off",
        **extra,
    }
    return InferenceSettings(**values)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(settings: InferenceSettings) -> AsyncIterator[LocalEngine]:
    engine = LocalEngine(settings)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


def ask(conversation: Conversation, max_new_tokens: int) -> GenerationRequest:
    return GenerationRequest(conversation, max_new_tokens=max_new_tokens)


async def answer(engine: LocalEngine, request: GenerationRequest) -> str:
    return "".join([piece async for piece in engine.stream(request)])


def generate(engine: LocalEngine, request: GenerationRequest) -> str:
    """HF ``generate`` on the engine's own model, the request alone (the oracle)."""
    loaded = engine.loaded
    assert loaded is not None
    max_new_tokens = request.max_new_tokens or engine.settings.max_new_tokens
    inputs = PromptEncoder(loaded.processor, engine.settings, None).encode(request, max_new_tokens)
    tokenizer = loaded.tokenizer
    with torch.inference_mode():
        output = loaded.model.generate(
            **inputs,
            attention_mask=torch.ones_like(inputs["input_ids"]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=loaded.stop_token_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
    tokens = [t for t in output[0, inputs["input_ids"].shape[1] :].tolist() if t not in loaded.stop_token_ids]
    return tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def tokens_of(engine: LocalEngine, text: str) -> int:
    assert engine.loaded is not None
    return len(engine.loaded.tokenizer(text, add_special_tokens=False).input_ids)


SHAPES = [(0, 1), (1, 1), (2, 1), (3, 1), (0, 3), (3, 2)]  # (images, turns)


def requests(limits: list[int]) -> list[GenerationRequest]:
    return [ask(conversation(i, t), limit) for (i, t), limit in zip(SHAPES, limits, strict=True)]


@pytest.fixture(scope="module")
def longrope_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with Phi-3-vision's rope scaling ("su"), switching at 4,096 positions."""
    return copy_with_longrope(tiny_model_dir, tmp_path_factory.mktemp("longrope") / "tiny", SWITCH)


async def test_alone_and_together_the_same_tokens_as_generate(tiny_model_dir: Path) -> None:
    asked = requests([20, 14, 18, 9, 16, 12])
    async with running(settings_for(tiny_model_dir)) as engine:
        alone = [await answer(engine, request) for request in asked]
        expected = [generate(engine, request) for request in asked]
        assert alone == expected
        assert all(expected) and engine.joined_running == 0
        # All six at once: four slots; the other two take slots as answers end.
        together = await asyncio.gather(*(answer(engine, request) for request in asked))
        assert list(together) == expected


async def test_requests_join_and_leave_a_running_batch(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="inference")
    long = ask(conversation(1, 2), 60)
    others = requests([5, 17, 9, 3, 12, 7])
    async with running(settings_for(tiny_model_dir)) as engine:
        stream = engine.stream(long)
        head = await anext(stream)  # the long answer is decoding
        joiners = [asyncio.create_task(answer(engine, request)) for request in others]
        rest = "".join([piece async for piece in stream])
        answers = await asyncio.gather(*joiners)
        assert engine.joined_running >= 3
        assert [head + rest, *answers] == [generate(engine, r) for r in [long, *others]]
    assert "joined a running batch" in caplog.text


async def test_one_cancelled_midway_while_the_others_finish(tiny_model_dir: Path) -> None:
    asked = requests([24, 30, 18, 22, 26, 20])
    async with running(settings_for(tiny_model_dir)) as engine:
        leaving = engine.stream(ask(conversation(1), 200))
        first = await anext(leaving)
        tasks = [asyncio.create_task(answer(engine, request)) for request in asked]
        second = await anext(leaving)
        await leaving.aclose()  # midway: the others go on in its slot's absence
        answers = await asyncio.gather(*tasks)
        assert answers == [generate(engine, request) for request in asked]
        assert generate(engine, ask(conversation(1), 200)).startswith(first + second)


@pytest.mark.parametrize("pictures", [0, 3], ids=["text", "pictures, prefilled as on CUDA"])
async def test_a_long_joiner_is_prefilled_in_chunks_and_the_others_are_unchanged(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture, pictures: int
) -> None:
    caplog.set_level(logging.INFO, logger="inference")
    settings = settings_for(tiny_model_dir, prefill_chunk_tokens=8, max_batch_tokens=2048)
    streaming = [ask(conversation(0), 40), ask(conversation(1), 36)]
    joiner = ask(conversation(pictures, 3, words=12), 20)  # well over 8 prompt tokens
    async with running(settings) as engine:
        assert engine.core is not None
        engine.core.prefill_beside = False  # type: ignore[attr-defined]  # CUDA's way: in the step loop
        streams = [engine.stream(request) for request in streaming]
        heads = [await anext(stream) for stream in streams]
        late = asyncio.create_task(answer(engine, joiner))

        async def rest(head: str, stream: AsyncIterator[str]) -> str:
            return head + "".join([piece async for piece in stream])

        answers = await asyncio.gather(*(rest(h, s) for h, s in zip(heads, streams, strict=True)))
        assert [*answers, await late] == [generate(engine, r) for r in [*streaming, joiner]]
    assert "chunks between decode steps" in caplog.text


def hold_the_vision_tower(engine: LocalEngine, monkeypatch: pytest.MonkeyPatch) -> tuple[
    threading.Event, threading.Event
]:
    """(entered, release): pictures wait in the vision tower until ``release``."""
    entered, release = threading.Event(), threading.Event()
    assert engine.loaded is not None
    tower = engine.loaded.model.model.vision_embed_tokens
    original = tower.forward

    def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(60)
        return original(*args, **kwargs)

    monkeypatch.setattr(tower, "forward", held)
    return entered, release


async def test_answers_stream_on_while_a_joiners_pictures_are_in_the_vision_tower(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    streaming, picture = ask(conversation(0), 30), ask(conversation(1), 12)
    async with running(settings_for(tiny_model_dir)) as engine:
        entered, release = hold_the_vision_tower(engine, monkeypatch)
        stream = engine.stream(streaming)
        head = await anext(stream)
        joiner = asyncio.create_task(answer(engine, picture))
        assert await asyncio.to_thread(entered.wait, 30)
        # The whole answer streams while the joiner's picture is held in the vision tower.
        rest = await asyncio.wait_for(_rest(stream), 30)
        assert not joiner.done()
        release.set()
        assert [head + rest, await joiner] == [generate(engine, r) for r in (streaming, picture)]


def hold_prefills_on_the_image_thread(engine: LocalEngine, monkeypatch: pytest.MonkeyPatch) -> tuple[
    threading.Event, threading.Event, list[int]
]:
    """(entered, release, lengths): a prompt prefilled on the image encoder's thread waits in
    the model's final norm until ``release``; ``lengths``: the prompts it prefilled there."""
    entered, release, lengths = threading.Event(), threading.Event(), []
    assert engine.loaded is not None
    norm = engine.loaded.model.model.norm
    original = norm.forward

    def held(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[1] > 1 and threading.current_thread().name.startswith("inference-images"):
            lengths.append(hidden.shape[1])
            entered.set()
            release.wait(60)
        return original(hidden)

    monkeypatch.setattr(norm, "forward", held)
    return entered, release, lengths


async def test_on_the_cpu_a_picture_question_is_prefilled_beside_the_decode_steps(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The step loop only decodes: a whole answer streams while a picture question's prompt
    is held in its prefill, which runs on the image encoder's thread."""
    caplog.set_level(logging.INFO, logger="inference")
    streaming, picture = ask(conversation(0), 30), ask(conversation(1, words=30), 12)
    longer = ask(conversation(0, words=1), 200)  # still decoding when the picture question joins
    async with running(settings_for(tiny_model_dir)) as engine:
        entered, release, lengths = hold_prefills_on_the_image_thread(engine, monkeypatch)
        stream = engine.stream(streaming)
        head = await anext(stream)
        beside = asyncio.create_task(answer(engine, longer))
        joiner = asyncio.create_task(answer(engine, picture))
        assert await asyncio.to_thread(entered.wait, 30)
        rest = await asyncio.wait_for(_rest(stream), 30)
        assert not joiner.done()
        release.set()
        answers = [head + rest, await joiner, await beside]
        assert answers == [generate(engine, r) for r in (streaming, picture, longer)]
        assert engine.loaded is not None
        encoder = PromptEncoder(engine.loaded.processor, engine.settings, None)
        assert lengths == [encoder.encode(picture, 12)["input_ids"].shape[1]]  # whole, in one forward
    assert "prefilled beside their decode steps" in caplog.text


async def test_a_picture_question_withdrawn_while_its_pictures_are_read_is_never_prefilled(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(settings_for(tiny_model_dir)) as engine:
        _, never_held, prefilled = hold_prefills_on_the_image_thread(engine, monkeypatch)
        never_held.set()  # only counted
        entered, release = hold_the_vision_tower(engine, monkeypatch)
        leaving = engine.stream(ask(conversation(1), 12))
        waiting = asyncio.create_task(anext(leaving))
        assert await asyncio.to_thread(entered.wait, 30)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        await leaving.aclose()  # the asker leaves while its picture is in the vision tower
        release.set()
        # Every slot serves again, the withdrawn question's included, and answers as generate.
        asked = [ask(conversation(n % 2, words=n), 10) for n in range(4)]
        assert list(await asyncio.gather(*(answer(engine, r) for r in asked))) == [
            generate(engine, r) for r in asked
        ]
        assert len(prefilled) == 2  # the two picture questions after it; not the withdrawn one


class _SecondTokenWaits:
    """A steering whose rows choose their second token only once ``asked_on`` is set (or 10 s
    went by: ``released`` says which)."""

    def __init__(self) -> None:
        self.asked_on = threading.Event()
        self.released: list[bool] = []

    def begin(self, request: GenerationRequest, prompt_ids: list[int]) -> _SecondTokenWaits:
        return self

    def steer(self, step: int, logits: torch.Tensor) -> None:
        if step == 1:
            self.released.append(self.asked_on.wait(10))


@pytest.mark.parametrize("pictures", [0, 1], ids=["text", "a picture"])
async def test_an_answers_first_piece_reaches_its_asker_before_its_second_token_is_chosen(
    tiny_model_dir: Path, pictures: int
) -> None:
    steering = _SecondTokenWaits()
    engine = LocalEngine(settings_for(tiny_model_dir), steering=steering)  # type: ignore[arg-type]
    await engine.start()
    try:
        stream = engine.stream(ask(conversation(pictures), 8))
        first = await asyncio.wait_for(anext(stream), 30)
        steering.asked_on.set()
        rest = await _rest(stream)
    finally:
        await engine.close()
    assert first and rest and steering.released == [True]


async def _rest(stream: AsyncIterator[str]) -> str:
    return "".join([piece async for piece in stream])


async def test_one_busy_row_among_sixteen_slots_reads_one_rows_positions(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[tuple[int, ...]] = []

    def recording(read: Any) -> Any:
        def recording_read(*args: Any) -> Any:
            keys, values = read(*args)
            reads.append(tuple(keys.shape))
            return keys, values

        return recording_read

    # What decode steps read of the cache: gathered rows, or consecutive slots as a view.
    monkeypatch.setattr(SlotCache, "read", recording(SlotCache.read))
    monkeypatch.setattr(SlotCache, "rows_of", staticmethod(recording(SlotCache.rows_of)))
    settings = settings_for(tiny_model_dir, max_batch_size=16, max_batch_tokens=16 * 256)
    request = ask(conversation(1), 10)
    async with running(settings) as engine:
        reads.clear()  # the warm-up's
        text = await answer(engine, request)
        assert engine.loaded is not None and engine.core is not None
        assert engine.core.shape == (16, 256)  # type: ignore[attr-defined]
        prompt = (
            PromptEncoder(engine.loaded.processor, settings, None).encode(request, 10)["input_ids"].shape[1]
        )
        heads = engine.loaded.model.config.num_attention_heads
        # Each decode step reads one row over the positions it has filled, in every layer.
        steps = tokens_of(engine, text)  # 10 tokens: the first from the prefill, 9 decoded
        assert len(reads) == (steps - 1) * engine.loaded.model.config.num_hidden_layers
        assert {shape[:2] for shape in reads} == {(1, heads)}
        assert sorted({shape[2] for shape in reads}) == list(range(prompt + 1, prompt + steps))
        assert engine.core.runner.last_decode_shape == (1, prompt + steps - 1)  # type: ignore[attr-defined]


async def answer_in_slots_apart(engine: LocalEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Questions in slots 0, 1, 2 (the middle answer ends first, and the other two decode in
    slots 0 and 2) answer as ``generate`` does, each decode step reading views of its runs of
    consecutive slots, never a gather of the busy rows' cache."""
    gathered: list[tuple[int, ...]] = []
    views: list[tuple[int, int]] = []  # (first slot, rows) of each view
    read, rows_of = SlotCache.read, SlotCache.rows_of

    def recording_read(self: SlotCache, layer: int, rows: torch.Tensor, length: int) -> Any:
        gathered.append(tuple(rows.tolist()))
        return read(self, layer, rows, length)

    def recording_rows_of(keys: torch.Tensor, values: torch.Tensor, first: int, rows: int, *rest: int) -> Any:
        views.append((first, rows))
        return rows_of(keys, values, first, rows, *rest)

    monkeypatch.setattr(SlotCache, "read", recording_read)
    monkeypatch.setattr(SlotCache, "rows_of", staticmethod(recording_rows_of))
    asked = [ask(conversation(0), 20), ask(conversation(0, words=3), 3), ask(conversation(0, words=6), 20)]
    core = engine.core
    assert core is not None
    add, first = core.add, threading.Event()

    def add_once_all_are_in_line(job: Any) -> Any:
        # All three start in one step: the first admission waits until the other two are in
        # line (the front has no event for that; a bounded wait on its public count).
        if not first.is_set():
            first.set()
            deadline = time.monotonic() + 30
            while engine.waiting < len(asked) - 1 and time.monotonic() < deadline:
                time.sleep(0.001)
        return add(job)

    monkeypatch.setattr(core, "add", add_once_all_are_in_line)
    answers = await asyncio.gather(*(answer(engine, request) for request in asked))
    assert list(answers) == [generate(engine, request) for request in asked]
    assert not gathered
    assert (0, 3) in views  # all three together: one view of three slots
    assert (0, 1) in views and (2, 1) in views  # slots 0 and 2: a view of each


async def test_rows_in_slots_apart_read_their_own_slots_not_a_gather(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(settings_for(tiny_model_dir)) as engine:  # eager; compiled: test_warm_up.py
        await answer_in_slots_apart(engine, monkeypatch)


async def test_across_the_longrope_switch(longrope_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Prompts that cross 4,096 positions while decoding, and one already past them, alone,
    together, and joining a running answer in chunks."""
    caplog.set_level(logging.INFO, logger="inference")
    settings = settings_for(
        longrope_dir, max_batch_tokens=4 * 4352, max_new_tokens=24, prefill_chunk_tokens=512
    )
    async with running(settings) as engine:
        assert engine.loaded is not None
        encoder = PromptEncoder(engine.loaded.processor, settings, None)

        def near_the_switch(images: int, past: int) -> GenerationRequest:
            """A question whose prompt is SWITCH + ``past`` tokens long (``past`` < 0: before)."""
            words = 0
            while True:
                request = ask(conversation(images, words=words), 24)
                length = encoder.encode(request, 24)["input_ids"].shape[1]
                if length >= SWITCH + past:
                    return request
                words += max(1, (SWITCH + past - length) // 3)

        crossing = near_the_switch(1, -10)  # crosses after ten tokens
        past = near_the_switch(0, 5)
        short = ask(conversation(2), 24)
        asked = [crossing, past, short]
        expected = [generate(engine, request) for request in asked]
        assert [await answer(engine, request) for request in asked] == expected
        # Together: a short row beside long ones keeps its own (short) factors.
        assert list(await asyncio.gather(*(answer(engine, request) for request in asked))) == expected
        # Past the switch, joining a running answer: chunks of 512 whose factors are the whole
        # prompt's (long), as one forward over the prompt has them.
        caplog.clear()
        stream = engine.stream(short)
        head = await anext(stream)
        late = asyncio.create_task(answer(engine, past))
        rest = "".join([piece async for piece in stream])
        assert [head + rest, await late] == [expected[2], expected[1]]
        assert "chunks between decode steps" in caplog.text
