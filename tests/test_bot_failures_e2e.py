"""When things break: the GPU runs out of memory, Discord rate-limits or fails, an
interaction token expires, the model worker dies. What the user sees, and that the bot then
answers the next question (or, with no model left, exits for its supervisor to restart it)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.bot_process import RunningBot, answer_in_thread, new_channel, png, start_bot, stop
from tests.fake_discord import FakeDiscord
from tests.synthetic_images import book_cover

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(heartbeat_interval_ms=1000) as fake:
        yield fake


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bot(
    fake: FakeDiscord, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningBot]:
    bot = await start_bot(fake, tiny_model_dir, tmp_path_factory.mktemp("failures"))
    yield bot
    await stop(bot)


async def test_out_of_gpu_memory_gets_an_error_id_that_is_in_the_log(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    question = await fake.send_message(
        fake.alice, await new_channel(fake, "oom"), "too big for the gpu", mention_bot=True
    )
    reply = await fake.wait_for_bot_message(
        int(question["id"]), lambda m: m["content"].startswith("⚠️"), timeout=30
    )
    match = re.fullmatch(
        r"⚠️ The GPU ran out of memory on this question \(error id `([0-9a-f]{8})`\)\. "
        r"Try fewer or smaller images, or ask again when the bot is less busy\.",
        reply["content"],
    )
    assert match, reply["content"]
    await fake.wait_for(lambda: match.group(1) in bot.log, timeout=10, description="the error id in the log")
    again = await fake.send_message(
        fake.alice, await new_channel(fake, "after-oom"), "Say hello", mention_bot=True
    )
    await answer_in_thread(fake, again, "How are you today?")


async def test_rate_limited_and_failing_edits_are_retried(fake: FakeDiscord, bot: RunningBot) -> None:
    fake.fail_next("PATCH", r"^/channels/\d+/messages/\d+$", 429, count=2, retry_after=0.3)
    fake.fail_next("POST", r"^/channels/\d+/messages$", 502, count=1)
    question = await fake.send_message(
        fake.alice, await new_channel(fake, "flaky"), "take three seconds", mention_bot=True
    )
    answers = await answer_in_thread(fake, question, "done.")
    assert answers[-1]["content"] == "thinking " * 30 + "done."
    statuses = [r.status for r in fake.requests if r.status in (429, 502)]
    assert statuses.count(429) == 2 and statuses.count(502) == 1


async def test_an_expired_interaction_is_answered_in_the_channel(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = await new_channel(fake, "expired")
    fake.fail_next("POST", r"^/webhooks/", 401, count=100, code=50027)
    try:
        await fake.invoke_command(fake.alice, channel, "ocr", {}, {"image": png(book_cover())})
        answer = await fake.wait_for_bot_message(
            channel, lambda m: m["content"].endswith("Maxwell") and not m.get("webhook_id"), timeout=30
        )
    finally:
        fake.stop_failing()
    assert answer["content"] == "ALONE\nMorgan Maxwell"


async def test_without_permission_to_create_threads_the_answer_goes_in_the_channel(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    channel = await new_channel(fake, "no-threads")
    fake.fail_next("POST", r"/threads$", 403, code=50013)
    question = await fake.send_message(fake.alice, channel, "Say hello", mention_bot=True)
    answer = await fake.wait_for_bot_message(channel, lambda m: m["content"].endswith("today?"), timeout=30)
    assert answer["message_reference"]["message_id"] == question["id"]  # a reply to the question
    assert int(question["id"]) not in fake.threads


# Last: it ends the module's bot.
async def test_a_dead_worker_stops_the_bot_with_a_nonzero_exit(fake: FakeDiscord, bot: RunningBot) -> None:
    question = await fake.send_message(
        fake.alice, await new_channel(fake, "crash"), "crash the worker", mention_bot=True
    )
    reply = await fake.wait_for_bot_message(int(question["id"]), timeout=30)
    assert reply["content"] == "⚠️ The model stopped working, so I'm restarting. Please ask again in a minute."
    assert await asyncio.wait_for(bot.process.wait(), 15) == 1
