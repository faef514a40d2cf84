"""FAST_PATH=on: the bot answers through the native-Phi-3 generator, on the CPU too."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bot_process import new_channel, png, start_bot, stop
from tests.fake_discord import FakeDiscord
from tests.synthetic_images import bar_chart


@pytest.mark.asyncio
async def test_the_bot_answers_on_the_fast_path(tiny_model_dir: Path, tmp_path: Path) -> None:
    async with FakeDiscord(heartbeat_interval_ms=1000) as fake:
        bot = await start_bot(fake, tiny_model_dir, tmp_path, FAST_PATH="on", MAX_NEW_TOKENS="16")
        try:
            question = await fake.send_message(
                fake.alice,
                await new_channel(fake, "fast"),
                "Tell me a story",
                attachments=[png(bar_chart())],
                mention_bot=True,
            )
            thread = int(question["id"])
            # Unscripted, the tiny model rambles until MAX_NEW_TOKENS: the answer ends with the
            # notice that says so (the fast path reports why its answers end, too).
            answer, told = await fake.wait_for(
                lambda: (m := fake.bot_messages_in(thread))[-1:] and m[-1]["content"].startswith("⚠️") and m,
                timeout=30,
                description="a finished answer",
            )
            assert answer["content"].strip() and not answer["content"].startswith("⚠️")
            assert told["content"].startswith("⚠️ This answer reached the length limit")
            assert "fast path on: native Phi-3" in bot.log
            assert "warmed up in" in bot.log  # before it took the question
        finally:
            await stop(bot)
