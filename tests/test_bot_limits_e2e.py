"""Fair use and access control through the fake Discord: the replies people get when the bot
says no, and that it then serves the next request normally."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from inference import Conversation, Turn, build_prompt
from tests.bot_process import RunningBot, answer_in_thread, new_channel, png, start_bot, stop
from tests.fake_discord import FakeDiscord
from tests.synthetic_images import bar_chart

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(heartbeat_interval_ms=1000) as fake:
        fake.carol = await fake.add_user("carol")  # type: ignore[attr-defined]
        fake.dave = await fake.add_user("dave")  # type: ignore[attr-defined]
        yield fake


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def strict_bot(
    fake: FakeDiscord, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningBot]:
    bot = await start_bot(
        fake,
        tiny_model_dir,
        tmp_path_factory.mktemp("strict"),
        MAX_BATCH_SIZE="1",  # one answer at a time, so that a second question waits in line
        MAX_QUEUE="2",
        MAX_PENDING_PER_USER="1",
        GENERATION_TIMEOUT_SECONDS="2",
        BLOCKED_USER_IDS=str(fake.bob["id"]),
        ALLOW_DMS="false",
    )
    yield bot
    await stop(bot)


async def test_queue_position_busy_per_user_limit_and_timeout(
    fake: FakeDiscord, strict_bot: RunningBot
) -> None:
    carol, dave = fake.carol, fake.dave  # type: ignore[attr-defined]
    slow = await fake.send_message(
        fake.alice, await new_channel(fake, "slow"), "slow story", mention_bot=True
    )
    await fake.wait_for_bot_message(int(slow["id"]), lambda m: m["content"].startswith("once"), timeout=30)

    # Second in: told where it stands, and the status is later replaced by the answer.
    waiting = await fake.send_message(
        carol, await new_channel(fake, "wait"), "count images", mention_bot=True
    )
    status = await fake.wait_for_bot_message(int(waiting["id"]), timeout=30)
    assert status["content"] == "⏳ Waiting in line: 1 question is ahead of yours."

    # Third in, with MAX_QUEUE=2: busy.
    busy_channel = await new_channel(fake, "busy")
    await fake.send_message(dave, busy_channel, "count images", mention_bot=True)
    busy = await fake.wait_for_bot_message(busy_channel, timeout=30)
    assert busy["content"] == "⚠️ I'm busy right now (2 questions in line). Please try again in a minute."

    # alice already has a question running, with MAX_PENDING_PER_USER=1.
    again_channel = await new_channel(fake, "again")
    await fake.send_message(fake.alice, again_channel, "Say hello", mention_bot=True)
    again = await fake.wait_for_bot_message(again_channel, timeout=30)
    assert again["content"] == (
        "⚠️ You already have a question waiting. Please wait for an answer before asking more."
    )

    # The slow answer runs past GENERATION_TIMEOUT_SECONDS=2: stopped, and said so.
    stopped = await fake.wait_for_bot_message(
        int(slow["id"]), lambda m: m["content"].startswith("⚠️"), timeout=30
    )
    assert stopped["content"] == "⚠️ I stopped this answer: it took longer than 2 seconds."

    # Then carol's answer replaces her status line, and dave is served normally.
    answers = await answer_in_thread(fake, waiting, "I see 0 images.")
    assert [m["content"] for m in answers] == ["I see 0 images."]
    retry = await fake.send_message(dave, busy_channel, "count images", mention_bot=True)
    await answer_in_thread(fake, retry, "I see 0 images.")


async def test_a_blocked_user_is_ignored_and_told_so_by_slash_commands(
    fake: FakeDiscord, strict_bot: RunningBot
) -> None:
    channel = await new_channel(fake, "blocked")
    ignored = await fake.send_message(fake.bob, channel, "count images", mention_bot=True)
    record = await fake.invoke_command(fake.bob, channel, "ocr", {}, {"image": ("a.png", b"x", "image/png")})
    reply = await fake.wait_for(
        lambda: record.responded and fake.messages_in(channel)[-1], timeout=30, description="a refusal"
    )
    assert reply["content"] == "⚠️ You can't use me here."
    assert reply["flags"] & 64  # ephemeral: only bob sees it
    served = await fake.send_message(fake.alice, channel, "count images", mention_bot=True)
    await answer_in_thread(fake, served, "I see 0 images.")
    assert int(ignored["id"]) not in fake.threads


async def test_dms_can_be_turned_off(fake: FakeDiscord, strict_bot: RunningBot) -> None:
    dm = await fake.open_dm(fake.carol)  # type: ignore[attr-defined]
    await fake.send_message(fake.carol, dm, "count images")  # type: ignore[attr-defined]
    channel = await new_channel(fake, "after-dm")
    served = await fake.send_message(fake.carol, channel, "count images", mention_bot=True)  # type: ignore[attr-defined]
    await answer_in_thread(fake, served, "I see 0 images.")
    assert fake.bot_messages_in(dm) == []


async def test_shutdown_tells_the_requester_and_exits_cleanly(
    fake: FakeDiscord, strict_bot: RunningBot, tiny_model_dir: Path, tmp_path: Path
) -> None:
    await stop(strict_bot)
    bot = await start_bot(fake, tiny_model_dir, tmp_path, USER_COOLDOWN_SECONDS="30")
    try:
        question = await fake.send_message(
            fake.alice, await new_channel(fake, "bye"), "slow story", mention_bot=True
        )
        thread = int(question["id"])
        await fake.wait_for_bot_message(thread, lambda m: m["content"].startswith("once"), timeout=30)
        cooldown_channel = await new_channel(fake, "cooldown")
        await fake.send_message(fake.alice, cooldown_channel, "Say hello", mention_bot=True)
        cooldown = await fake.wait_for_bot_message(cooldown_channel, timeout=30)
        assert cooldown["content"].startswith("⚠️ Slow down a little: you can ask again in ")

        bot.process.send_signal(signal.SIGTERM)
        notice = await fake.wait_for_bot_message(thread, lambda m: m["content"].startswith("⚠️"), timeout=10)
        assert notice["content"] == (
            "⚠️ The bot is restarting, so this answer was cut off. Please ask again in a minute."
        )
        assert await asyncio.wait_for(bot.process.wait(), 10) == 0
    finally:
        await stop(bot)


def prompt_length(model_dir: Path, conversation: Conversation) -> int:
    """Tokens the tiny model's processor makes of a conversation (the engine counts the same)."""
    from inference.phi3v import Phi3VProcessor

    processor = Phi3VProcessor.from_pretrained(str(model_dir))
    images = conversation.images
    processor.image_processor.num_crops = 16 if len(images) <= 1 else 4
    encoded = processor(build_prompt(conversation), images or None, return_tensors="pt")
    return int(encoded["input_ids"].shape[1])


async def test_a_long_thread_leaves_out_its_oldest_exchange_and_a_too_long_question_is_refused(
    fake: FakeDiscord, tiny_model_dir: Path, tmp_path: Path
) -> None:
    chart = bar_chart()
    first = Turn("user", "count images", (chart,))
    alone = prompt_length(tiny_model_dir, Conversation((first,)))
    follow_up = Turn("user", "count images again")
    whole = prompt_length(
        tiny_model_dir, Conversation((first, Turn("assistant", "I see 1 images."), follow_up))
    )
    answer_tokens = 20
    assert alone + answer_tokens < whole + answer_tokens
    bot = await start_bot(
        fake,
        tiny_model_dir,
        tmp_path,
        MAX_NEW_TOKENS=str(answer_tokens),
        MAX_CONTEXT_TOKENS=str(alone + answer_tokens),  # the first question fits; the thread does not
    )
    try:
        question = await fake.send_message(
            fake.alice,
            await new_channel(fake, "context"),
            "count images",
            attachments=[png(chart)],
            mention_bot=True,
        )
        await answer_in_thread(fake, question, "I see 1 images.")
        await fake.send_message(fake.alice, int(question["id"]), "count images again")
        answers = await answer_in_thread(fake, question, "I see 0 images.")  # the first exchange left out
        assert [m["content"] for m in answers] == ["I see 1 images.", "I see 0 images."]

        too_long = await fake.send_message(
            fake.alice,
            await new_channel(fake, "too-long"),
            "count images",
            attachments=[png(chart), png(chart), png(chart)],
            mention_bot=True,
        )
        refusal = await fake.wait_for_bot_message(int(too_long["id"]), timeout=30)
        assert re.fullmatch(
            r"⚠️ Sorry, I could not answer: the question and its images take \d+ tokens, and the model reads "
            r"at most \d+ before answering; try fewer images or a shorter question",
            refusal["content"],
        ), refusal["content"]
    finally:
        await stop(bot)
