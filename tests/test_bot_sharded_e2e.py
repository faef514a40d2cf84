"""SHARD_COUNT: the same bot as an auto-sharded client answers as before."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bot_process import answer_in_thread, new_channel, start_bot, stop
from tests.fake_discord import FakeDiscord


@pytest.mark.asyncio
async def test_an_auto_sharded_bot_identifies_with_its_shard_and_answers(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with FakeDiscord(heartbeat_interval_ms=1000) as fake:
        bot = await start_bot(fake, tiny_model_dir, tmp_path, SHARD_COUNT="auto")
        try:
            question = await fake.send_message(
                fake.alice, await new_channel(fake, "sharded"), "Say hello", mention_bot=True
            )
            await answer_in_thread(fake, question, "How are you today?")
            assert fake.identifies[-1]["shard"] == [0, 1]  # Discord's advice, from GET /gateway/bot
        finally:
            await stop(bot)
