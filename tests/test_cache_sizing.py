"""The KV cache fits the memory there is: MAX_BATCH_TOKENS=auto sizes it from the device's
free-memory figure (``inference.memory.device_memory``, which these tests replace: the CPU
has no such figure), a question that needs more than it holds is refused as too long, a
full cache makes questions wait their turn, and an out-of-memory re-makes it smaller while
the bot goes on serving.

CPU, float32, the tiny native model (1,024 KV bytes per token), scripted replies.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from inference import Conversation, GenerationRequest, InferenceSettings
from inference import memory as memory_module
from inference.engine import GenerationError, ModelLoadError, PromptTooLong
from inference.local_engine import LocalEngine
from inference.runner import round_up
from tests.conftest import SCRIPT
from tests.scripted import ScriptedReplies

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

KV_BYTES_PER_TOKEN = 2 * 2 * 4 * 16 * 4  # tiny model: layers x (K, V) x kv heads x head dim x fp32
HELLO = "Hello there, my friend! How are you today?"
GIB = 2**30


def settings_for(model_dir: Path, **changes: object) -> InferenceSettings:
    base = InferenceSettings(model_id=str(model_dir), device="cpu", max_new_tokens=300)
    return replace(base, **changes)  # type: ignore[arg-type]


@asynccontextmanager
async def running(settings: InferenceSettings) -> AsyncIterator[LocalEngine]:
    engine = LocalEngine(settings, steering=ScriptedReplies(SCRIPT, settings.model_id))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


def ask(text: str, **kwargs: object) -> GenerationRequest:
    picture = Image.new("RGB", (64, 48), "red")
    return GenerationRequest(Conversation.single(text, [picture]), **kwargs)  # type: ignore[arg-type]


async def answer(engine: LocalEngine, request: GenerationRequest) -> str:
    return "".join([piece async for piece in engine.stream(request)])


def memory_figure(monkeypatch: pytest.MonkeyPatch, free: int, total: int) -> list[torch.device]:
    """The device reports ``free`` of ``total`` bytes; returns the devices it was asked about."""
    asked: list[torch.device] = []

    def device_memory(device: torch.device) -> tuple[int, int]:
        asked.append(device)
        return free, total

    monkeypatch.setattr(memory_module, "device_memory", device_memory)
    return asked


def slot_length(engine: LocalEngine) -> int:
    """The picture question's prompt and MAX_NEW_TOKENS answer, in whole 64-token buckets (eager)."""
    return round_up(engine.core.usual_need, 64)  # type: ignore[union-attr]


def figure_for(slots: float, total: int, length: int = 384, fraction: float = 0.9) -> int:
    """The free bytes the device reports (of ``total``) for a cache of ``slots`` slots of
    ``length`` tokens, after the warm-up forward: its own cache (one slot) is still held
    then, and counted as free."""
    held = length * KV_BYTES_PER_TOKEN
    in_use = int(fraction * total) + held - int(slots * length) * KV_BYTES_PER_TOKEN
    return total - in_use


@pytest.mark.parametrize("slots", [2, 5])
async def test_auto_sizes_the_cache_from_the_free_memory_figure(
    slots: int, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="inference")
    total = GIB
    length = 384  # the tiny picture question (about 30 tokens) + 300, rounded up
    free = figure_for(slots + 0.5, total, length)
    asked = memory_figure(monkeypatch, free, total)
    async with running(settings_for(tiny_model_dir)) as engine:
        assert slot_length(engine) == length
        held = length * KV_BYTES_PER_TOKEN
        tokens = (int(0.9 * total) - (total - free - held)) // KV_BYTES_PER_TOKEN
        assert engine.core.max_batch_tokens == tokens  # type: ignore[union-attr]
        assert engine.core.shape == (slots, length)  # type: ignore[union-attr]
        assert f"= {tokens} tokens at {KV_BYTES_PER_TOKEN} bytes/token" in caplog.text
        assert f"{slots} slot(s) x {length} tokens" in caplog.text
        assert asked and all(device.type == "cpu" for device in asked)
        assert await answer(engine, ask("Say hello")) == HELLO


async def test_auto_takes_at_most_max_batch_size_slots_and_honours_gpu_memory_fraction(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    total = GIB
    memory_figure(monkeypatch, figure_for(20, total, fraction=0.6), total)
    settings = settings_for(tiny_model_dir, max_batch_size=3, gpu_memory_fraction=0.6)
    async with running(settings) as engine:
        assert engine.core.max_batch_tokens == 20 * 384  # type: ignore[union-attr]
        assert engine.core.shape == (3, 384)  # type: ignore[union-attr]


async def test_auto_without_a_memory_figure_is_the_old_default_and_a_number_is_that_number(
    tiny_model_dir: Path,
) -> None:
    async with running(settings_for(tiny_model_dir, max_new_tokens=32)) as engine:  # the CPU: no figure
        assert engine.core.max_batch_tokens == 16384  # type: ignore[union-attr]
        assert engine.core.shape == (8, 2048)  # type: ignore[union-attr]
    async with running(settings_for(tiny_model_dir, max_new_tokens=32, max_batch_tokens=1024)) as engine:
        assert engine.core.shape == (8, 128)  # type: ignore[union-attr]


def test_the_setting_reads_auto_or_a_number() -> None:
    assert InferenceSettings.from_env({}).max_batch_tokens is None
    assert InferenceSettings.from_env({"MAX_BATCH_TOKENS": "auto"}).max_batch_tokens is None
    assert InferenceSettings.from_env({"MAX_BATCH_TOKENS": "7168"}).max_batch_tokens == 7168
    assert InferenceSettings.from_env({"GPU_MEMORY_FRACTION": "0.5"}).gpu_memory_fraction == 0.5
    from inference.settings import SettingsError

    with pytest.raises(SettingsError, match="MAX_BATCH_TOKENS must be a whole number"):
        InferenceSettings.from_env({"MAX_BATCH_TOKENS": "lots"})
    with pytest.raises(SettingsError, match="GPU_MEMORY_FRACTION must be above 0 and at most 1"):
        InferenceSettings.from_env({"GPU_MEMORY_FRACTION": "1.5"})


async def test_too_little_memory_for_any_cache_fails_the_start_with_one_line(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory_figure(monkeypatch, GIB // 20, GIB)  # 95% in use
    engine = LocalEngine(settings_for(tiny_model_dir))
    with pytest.raises(ModelLoadError) as caught:
        await engine.start()
    message = str(caught.value)
    assert "tokens of KV cache fit in GPU_MEMORY_FRACTION=0.9" in message and "\n" not in message
    assert "QUANTIZE=4bit" in message
    await engine.close()


async def test_a_question_that_can_never_fit_the_cache_is_refused_as_too_long(tiny_model_dir: Path) -> None:
    settings = settings_for(tiny_model_dir, max_new_tokens=32, max_batch_tokens=512)
    async with running(settings) as engine:
        with pytest.raises(PromptTooLong, match="more than the 512 tokens of memory for answers"):
            await answer(engine, ask("Say hello", max_new_tokens=600))
        assert await answer(engine, ask("Say hello")) == HELLO  # and the next is answered


async def test_when_every_slot_is_taken_questions_wait_their_turn_and_are_answered(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    total = GIB
    memory_figure(monkeypatch, figure_for(1.5, total), total)  # memory for one slot and a half
    async with running(settings_for(tiny_model_dir)) as engine:
        assert engine.core.shape == (1, 384)  # type: ignore[union-attr]
        places: dict[int, list[int]] = {n: [] for n in range(3)}

        def teller(n: int) -> Callable[[int], None]:
            return places[n].append

        answers = await asyncio.gather(
            *(answer(engine, replace(ask("Say hello"), on_queue_position=teller(n))) for n in range(3))
        )
        assert answers == [HELLO] * 3
        assert sorted(max(p, default=0) for p in places.values()) == [0, 1, 2]


async def test_an_out_of_memory_answers_its_question_with_the_error_and_re_makes_the_cache_smaller(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="inference")
    settings = settings_for(tiny_model_dir, max_new_tokens=32, max_batch_size=4, max_batch_tokens=1024)
    async with running(settings) as engine:
        assert engine.core.shape == (4, 256)  # type: ignore[union-attr]
        with pytest.raises(GenerationError) as caught:
            await answer(engine, ask("this is too big for the gpu"))
        assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
        assert "the KV cache was re-made smaller: 1024 -> 768 tokens (4 slot(s) x 192 tokens)" in caplog.text
        assert engine.core.shape == (4, 192)  # type: ignore[union-attr]
        assert await answer(engine, ask("Say hello")) == HELLO


async def test_an_out_of_memory_beside_a_running_answer_lets_it_finish_before_the_cache_shrinks(
    tiny_model_dir: Path,
) -> None:
    settings = settings_for(tiny_model_dir, max_new_tokens=32, max_batch_size=4, max_batch_tokens=1024)
    async with running(settings) as engine:
        story = engine.stream(ask("slow story", max_new_tokens=20))
        first = await anext(story)  # it is decoding
        with pytest.raises(GenerationError):
            await answer(engine, ask("this is too big for the gpu"))
        hello = asyncio.ensure_future(answer(engine, ask("Say hello")))  # waits for the shrink
        rest = "".join([piece async for piece in story])
        assert (first + rest).startswith("once upon a time")
        assert await hello == HELLO
        assert engine.core.shape == (4, 192)  # type: ignore[union-attr]


def test_a_padded_decode_step_repeats_a_busy_row_and_changes_nothing_else(tiny_model_dir: Path) -> None:
    """CUDA graphs round a step's rows up to a bucket (emulated here on the CPU): the padding
    rows repeat the last busy row, so the cache needs no scratch row of its own."""
    from inference.kv_cache import SlotCache
    from inference.loading import load_model
    from inference.runner import ModelRunner, row_buckets

    loaded = load_model(settings_for(tiny_model_dir))
    config = loaded.model.config

    def runner() -> ModelRunner:
        cache = SlotCache.for_model(config, slots=4, length=64, device=loaded.device, dtype=loaded.dtype)
        made = ModelRunner(loaded.model, cache, device=loaded.device, dtype=loaded.dtype, pad_id=0)
        for slot, length in enumerate((5, 9, 7)):
            ids = torch.arange(20 + slot, 20 + slot + length)[None]
            made.prefill(slot, made.embed_prompt({"input_ids": ids}), 0)
        return made

    exact, padded = runner(), runner()
    # As with CUDA graphs (gathered rows, not a view of consecutive ones): 3 busy rows run as 4.
    padded._row_buckets, padded.compile = row_buckets(4), True
    assert padded.decode_shape(3, 10) == (4, 10)
    expected = exact.decode([0, 1, 2], [31, 32, 33])
    got = padded.decode([0, 1, 2], [31, 32, 33])
    assert padded.last_decode_shape == (4, 10) and exact.last_decode_shape == (3, 10)
    torch.testing.assert_close(got, expected)
    for layer in range(config.num_hidden_layers):
        torch.testing.assert_close(padded.cache.keys[layer], exact.cache.keys[layer])
        torch.testing.assert_close(padded.cache.values[layer], exact.cache.values[layer])
        assert not padded.cache.keys[layer][3].any()  # the free slot was not written
