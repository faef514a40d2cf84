"""The fast path warms up before taking questions: compiled decoding (COMPILE=on, inductor on
the CPU) gives the plain path's answers, keeps its kernels on disk for the next start, and a
warm-up that fails falls back (eager decoding, then the plain path) with one log line.

CPU, float32, the tiny model with random weights, greedy; the reference is the plain path
alone, as in test_continuous_batching.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from inference.continuous import SlotDecoder
from tests.test_continuous_batching import _engine, _plain_alone, _requests, _settings, _text, tiny_dir

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
__all__ = ["tiny_dir"]  # the module-scoped model fixture, shared


@pytest.fixture
def compile_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # restored after the test
    return tmp_path / "compile-cache"


async def test_compiled_decoding_warms_up_at_start_and_answers_as_the_plain_path(
    tiny_dir: Path, compile_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    requests = _requests([24, 16, 20, 12, 18, 22])
    expected = await _plain_alone(tiny_dir, requests)
    caplog.set_level("INFO", logger="inference")
    settings = _settings(tiny_dir, compile="on", compile_cache_dir=str(compile_cache))
    async with _engine(settings) as fast:  # returns once warmed up
        assert "warmed up in" in caplog.text
        assert "compiled, compile cache" in caplog.text
        assert fast._slots is not None and fast._slots.compile
        kept = await asyncio.to_thread(lambda: any(compile_cache.rglob("*")))
        assert kept, "compiled kernels are kept in COMPILE_CACHE_DIR"
        assert [await _text(fast, request) for request in requests] == expected
        together = await asyncio.gather(*(_text(fast, request) for request in requests))
        assert list(together) == expected


async def test_when_compiling_fails_it_decodes_eagerly(
    tiny_dir: Path, compile_cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_compile(function: object, **options: object) -> object:
        def compiled(*args: object) -> object:
            raise RuntimeError("no C++ compiler found (simulated)")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    requests = _requests([16, 16, 16, 16, 16, 16])
    expected = await _plain_alone(tiny_dir, requests)
    settings = _settings(tiny_dir, compile="on", compile_cache_dir=str(compile_cache))
    async with _engine(settings) as fast:
        assert "compiling the decode step failed, decoding without it" in caplog.text
        assert fast._slots is not None and not fast._slots.compile
        assert await asyncio.gather(*(_text(fast, request) for request in requests)) == expected


async def test_when_the_fast_path_fails_to_warm_up_it_uses_the_plain_path(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_step(self: SlotDecoder, tokens: object) -> object:
        raise RuntimeError("an unsupported layer (simulated)")

    monkeypatch.setattr(SlotDecoder, "step", broken_step)
    requests = _requests([16, 16, 16, 16, 16, 16])
    expected = await _plain_alone(tiny_dir, requests)
    async with _engine(_settings(tiny_dir)) as engine:
        assert "fast path off after its warm-up failed, using the plain path" in caplog.text
        assert engine._slots is None
        assert [await _text(engine, request) for request in requests] == expected


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
