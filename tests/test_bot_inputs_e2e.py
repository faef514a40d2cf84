"""More ways to ask, more kinds of input, end to end: `python -m bot` against the fake Discord.

Message context menus (Describe image, Read text, Ask about this…) on messages with an
attachment, an embedded image, a sticker, a PDF or nothing usable; images from pasted links
(the unfurl arriving in a MESSAGE_UPDATE after the mention), embeds on other hosts (never
fetched: the fake records every request), attachments whose bytes decide, PDFs page by page.
The bot describes with "count images" (a scripted reply) so answers say how many images the
model saw.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.bot_process import RunningBot, answer_in_thread, new_channel, png, start_bot, stop
from tests.conftest import LONG_CODE_ANSWER
from tests.fake_discord import FakeDiscord, FakeDiscordTimeout, InteractionRecord, allows_no_pings
from tests.pdfs import encrypted_pdf, pdf_of_pages
from tests.synthetic_images import bar_chart, book_cover, team_photo

pytestmark = pytest.mark.asyncio(loop_scope="module")

MENUS = ("Describe image", "Read text", "Ask about this…")
OCR = "ALONE\nMorgan Maxwell"  # what the tiny model reads from any image
NO_IMAGE = "⚠️ I found no image in that message (attachments, embedded images, stickers or PDFs)."


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(heartbeat_interval_ms=1000) as fake:
        fake.mallory = await fake.add_user("mallory")  # type: ignore[attr-defined]
        yield fake


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bot(
    fake: FakeDiscord, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningBot]:
    bot = await start_bot(
        fake,
        tiny_model_dir,
        tmp_path_factory.mktemp("bot-inputs"),
        DESCRIBE_PROMPT="count images",
        BLOCKED_USER_IDS=fake.mallory["id"],  # type: ignore[attr-defined]
    )
    yield bot
    await stop(bot)
    assert "Traceback" not in bot.log, bot.log
    assert not fake.unknown_routes, fake.unknown_routes
    for write in fake.message_writes:
        assert allows_no_pings(write.allowed_mentions), write


async def menu_answer(
    fake: FakeDiscord, record: InteractionRecord, ending: str, timeout: float = 30
) -> list[str]:
    """The bot's messages for one interaction (its response and follow-ups), once the last
    one ends with ``ending``."""

    def answered() -> list[str] | None:
        ids = [i for i in [record.original_message_id, *record.followup_message_ids] if i is not None]
        contents = [fake.message(i)["content"] for i in ids if i in fake._messages]
        return contents if contents and contents[-1].endswith(ending) else None

    return await fake.wait_for(answered, timeout, description=f"an answer ending {ending!r}")


async def ephemeral_reply(fake: FakeDiscord, record: InteractionRecord) -> dict:
    """The one message the bot sent only to the person who asked (flag 64)."""

    def found() -> dict | None:
        for message_id in [record.original_message_id, *record.followup_message_ids]:
            if message_id is not None and message_id in fake._messages:
                message = fake.message(message_id)
                if message["flags"] & 64 and message["content"]:
                    return message
        return None

    return await fake.wait_for(found, 30, description="an ephemeral reply")


async def submit(fake: FakeDiscord, shown: InteractionRecord, question: str) -> InteractionRecord:
    """Submit the modal like a person: once it is on screen. discord.py starts listening for
    the submit only after its callback returned, so a submit within a millisecond of the
    callback can go unheard; then, as a person would, submit again."""
    await fake.wait_for(lambda: shown.modal, 10, description="the modal")
    for _ in range(5):
        record = await fake.submit_modal(shown, {"question": question})
        try:
            await fake.wait_for(lambda record=record: record.responded, 2, description="the submit's ack")
        except FakeDiscordTimeout:
            continue
        return record
    raise AssertionError("the bot never answered the modal")


# --- context menus ---------------------------------------------------------------------------


async def test_the_context_menus_are_synced_as_message_commands(fake: FakeDiscord, bot: RunningBot) -> None:
    registered = {c["name"]: c for cmds in fake.commands.values() for c in cmds}
    for name in MENUS:
        command = registered[name]
        assert command["type"] == 3  # MESSAGE: right-click a message, Apps
        assert command["description"] == "" and command["options"] == []
    assert registered["ocr"]["type"] == 1


async def test_describe_image_reads_the_target_messages_attachment(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    channel = await new_channel(fake, "menu-attachment")
    target = await fake.send_message(fake.alice, channel, "look", attachments=[png(bar_chart())])
    record = await fake.invoke_message_command(fake.bob, channel, "Describe image", int(target["id"]))
    assert await menu_answer(fake, record, "images.") == ["I see 1 images."]
    assert record.response_type == 5 and record.responded_at - record.created_at < 3  # type: ignore[operator]


async def test_read_text_reads_an_embedded_image_through_discords_proxy(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    channel = await new_channel(fake, "menu-embed")
    url = "https://example.com/cover.png"
    embed = fake.proxied_image(url, png(book_cover())[1])
    target = await fake.send_message(fake.bob, channel, url, embeds=[embed])
    record = await fake.invoke_message_command(fake.alice, channel, "Read text", int(target["id"]))
    assert await menu_answer(fake, record, "Maxwell") == [OCR]
    assert len(fake.requests_for("/external/")) == 1  # the proxy, not example.com


async def test_describe_image_reads_a_sticker_and_skips_a_lottie_one(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    channel = await new_channel(fake, "menu-sticker")
    wave = fake.add_sticker("Wave", png(team_photo("red", 2))[1], format_type=1)
    dance = fake.add_sticker("Dance", b'{"v": "5.5.7", "layers": []}', format_type=3)
    target = await fake.send_message(fake.alice, channel, stickers=[wave, dance])
    record = await fake.invoke_message_command(fake.bob, channel, "Describe image", int(target["id"]))
    assert await menu_answer(fake, record, "images.") == [
        "⚠️ Skipped the sticker `Dance`: it is an animated Lottie sticker, which I can't read as an image.",
        "I see 1 images.",
    ]
    assert len(fake.requests_for("/stickers/")) == 1  # discord.py's sticker URL, moved to the fake


async def test_read_text_reads_a_pdf_page_by_page(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = await new_channel(fake, "menu-pdf")
    target = await fake.send_message(
        fake.alice, channel, "", attachments=[("report.pdf", pdf_of_pages(3), "application/pdf")]
    )
    record = await fake.invoke_message_command(fake.bob, channel, "Read text", int(target["id"]))
    answer = await menu_answer(fake, record, "### Page 3\n" + OCR, timeout=60)
    assert answer == [f"### Page 1\n{OCR}\n\n### Page 2\n{OCR}\n\n### Page 3\n{OCR}"]
    assert not fake.message(record.original_message_id)["attachments"]  # type: ignore[arg-type]  # one message: no file


async def test_a_ten_page_pdf_is_read_up_to_the_page_limit(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = await new_channel(fake, "menu-pdf-long")
    target = await fake.send_message(
        fake.alice, channel, "", attachments=[("long.pdf", pdf_of_pages(10, (300, 200)), "application/pdf")]
    )
    record = await fake.invoke_message_command(fake.alice, channel, "Describe image", int(target["id"]))
    assert await menu_answer(fake, record, "images.", timeout=60) == [
        "⚠️ `long.pdf` has 10 pages; I read the first 4.",
        "I see 4 images.",
    ]


async def test_a_message_with_nothing_usable_gets_a_private_reply(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = await new_channel(fake, "menu-nothing")
    text_only = await fake.send_message(fake.alice, channel, "just words")
    record = await fake.invoke_message_command(fake.bob, channel, "Describe image", int(text_only["id"]))
    reply = await ephemeral_reply(fake, record)
    assert reply["content"] == NO_IMAGE and record.response_type == 4
    # Only after downloading is it clear that a file is no image: the "thinking…" goes, privately.
    notes = await fake.send_message(
        fake.alice, channel, "", attachments=[("notes.txt", b"hello", "text/plain")]
    )
    record = await fake.invoke_message_command(fake.bob, channel, "Read text", int(notes["id"]))
    reply = await ephemeral_reply(fake, record)
    assert reply["content"] == "⚠️ Skipped `notes.txt`: not an image.\n" + NO_IMAGE
    assert [m for m in fake.bot_messages_in(channel) if not m["flags"] & 64] == []


async def test_ask_about_this_opens_a_modal_whose_question_reaches_the_model(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    channel = await new_channel(fake, "menu-ask")
    target = await fake.send_message(
        fake.alice, channel, "", attachments=[png(bar_chart()), png(book_cover())]
    )
    shown = await fake.invoke_message_command(fake.bob, channel, "Ask about this…", int(target["id"]))
    await fake.wait_for(lambda: shown.modal, 10, description="the modal")
    assert shown.response_type == 9
    field = shown.modal["components"][0]["components"][0]  # type: ignore[index]
    assert (field["min_length"], field["max_length"], field["style"]) == (1, 1000, 2)
    with pytest.raises(ValueError):
        await fake.submit_modal(shown, {"question": "x" * 1001})
    submitted = await submit(fake, shown, "what do you see")
    assert await menu_answer(fake, submitted, "what do you see") == [
        "I see 2 images. You asked: what do you see"
    ]


async def test_the_access_lists_apply_to_the_context_menus(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = await new_channel(fake, "menu-blocked")
    target = await fake.send_message(fake.alice, channel, "", attachments=[png(bar_chart())])
    for name in MENUS:
        record = await fake.invoke_message_command(fake.mallory, channel, name, int(target["id"]))  # type: ignore[attr-defined]
        reply = await ephemeral_reply(fake, record)
        assert reply["content"] == "⚠️ You can't use me here."
        assert record.modal is None


async def target_with(fake: FakeDiscord, channel: int, kind: str) -> dict:
    """A message from bob holding one kind of input."""
    if kind == "attachment":
        return await fake.send_message(fake.bob, channel, "", attachments=[png(book_cover(), "upload.bin")])
    if kind == "embed":
        url = "https://example.com/cover.png"
        return await fake.send_message(
            fake.bob, channel, url, embeds=[fake.proxied_image(url, png(book_cover())[1])]
        )
    if kind == "sticker":
        return await fake.send_message(
            fake.bob, channel, stickers=[fake.add_sticker("Cover", png(book_cover())[1])]
        )
    if kind == "pdf":
        return await fake.send_message(
            fake.bob, channel, "", attachments=[("doc.pdf", pdf_of_pages(2), "application/pdf")]
        )
    return await fake.send_message(fake.bob, channel, "nothing to see here")


@pytest.mark.parametrize("kind", ["attachment", "embed", "sticker", "pdf", "nothing"])
async def test_every_menu_on_every_kind_of_input(fake: FakeDiscord, bot: RunningBot, kind: str) -> None:
    channel = await new_channel(fake, f"matrix-{kind}")
    target = int((await target_with(fake, channel, kind))["id"])
    count = {"pdf": 2, "nothing": 0}.get(kind, 1)
    for menu in MENUS:
        record = await fake.invoke_message_command(fake.alice, channel, menu, target)
        if menu == "Ask about this…" and kind != "nothing":
            record = await submit(fake, record, "count images")
        if kind == "nothing":
            assert (await ephemeral_reply(fake, record))["content"] == NO_IMAGE, menu
        elif menu == "Read text":
            expected = f"### Page 1\n{OCR}\n\n### Page 2\n{OCR}" if kind == "pdf" else OCR
            assert await menu_answer(fake, record, OCR, timeout=60) == [expected], kind
        else:
            assert await menu_answer(fake, record, "images.", timeout=60) == [f"I see {count} images."], menu


# --- links, embeds, stickers, bytes ----------------------------------------------------------


async def test_a_link_unfurled_after_the_mention_is_seen(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = await new_channel(fake, "unfurl")
    url = "https://example.com/chart.png"
    question = await fake.send_message(fake.alice, channel, f"count images {url}", mention_bot=True)
    await asyncio.sleep(0.5)  # Discord's unfurl takes a moment: the embed comes in a MESSAGE_UPDATE
    await fake.unfurl(int(question["id"]), [fake.proxied_image(url, png(bar_chart())[1])])
    answers = await answer_in_thread(fake, question, "images.")
    assert [m["content"] for m in answers] == ["I see 1 images."]


async def test_a_link_that_never_unfurls_is_answered_after_a_short_wait(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    channel = await new_channel(fake, "no-unfurl")
    question = await fake.send_message(
        fake.alice, channel, "count images https://example.com/page", mention_bot=True
    )
    sent = asyncio.get_running_loop().time()
    answers = await answer_in_thread(fake, question, "images.")
    assert [m["content"] for m in answers] == ["I see 0 images."]
    assert asyncio.get_running_loop().time() - sent >= 2  # it gave Discord's unfurl its 2 seconds


async def test_a_reply_to_a_message_with_an_embed_sees_its_image(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = await new_channel(fake, "reply-embed")
    url = "https://example.com/team.gif"
    linked = await fake.send_message(
        fake.bob, channel, url, embeds=[fake.proxied_image(url, png(team_photo("red", 1))[1])]
    )
    question = await fake.send_message(
        fake.alice, channel, "count images", mention_bot=True, reply_to=int(linked["id"]), ping_reply=False
    )
    answers = await answer_in_thread(fake, question, "images.")
    assert [m["content"] for m in answers] == ["I see 1 images."]


async def test_an_embed_on_another_host_is_never_fetched(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = await new_channel(fake, "elsewhere")
    url = fake.elsewhere("tracker.png", png(bar_chart())[1])
    embed = fake.image_embed(url, url, field="image")  # a proxy_url that is not Discord's
    question = await fake.send_message(fake.alice, channel, "count images", mention_bot=True, embeds=[embed])
    answers = await answer_in_thread(fake, question, "images.")
    assert [m["content"] for m in answers] == [
        "⚠️ Skipped an embedded image from `127.0.0.1`: I only download images from Discord's own servers.",
        "I see 0 images.",
    ]
    assert fake.requests_for("/elsewhere/") == []


async def test_a_png_named_upload_bin_is_an_image(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = await new_channel(fake, "upload-bin")
    name, data, _ = png(bar_chart(), "upload.bin")
    question = await fake.send_message(
        fake.alice,
        channel,
        "count images",
        attachments=[(name, data, "application/octet-stream")],
        mention_bot=True,
    )
    answers = await answer_in_thread(fake, question, "images.")
    assert [m["content"] for m in answers] == ["I see 1 images."]


async def test_a_mention_counts_a_pdfs_pages_and_a_sticker_after_the_attachments(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    channel = await new_channel(fake, "mixed")
    sticker = fake.add_sticker("Wave", png(team_photo("blue", 3))[1], format_type=1)
    question = await fake.send_message(
        fake.alice,
        channel,
        "count images",
        attachments=[("two.pdf", pdf_of_pages(2, (300, 200)), "application/pdf")],
        stickers=[sticker],
        mention_bot=True,
    )
    answers = await answer_in_thread(fake, question, "images.", timeout=60)
    assert [m["content"] for m in answers] == ["I see 3 images."]


async def test_an_encrypted_pdf_gets_a_clear_reply(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = await new_channel(fake, "ocr-encrypted")
    await fake.invoke_command(
        fake.alice, channel, "ocr", attachments={"image": ("secret.pdf", encrypted_pdf(), "application/pdf")}
    )
    reply = await fake.wait_for_bot_message(channel, lambda m: m["content"], timeout=30)
    assert reply["content"] == (
        "⚠️ `secret.pdf` is a password-protected PDF, which I can't open. Send it without the password."
    )


async def test_ocr_reads_a_pdf_page_by_page(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = await new_channel(fake, "ocr-pdf")
    record = await fake.invoke_command(
        fake.alice, channel, "ocr", attachments={"image": ("two.pdf", pdf_of_pages(2), "application/pdf")}
    )
    assert await menu_answer(fake, record, "### Page 2\n" + OCR, timeout=60) == [
        f"### Page 1\n{OCR}\n\n### Page 2\n{OCR}"
    ]


# --- long text as a file ---------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module")
async def long_reader(tiny_model_dir: Path, tmp_path: Path) -> AsyncIterator[FakeDiscord]:
    """A bot whose OCR prompt makes the tiny model answer at length (in a fake of its own)."""
    async with FakeDiscord(heartbeat_interval_ms=1000) as own:
        bot = await start_bot(own, tiny_model_dir, tmp_path, OCR_PROMPT="long answer please")
        yield own
        await stop(bot)
        assert "Traceback" not in bot.log, bot.log


async def test_a_long_text_also_comes_as_a_file_on_its_last_message(long_reader: FakeDiscord) -> None:
    fake = long_reader
    channel = await new_channel(fake, "long-text")
    target = await fake.send_message(fake.alice, channel, "", attachments=[png(book_cover(), "scan.png")])
    record = await fake.invoke_message_command(fake.bob, channel, "Read text", int(target["id"]))
    contents = await menu_answer(fake, record, "That is all of it.", timeout=90)
    assert len(contents) >= 3
    ids = [record.original_message_id, *record.followup_message_ids]
    last = await fake.wait_for(
        lambda: fake.message(ids[-1])["attachments"],
        30,
        description="the .txt on the last message",  # type: ignore[arg-type]
    )
    assert [a["filename"] for a in last] == ["scan.txt"]
    assert fake.attachment_data(last[0]).decode().split() == LONG_CODE_ANSWER.split()
    assert all(not fake.message(i)["attachments"] for i in ids[:-1])  # type: ignore[arg-type]
