"""Starting up: a model that cannot be loaded stops the bot with one clear line (exit 1);
questions asked while the model loads and warms up are told so, then answered; the bot's
status says how far the start is."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.answering import STARTING_UP
from bot.client import STARTING_UP_STATUS
from bot.texts import starting_up_status
from tests.bot_process import answer_in_thread, new_channel, png, start_bot, stop
from tests.fake_discord import FakeDiscord
from tests.synthetic_images import bar_chart
from tests.tiny_model import copy_with_load_gate


@pytest.mark.asyncio
async def test_a_model_that_cannot_be_loaded_stops_the_bot_with_one_clear_line(tmp_path: Path) -> None:
    async with FakeDiscord(heartbeat_interval_ms=1000) as fake:
        bot = await start_bot(fake, tmp_path / "no-such-model", tmp_path, wait_for_model=False, DEVICE="cpu")
        try:
            assert await asyncio.wait_for(bot.process.wait(), 60) == 1
        finally:
            await stop(bot)
    assert "the model could not be started, stopping: cannot load model" in bot.log
    assert "no-such-model" in bot.log
    assert "Traceback" not in bot.log


@pytest.mark.asyncio
async def test_questions_asked_while_the_model_starts_say_so_then_get_their_answer(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "load-gate"
    model = copy_with_load_gate(tiny_model_dir, tmp_path / "slow-model", gate)
    async with FakeDiscord(heartbeat_interval_ms=1000) as fake:
        bot = await start_bot(fake, model, tmp_path, wait_for_model=False)  # the model is loading
        try:
            # Idle, "Starting up", in the member list.
            assert fake.bot_presence["status"] == "idle"
            assert fake.bot_presence["activities"][0]["state"] == STARTING_UP_STATUS
            channel = await new_channel(fake, "early")
            question = await fake.send_message(fake.alice, channel, "Say hello", mention_bot=True)
            await fake.invoke_command(
                fake.bob, channel, "ask", {"question": "count images"}, {"image": png(bar_chart())}
            )
            thread = int(question["id"])
            for place in (thread, channel):
                status = await fake.wait_for_bot_message(place, lambda m: m["content"] == STARTING_UP, 30)
                assert status["components"]  # the Cancel button is there already
            await asyncio.to_thread(gate.write_bytes, b"go")  # the model finishes loading
            await answer_in_thread(fake, question, "How are you today?")
            slash = await fake.wait_for_bot_message(channel, lambda m: m["content"] == "I see 1 images.")
            assert slash["id"] == status["id"]  # the status was replaced by the answer
            assert [m["content"] for m in fake.bot_messages_in(thread)] == [
                "Hello there, my friend! How are you today?"
            ]
            await fake.wait_for(
                lambda: fake.bot_presence.get("status") == "online" and not fake.bot_presence["activities"],
                description="the bot shown online once the model is ready",
            )
            # On the way, the status said how far the start was.
            shown = [(u.get("activities") or [{}])[0].get("state") for u in fake.presence_updates]
            assert starting_up_status("warming up") in shown
            assert shown.index(starting_up_status("warming up")) < shown.index(None)
        finally:
            await stop(bot)
