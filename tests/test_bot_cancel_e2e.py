"""The Cancel button on an answer, pressed through the fake Discord."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.bot_process import RunningBot, answer_in_thread, new_channel, start_bot, stop
from tests.fake_discord import (
    MANAGE_MESSAGES,
    MEMBER_PERMISSIONS,
    FakeDiscord,
    FakeDiscordTimeout,
    InteractionRecord,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(heartbeat_interval_ms=1000) as fake:
        fake.carol = await fake.add_user("carol")  # type: ignore[attr-defined]
        yield fake


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bot(
    fake: FakeDiscord, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningBot]:
    # One answer at a time, so that a second question waits in line.
    bot = await start_bot(fake, tiny_model_dir, tmp_path_factory.mktemp("cancel"), MAX_BATCH_SIZE="1")
    yield bot
    await stop(bot)


async def slow_answer_started(fake: FakeDiscord, asker: dict) -> tuple[int, dict]:
    question = await fake.send_message(asker, await new_channel(fake, "slow"), "slow story", mention_bot=True)
    thread = int(question["id"])
    first = await fake.wait_for_bot_message(thread, lambda m: m["content"].startswith("once"), timeout=30)
    return thread, first


async def press_cancel(fake: FakeDiscord, user: dict, message: dict, **kwargs: int) -> InteractionRecord:
    """Click Cancel like a person: if nothing happens (the bot may not have registered the
    button yet when a test clicks within a millisecond of the message appearing), click again."""
    for _ in range(5):
        record = await fake.click_button(user, int(message["id"]), cancel_button(fake, message), **kwargs)
        try:
            await fake.wait_for(
                lambda record=record: record.responded, timeout=2, description="the bot to answer the click"
            )
        except FakeDiscordTimeout:
            continue
        return record
    raise AssertionError("the bot never answered the Cancel button")


def cancel_button(fake: FakeDiscord, message: dict) -> str:
    [button] = fake.buttons_on(int(message["id"]))
    assert button["label"] == "Cancel"
    return button["custom_id"]


async def test_only_the_asker_can_cancel_and_the_answer_stops(fake: FakeDiscord, bot: RunningBot) -> None:
    thread, first = await slow_answer_started(fake, fake.alice)
    refused = await press_cancel(fake, fake.bob, first)
    assert fake.message(refused.original_message_id)["content"] == (
        "⚠️ Only the person who asked (or a moderator) can cancel this answer."
    )
    assert fake.buttons_on(int(first["id"]))  # still there

    await press_cancel(fake, fake.alice, first)
    notice = await fake.wait_for_bot_message(
        thread, lambda m: m["content"].startswith("⚠️ Cancelled"), timeout=10
    )
    assert notice["content"] == f"⚠️ Cancelled by <@{fake.alice['id']}>."
    assert fake.buttons_on(int(first["id"])) == []
    assert fake.message(int(first["id"]))["content"].startswith("once")  # what came so far stays

    again = await fake.send_message(
        fake.alice, await new_channel(fake, "next"), "Say hello", mention_bot=True
    )
    await answer_in_thread(fake, again, "How are you today?")


async def test_a_moderator_can_cancel_anyones_answer(fake: FakeDiscord, bot: RunningBot) -> None:
    thread, first = await slow_answer_started(fake, fake.alice)
    await press_cancel(fake, fake.bob, first, permissions=MEMBER_PERMISSIONS | MANAGE_MESSAGES)
    notice = await fake.wait_for_bot_message(thread, lambda m: m["content"].startswith("⚠️"), timeout=10)
    assert notice["content"] == f"⚠️ Cancelled by <@{fake.bob['id']}>."


async def test_cancelling_while_waiting_leaves_the_line(fake: FakeDiscord, bot: RunningBot) -> None:
    carol = fake.carol  # type: ignore[attr-defined]
    running_thread, running = await slow_answer_started(fake, fake.alice)
    waiting = await fake.send_message(
        carol, await new_channel(fake, "waiting"), "count images", mention_bot=True
    )
    status = await fake.wait_for_bot_message(int(waiting["id"]), timeout=30)
    assert status["content"] == "⏳ Waiting in line: 1 question is ahead of yours."

    await press_cancel(fake, carol, status)
    notice = await fake.wait_for_bot_message(
        int(waiting["id"]), lambda m: m["content"].startswith("⚠️"), timeout=10
    )
    assert notice["content"] == f"⚠️ Cancelled by <@{carol['id']}>."
    assert notice["id"] == status["id"]  # in place of the stale "waiting in line", not below it

    await press_cancel(fake, fake.alice, running)
    await fake.wait_for_bot_message(running_thread, lambda m: m["content"].startswith("⚠️"), timeout=10)
    again = await fake.send_message(carol, await new_channel(fake, "again"), "count images", mention_bot=True)
    answers = await answer_in_thread(fake, again, "I see 0 images.")
    assert [m["content"] for m in answers] == ["I see 0 images."]  # no queue left behind
