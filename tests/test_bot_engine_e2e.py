"""The bot answers through the engine on the native model, warmed up before its first question."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bot_process import new_channel, png, start_bot, stop
from tests.fake_discord import FakeDiscord
from tests.synthetic_images import bar_chart


@pytest.mark.asyncio
async def test_an_unscripted_question_is_answered_by_the_model_itself(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with FakeDiscord(heartbeat_interval_ms=1000) as fake:
        bot = await start_bot(fake, tiny_model_dir, tmp_path, MAX_NEW_TOKENS="16")
        try:
            question = await fake.send_message(
                fake.alice,
                await new_channel(fake, "model"),
                "Tell me a story",
                attachments=[png(bar_chart())],
                mention_bot=True,
            )
            thread = int(question["id"])
            # Unscripted, the tiny model rambles until MAX_NEW_TOKENS; the answer ends when its
            # Cancel button is taken off.
            answer = await fake.wait_for(
                lambda: next((m for m in fake.bot_messages_in(thread) if m["components"] == []), None),
                timeout=30,
                description="a finished answer",
            )
            assert answer["content"].strip() and not answer["content"].startswith("⚠️")
            assert "warmed up in" in bot.log  # before it took the question
            assert "eager decoding" in bot.log  # the CPU's default (COMPILE=auto)
        finally:
            await stop(bot)
