"""The soak's checks, short: a few dozen questions from a few users through `python -m bot`
and a fake Discord that fails a share of the bot's calls with 429s and 502s (see bench/soak.py
for the full run, `python -m bench --only soak`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import SoakConfig, soak_with_bot
from tests.bot_process import start_bot, stop
from tests.fake_discord import FakeDiscord


@pytest.mark.asyncio
async def test_a_short_soak_loses_nothing_and_answers_nothing_twice(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = SoakConfig(users=5, questions=30, think_seconds=(0.2, 1.5), failure_rate=0.05, settle_seconds=60)
    async with FakeDiscord(heartbeat_interval_ms=1000) as fake:
        bot = await start_bot(fake, tiny_model_dir, tmp_path)
        try:
            result = await soak_with_bot(fake, bot, config)
        finally:
            await stop(bot)
    assert result["questions"] == 30
    assert result["failures"] == []
    assert sum(result["outcomes"].values()) >= 30
    assert sum(result["injected_failures"].values()) > 0  # Discord did fail
    assert result["heartbeat_gap_s"]["max"] < 2.0  # no heartbeat missed
    for problem in ("Traceback", "Ignoring exception", "Unclosed client session", " object at 0x"):
        assert problem not in bot.log, problem
