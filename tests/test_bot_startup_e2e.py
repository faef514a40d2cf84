"""Starting the bot with a model that cannot be loaded: one clear log line, exit code 1."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.bot_process import start_bot, stop
from tests.fake_discord import FakeDiscord


@pytest.mark.asyncio
async def test_a_model_that_cannot_be_loaded_stops_the_bot_with_one_clear_line(tmp_path: Path) -> None:
    async with FakeDiscord(heartbeat_interval_ms=1000) as fake:
        bot = await start_bot(fake, tmp_path / "no-such-model", tmp_path, DEVICE="cpu")
        try:
            assert await asyncio.wait_for(bot.process.wait(), 60) == 1
        finally:
            await stop(bot)
    assert "the model could not be started, stopping: cannot load model" in bot.log
    assert "no-such-model" in bot.log
    assert "Traceback" not in bot.log
