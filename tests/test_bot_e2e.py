"""The bot end to end: `python -m bot` (real discord.py) against a fake Discord on loopback.

One bot process and one fake serve the whole module (starting the bot costs seconds); each
test talks in its own channel, thread or DM, so tests do not see each other's messages.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.bot_process import RunningBot, answer_in_thread, new_channel, png, start_bot, stop
from tests.conftest import LONG_CODE_ANSWER
from tests.fake_discord import FakeDiscord, allows_no_pings
from tests.synthetic_images import bar_chart, book_cover, team_photo

ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT_MS = 1000
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(heartbeat_interval_ms=HEARTBEAT_MS) as fake:
        yield fake


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bot(
    fake: FakeDiscord, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningBot]:
    bot = await start_bot(fake, tiny_model_dir, tmp_path_factory.mktemp("bot"))
    yield bot
    await stop(bot)
    assert not fake.unknown_routes, fake.unknown_routes


async def test_mention_with_an_image_opens_a_thread_and_answers_there(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    channel = await new_channel(fake, "charts")
    question = await fake.send_message(
        fake.alice,
        channel,
        "what do you see in this chart?",
        attachments=[png(bar_chart(), "chart.png")],
        mention_bot=True,
    )
    answers = await answer_in_thread(fake, question, "You asked: what do you see in this chart?")
    thread = fake.threads[int(question["id"])]
    assert thread["name"] == "what do you see in this chart?"
    assert [m["content"] for m in answers] == ["I see 1 images. You asked: what do you see in this chart?"]
    assert any(event.channel_id == int(question["id"]) for event in fake.typing_events)
    assert fake.bot_messages_in(channel) == []  # the answer is in the thread, not the channel


async def test_follow_up_in_the_thread_uses_the_first_messages_image(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    channel = await new_channel(fake, "covers")
    question = await fake.send_message(
        fake.alice,
        channel,
        "what do you see here?",
        attachments=[png(book_cover(), "cover.png")],
        mention_bot=True,
    )
    thread_id = int(question["id"])
    await answer_in_thread(fake, question, "You asked: what do you see here?")
    await fake.send_message(fake.bob, thread_id, "and what do you see on the second line?")
    answers = await answer_in_thread(fake, question, "You asked: and what do you see on the second line?")
    # The model got the whole thread: the cover from the first message is still there.
    assert answers[-1]["content"] == "I see 1 images. You asked: and what do you see on the second line?"
    assert len(answers) == 2


async def test_reply_to_a_message_with_an_image_asks_about_that_image(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    channel = await new_channel(fake, "teams")
    photo = await fake.send_message(fake.bob, channel, "our team!", attachments=[png(team_photo("red", 5))])
    question = await fake.send_message(
        fake.alice, channel, "count images in this one", mention_bot=True, reply_to=int(photo["id"])
    )
    answers = await answer_in_thread(fake, question, "I see 1 images.")
    assert answers[-1]["content"] == "I see 1 images."


async def test_mention_in_another_thread_answers_in_that_thread(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = await new_channel(fake, "people-threads")
    starter = await fake.send_message(fake.alice, channel, "let's talk here")
    thread = await fake.create_thread(fake.alice, channel, int(starter["id"]), "our chat")
    await fake.send_message(
        fake.alice, thread, "count images", attachments=[png(bar_chart())], mention_bot=True
    )
    answer = await fake.wait_for_bot_message(thread, lambda m: m["content"].endswith("."), timeout=30)
    assert answer["content"] == "I see 1 images."
    assert fake.threads[thread]["owner_id"] == fake.alice["id"]  # no new thread for the answer


async def test_direct_message_is_answered_in_the_dm(fake: FakeDiscord, bot: RunningBot) -> None:
    dm = await fake.open_dm(fake.alice)
    await fake.send_message(fake.alice, dm, "count images", attachments=[png(bar_chart()), png(book_cover())])
    answer = await fake.wait_for_bot_message(dm, lambda m: m["content"].endswith("images."), timeout=30)
    assert answer["content"] == "I see 2 images."


async def test_ask_command(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = await new_channel(fake, "ask")
    record = await fake.invoke_command(
        fake.alice,
        channel,
        "ask",
        {"question": "what do you see"},
        {"image": png(bar_chart()), "image2": png(team_photo("blue", 3))},
    )
    answer = await fake.wait_for_bot_message(
        channel, lambda m: m["content"].endswith("what do you see"), timeout=30
    )
    assert answer["content"] == "I see 2 images. You asked: what do you see"
    assert record.response_type == 5  # deferred: "SeeBot is thinking..." within 3 seconds


async def test_ocr_command(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = await new_channel(fake, "ocr")
    await fake.invoke_command(fake.alice, channel, "ocr", {}, {"image": png(book_cover())})
    answer = await fake.wait_for_bot_message(channel, lambda m: m["content"].endswith("Maxwell"), timeout=30)
    assert answer["content"] == "ALONE\nMorgan Maxwell"


async def test_compare_command_with_the_default_question(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = await new_channel(fake, "compare")
    await fake.invoke_command(
        fake.alice,
        channel,
        "compare",
        {},
        {"image1": png(team_photo("red", 5)), "image2": png(team_photo("blue", 4))},
    )
    answer = await fake.wait_for_bot_message(channel, lambda m: m["content"].endswith("shirts."), timeout=30)
    assert answer["content"] == "2 images: the first team wears red, the second blue. They differ in shirts."


async def test_long_answer_with_code_is_split_safely(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = await new_channel(fake, "long")
    question = await fake.send_message(fake.alice, channel, "long answer please", mention_bot=True)
    answers = await answer_in_thread(fake, question, "That is all of it.", timeout=60)
    contents = [m["content"] for m in answers]
    assert len(LONG_CODE_ANSWER) > 5000 and len(contents) >= 3
    assert all(0 < len(content) <= 2000 for content in contents)
    assert all(content.count("```") % 2 == 0 for content in contents), "every message has balanced fences"
    # Nothing lost or reordered: remove the fences added at splits and compare the words.
    joined = "\n".join(contents)
    rejoined = re.sub(r"\n```\n```python\n", "\n", joined)
    assert rejoined.split() == LONG_CODE_ANSWER.split()
    # Every message was streamed: it was sent, then edited as text came in, never emptied.
    first_id = int(answers[0]["id"])
    assert all(edit.content for edit in fake.edits_of(first_id))


async def test_everyone_in_an_answer_pings_no_one(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = await new_channel(fake, "pings")
    question = await fake.send_message(fake.alice, channel, "ping everyone", mention_bot=True)
    answers = await answer_in_thread(fake, question, "<@&42>!")
    assert "@everyone" in answers[-1]["content"]
    for write in fake.message_writes:
        assert allows_no_pings(write.allowed_mentions), write


async def test_other_bots_and_unmentioned_messages_are_ignored(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = await new_channel(fake, "quiet")
    await fake.send_message(fake.other_bot, channel, "count images", mention_bot=True)
    await fake.send_message(fake.alice, channel, "count images, nobody mentioned me")
    question = await fake.send_message(fake.alice, channel, "count images", mention_bot=True)
    await answer_in_thread(fake, question, "I see 0 images.")
    assert set(fake.threads) & {int(m["id"]) for m in fake.messages_in(channel)} == {int(question["id"])}


async def test_heartbeats_stay_on_time_during_a_three_second_generation(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    channel = await new_channel(fake, "heartbeats")
    question = await fake.send_message(fake.alice, channel, "take three seconds", mention_bot=True)
    thread_id = int(question["id"])
    first = await fake.wait_for_bot_message(thread_id, timeout=30)
    started = asyncio.get_running_loop().time()
    answers = await answer_in_thread(fake, question, "done.")
    finished = asyncio.get_running_loop().time()
    assert finished - started >= 2
    beats = [t for t in fake.heartbeat_times if started - HEARTBEAT_MS / 1000 <= t <= finished]
    gaps = [later - earlier for earlier, later in itertools.pairwise(beats)]
    assert len(gaps) >= 2
    assert max(gaps) < HEARTBEAT_MS / 1000 * 1.5, gaps
    # The answer was streamed into the first message with several edits, about every 0.3 s.
    assert len(fake.edits_of(int(first["id"]))) >= 3
    assert answers[-1]["content"].endswith("done.")


async def test_a_text_file_given_to_ocr_gets_a_clear_reply(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = await new_channel(fake, "ocr-mistake")
    await fake.invoke_command(
        fake.alice, channel, "ocr", {}, {"image": ("notes.txt", b"hello", "text/plain")}
    )
    answer = await fake.wait_for_bot_message(channel, lambda m: m["content"], timeout=30)
    assert answer["content"] == "⚠️ `notes.txt` is not an image (PNG, JPEG, WebP, GIF or BMP)."


async def test_a_broken_image_gets_a_clear_reply_and_the_bot_goes_on(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    channel = await new_channel(fake, "broken")
    await fake.send_message(
        fake.alice,
        channel,
        "what is this?",
        attachments=[("broken.png", b"\x89PNG\r\n\x1a\nnope", "image/png")],
        mention_bot=True,
    )
    notice = await fake.wait_for_bot_message(channel, timeout=30)
    assert notice["content"] == "⚠️ I could not read `broken.png` as an image."
    question = await fake.send_message(fake.alice, channel, "count images", mention_bot=True)
    await answer_in_thread(fake, question, "I see 0 images.")
