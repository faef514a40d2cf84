"""Nothing lost, nothing twice: follow-ups sent while an answer waits or streams, Discord
failing the last update of an answer, an answer cut at MAX_NEW_TOKENS, failing typing /
history / slash acknowledgements, threads and questions deleted mid-answer. Each test says
what the user sees; none of them may leave a traceback in the bot's log."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.bot_process import RunningBot, answer_in_thread, new_channel, png, start_bot, stop
from tests.fake_discord import FakeDiscord
from tests.synthetic_images import book_cover

pytestmark = pytest.mark.asyncio(loop_scope="module")

MESSAGE_ROUTE = r"^/channels/\d+/messages$"
EDIT_ROUTE = r"^/channels/\d+/messages/\d+$"
DISCORD_FAILED = "⚠️ Discord kept failing while I was answering this, so I had to stop. Please ask again."


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(heartbeat_interval_ms=1000) as fake:
        yield fake


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bot(
    fake: FakeDiscord, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningBot]:
    bot = await start_bot(fake, tiny_model_dir, tmp_path_factory.mktemp("reliability"), MAX_NEW_TOKENS="120")
    yield bot
    await stop(bot)
    assert "Traceback" not in bot.log
    assert "Unclosed client session" not in bot.log


@pytest.fixture(autouse=True)
def no_failures_left(fake: FakeDiscord) -> AsyncIterator[None]:
    yield
    fake.stop_failing()


def calls_to(fake: FakeDiscord, channel_id: int) -> int:
    return sum(1 for r in fake.requests if r.path.startswith(f"/channels/{channel_id}/"))


def contents(fake: FakeDiscord, channel_id: int) -> list[str]:
    return [m["content"] for m in fake.bot_messages_in(channel_id)]


async def test_a_follow_up_sent_while_the_first_answer_waits_is_its_own_question(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    busy = await fake.send_message(
        fake.bob, await new_channel(fake, "busy"), "take three seconds", mention_bot=True
    )
    first = await fake.send_message(
        fake.alice, await new_channel(fake, "queued"), "Say hello", mention_bot=True
    )
    thread = int(first["id"])
    status = await fake.wait_for_bot_message(thread, timeout=30)
    assert status["content"].startswith("⏳ Waiting in line")
    await fake.send_message(fake.alice, thread, "what do you see now")

    await answer_in_thread(fake, first, "You asked: what do you see now", timeout=60)
    assert contents(fake, thread) == [
        "Hello there, my friend! How are you today?",
        "I see 0 images. You asked: what do you see now",
    ]
    await answer_in_thread(fake, busy, "done.")


async def test_a_follow_up_sent_while_the_first_answer_streams_waits_for_its_end(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    first = await fake.send_message(
        fake.alice, await new_channel(fake, "streaming"), "take three seconds", mention_bot=True
    )
    thread = int(first["id"])
    await fake.wait_for_bot_message(thread, lambda m: m["content"].startswith("thinking"), timeout=30)
    await fake.send_message(fake.alice, thread, "what do you see after that")

    await answer_in_thread(fake, first, "You asked: what do you see after that", timeout=60)
    answer, follow_up = fake.bot_messages_in(thread)
    assert answer["content"] == "thinking " * 30 + "done."
    assert follow_up["content"] == "I see 0 images. You asked: what do you see after that"
    # The follow-up was answered after the first answer was complete, not beside it.
    last_edit = fake.edits_of(int(answer["id"]))[-1].at
    [created] = [
        w for w in fake.message_writes if w.message_id == int(follow_up["id"]) and w.kind == "create"
    ]
    assert created.at > last_edit


def the_end(body: object) -> bool:
    """The write that carries the end of the answer to "Say hello"."""
    return isinstance(body, dict) and str(body.get("content", "")).endswith("How are you today?")


async def test_when_discord_fails_the_last_update_it_is_retried(fake: FakeDiscord, bot: RunningBot) -> None:
    for method, route in (("PATCH", EDIT_ROUTE), ("POST", MESSAGE_ROUTE)):
        # Five failures: discord.py's own retries are spent, the bot's are not.
        fake.fail_next(method, route, 429, count=5, retry_after=0.05, body_matches=the_end)
    question = await fake.send_message(
        fake.alice, await new_channel(fake, "last-update"), "Say hello", mention_bot=True
    )
    answers = await answer_in_thread(fake, question, "How are you today?", timeout=60)
    assert [m["content"] for m in answers] == ["Hello there, my friend! How are you today?"]
    first = int(answers[0]["id"])
    await fake.wait_for(lambda: fake.buttons_on(first) == [], timeout=10, description="no Cancel button")
    refused = [r for r in fake.requests if r.status == 429 and the_end(r.json)]
    assert len(refused) == 5


async def test_when_discord_never_takes_the_end_of_an_answer_the_user_is_told(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    for method, route in (("PATCH", EDIT_ROUTE), ("POST", MESSAGE_ROUTE)):
        fake.fail_next(method, route, 429, count=1000, retry_after=0.02, body_matches=the_end)
    question = await fake.send_message(
        fake.alice, await new_channel(fake, "lost-end"), "Say hello", mention_bot=True
    )
    told = await fake.wait_for_bot_message(
        int(question["id"]), lambda m: m["content"].startswith("⚠️"), timeout=60
    )
    assert told["content"].startswith("⚠️ Discord kept failing, so the end of this answer could not be shown")
    assert told["content"].endswith("characters are missing). Please ask again.")


async def test_an_answer_cut_at_max_new_tokens_ends_with_a_notice(fake: FakeDiscord, bot: RunningBot) -> None:
    question = await fake.send_message(
        fake.alice, await new_channel(fake, "long"), "ramble on", mention_bot=True
    )
    messages = await answer_in_thread(fake, question, "or ask a narrower question.", timeout=60)
    assert messages[0]["content"].startswith("and on and on")
    assert messages[-1]["content"] == (
        "⚠️ This answer reached the length limit, so it stops here. "
        "Ask me to go on, or ask a narrower question."
    )


async def test_a_failing_typing_call_does_not_lose_the_question(fake: FakeDiscord, bot: RunningBot) -> None:
    fake.fail_next("POST", r"/typing$", 403, count=1000, code=50013)
    question = await fake.send_message(
        fake.alice, await new_channel(fake, "typing"), "Say hello", mention_bot=True
    )
    await answer_in_thread(fake, question, "How are you today?")


async def test_a_failing_history_read_is_told_to_the_asker(fake: FakeDiscord, bot: RunningBot) -> None:
    first = await fake.send_message(
        fake.alice, await new_channel(fake, "history"), "Say hello", mention_bot=True
    )
    thread = int(first["id"])
    await answer_in_thread(fake, first, "How are you today?")
    fake.fail_next("GET", MESSAGE_ROUTE, 503, count=1000)
    follow_up = await fake.send_message(fake.alice, thread, "count images")
    told = await fake.wait_for_bot_message(thread, lambda m: m["content"].startswith("⚠️"), timeout=30)
    assert told["content"] == DISCORD_FAILED
    assert told["message_reference"]["message_id"] == follow_up["id"]
    fake.stop_failing()
    await fake.send_message(fake.alice, thread, "count images")
    await fake.wait_for_bot_message(thread, lambda m: m["content"] == "I see 0 images.", timeout=30)


async def test_a_slash_command_whose_acknowledgement_fails_is_answered_in_the_channel(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    channel = await new_channel(fake, "late-ack")
    # discord.py retries a 502 after 1 s, then 3 s: the third try comes after Discord's 3 s.
    fake.fail_next("POST", r"^/interactions/\d+/[^/]+/callback$", 502, count=2)
    await fake.invoke_command(fake.alice, channel, "ocr", {}, {"image": png(book_cover())})
    answer = await fake.wait_for_bot_message(channel, lambda m: m["content"].endswith("Maxwell"), timeout=60)
    assert answer["content"] == "ALONE\nMorgan Maxwell"
    said = contents(fake, channel)
    assert said[0] == f"⚠️ Discord did not take <@{fake.alice['id']}>'s /ocr in time, so I'm answering here."


async def test_a_thread_deleted_mid_answer_stops_its_generation_at_once(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    question = await fake.send_message(
        fake.alice, await new_channel(fake, "doomed"), "slow story", mention_bot=True
    )
    thread = int(question["id"])
    await fake.wait_for_bot_message(thread, lambda m: m["content"].startswith("once"), timeout=30)
    calls_before = calls_to(fake, thread)
    await fake.delete_thread(thread)

    # The slow story would take 40 s more: the next question gets the model at once.
    after = await fake.send_message(fake.bob, await new_channel(fake, "after"), "Say hello", mention_bot=True)
    await answer_in_thread(fake, after, "How are you today?", timeout=10)
    assert calls_to(fake, thread) - calls_before <= 2
    await fake.wait_for(
        lambda: f"question {thread} from user {fake.alice['id']}: stopped" in bot.log,
        timeout=10,
        description="the stop in the log",
    )


async def test_a_question_deleted_while_it_waits_says_so_in_place_of_its_status(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    busy = await fake.send_message(
        fake.bob, await new_channel(fake, "busy-2"), "take three seconds", mention_bot=True
    )
    waiting = await fake.send_message(
        fake.alice, await new_channel(fake, "withdrawn"), "Say hello", mention_bot=True
    )
    thread = int(waiting["id"])
    status = await fake.wait_for_bot_message(thread, timeout=30)
    await fake.delete_message(thread)
    told = await fake.wait_for_bot_message(thread, lambda m: m["content"].startswith("⚠️"), timeout=10)
    assert told["id"] == status["id"]
    assert told["content"] == "⚠️ Your question was deleted, so I stopped answering it."
    await answer_in_thread(fake, busy, "done.")
    assert contents(fake, thread) == ["⚠️ Your question was deleted, so I stopped answering it."]


async def test_a_question_deleted_during_its_image_download_gets_no_answer(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    asker = await fake.add_user("erin")  # a fresh asker: alice's last answer may still be closing
    channel = await new_channel(fake, "vanished")
    fake.set_cdn_response("slow.png", delay=2.0)
    question = await fake.send_message(
        asker, channel, "Say hello", mention_bot=True, attachments=[png(book_cover(), "slow.png")]
    )
    await fake.delete_message(int(question["id"]))
    after = await fake.send_message(asker, await new_channel(fake, "next"), "Say hello", mention_bot=True)
    await answer_in_thread(fake, after, "How are you today?", timeout=30)
    await fake.wait_for(
        lambda: f"question {question['id']} from user {asker['id']}: stopped" in bot.log,
        timeout=10,
        description="the stop in the log",
    )
    assert fake.bot_messages_in(channel) == []  # no bare answer in the channel
    assert int(question["id"]) not in fake.threads


async def test_a_notice_for_a_message_deleted_at_once_reaches_no_error(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    asker = await fake.add_user("frank")  # a fresh asker: alice's last answer may still be closing
    channel = await new_channel(fake, "blink")
    question = await fake.send_message(asker, channel, "", mention_bot=True)
    await fake.delete_message(int(question["id"]))
    after = await fake.send_message(asker, await new_channel(fake, "then"), "Say hello", mention_bot=True)
    await answer_in_thread(fake, after, "How are you today?", timeout=30)
    assert [r for r in fake.requests_to("POST", MESSAGE_ROUTE) if r.status == 400] == []
    # Either the question was withdrawn before its notice, or the notice stands on its own.
    assert contents(fake, channel) in (
        [],
        ["⚠️ Mention me with a question, and attach the image(s) it is about."],
    )
