"""The engine warms up before taking questions: compiled decoding (COMPILE=on, inductor on the
CPU) runs every decode shape the settings allow at start-up and gives HF ``generate``'s
answers, alone and batched, each row read in its own slot (no gather); keeps its kernels on
disk for the next start; a failing compile falls back to eager decoding with one log line; a
model that cannot run at all fails the start with one line.

CPU, float32, the tiny native model with random weights, greedy.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from inference.engine import ModelLoadError
from inference.runner import ModelRunner
from tests.test_continuous_batching import (
    answer,
    answer_in_slots_apart,
    generate,
    requests,
    running,
    settings_for,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def compile_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # restored after the test
    return tmp_path / "compile-cache"


async def test_compiled_decoding_warms_up_every_shape_and_answers_as_generate(
    tiny_model_dir: Path,
    compile_cache: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level("INFO", logger="inference")
    # Three slots of 256 positions: one row, and any other number of rows (tens of seconds of
    # compiling on a small CPU).
    settings = settings_for(
        tiny_model_dir,
        compile="on",
        compile_cache_dir=str(compile_cache),
        max_batch_size=3,
        max_batch_tokens=3 * 256,
    )
    asked = requests([12, 8, 10, 6, 9, 11])[:3]
    async with running(settings) as engine:  # returns once warmed up
        assert "warmed up in" in caplog.text and "compiled decoding, 3 slot(s) x 256 tokens" in caplog.text
        assert "2 decode shape(s)" in caplog.text  # one row, and any other number (symbolic)
        assert engine.decoding == "compiled"
        kept = await asyncio.to_thread(lambda: any(compile_cache.rglob("*")))
        assert kept, "compiled kernels are kept in COMPILE_CACHE_DIR"
        expected = [generate(engine, request) for request in asked]
        assert [await answer(engine, request) for request in asked] == expected
        assert list(await asyncio.gather(*(answer(engine, request) for request in asked))) == expected
        await answer_in_slots_apart(engine, monkeypatch)


async def test_when_compiling_fails_it_decodes_eagerly(
    tiny_model_dir: Path,
    compile_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken_compile(function: object, **options: object) -> object:
        def compiled(*args: object) -> object:
            raise RuntimeError("no C++ compiler found (simulated)")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    asked = requests([10, 10, 10, 10, 10, 10])
    settings = settings_for(tiny_model_dir, compile="on", compile_cache_dir=str(compile_cache))
    async with running(settings) as engine:
        assert "compiling the decode step failed, decoding without it" in caplog.text
        assert engine.decoding == "eager"
        expected = [generate(engine, request) for request in asked]
        assert list(await asyncio.gather(*(answer(engine, request) for request in asked))) == expected


async def test_a_model_that_cannot_run_fails_the_start_with_one_line(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_run(self: ModelRunner, *args: object) -> object:
        raise RuntimeError("an unsupported layer (simulated)")

    monkeypatch.setattr(ModelRunner, "_run", broken_run)
    with pytest.raises(ModelLoadError, match="the model loaded but does not run: an unsupported layer"):
        async with running(settings_for(tiny_model_dir)):
            pass


def test_compile_cache_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from inference.warm_up import use_compile_cache

    chosen = tmp_path / "chosen"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # torch's own, not a choice
    assert use_compile_cache(str(chosen)) == chosen and chosen.is_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "operator's"))  # set on purpose: wins
    assert use_compile_cache(str(chosen)) == tmp_path / "operator's"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert use_compile_cache(None) == tmp_path / "xdg" / "seebot" / "torch-compile"
