"""Images people send, end to end: `python -m bot` against the fake Discord on loopback.

Every refusal shows the exact reply a person gets, then checks that the bot answers the
next question normally. The bot runs with small limits (200 KB per image, 1 s per download)
so that the tests stay fast.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from PIL import Image

from tests.bot_process import RunningBot, answer_in_thread, new_channel, png, start_bot, stop
from tests.fake_discord import FakeDiscord
from tests.synthetic_images import bar_chart, book_cover, team_photo
from tests.test_images import png_header_only

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_IMAGE_BYTES = 200 * 1024
PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n"


def encoded(
    image: Image.Image, name: str, fmt: str, content_type: str, **params: object
) -> tuple[str, bytes, str]:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return (name, buffer.getvalue(), content_type)


def noise(side: int, name: str) -> tuple[str, bytes, str]:
    import numpy as np

    pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return png(Image.fromarray(pixels), name)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(heartbeat_interval_ms=1000) as fake:
        yield fake


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bot(
    fake: FakeDiscord, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningBot]:
    bot = await start_bot(
        fake,
        tiny_model_dir,
        tmp_path_factory.mktemp("bot-images"),
        MAX_IMAGE_BYTES=str(MAX_IMAGE_BYTES),
        MAX_IMAGE_PIXELS="40000000",
        MAX_IMAGES="4",
        IMAGE_DOWNLOAD_TIMEOUT_SECONDS="1",
    )
    yield bot
    await stop(bot)
    assert "Traceback" not in bot.log, bot.log  # every bad image is handled, none crashes a handler
    assert not fake.unknown_routes, fake.unknown_routes


async def refused_then_answered(fake: FakeDiscord, attachments: list, expected_notice: str) -> None:
    """Mention the bot in a new channel with ``attachments``: the reply is the notice; then a
    good question in the same channel gets its answer."""
    channel = await new_channel(fake, "images")
    refused = await fake.send_message(
        fake.alice, channel, "what is this?", attachments=attachments, mention_bot=True
    )
    reply = await fake.wait_for_bot_message(channel, timeout=30)
    assert reply["content"] == expected_notice
    assert int(refused["id"]) not in fake.threads  # no thread was opened for a refused question
    question = await fake.send_message(
        fake.alice, channel, "count images", attachments=[png(bar_chart())], mention_bot=True
    )
    await answer_in_thread(fake, question, "I see 1 images.")


async def dm_answer(fake: FakeDiscord, content: str, attachments: list, ending: str) -> list[dict]:
    """Alice sends a DM; returns the bot's new messages up to the one ending with ``ending``."""
    dm = await fake.open_dm(fake.alice)
    before = len(fake.bot_messages_in(dm))
    await fake.send_message(fake.alice, dm, content, attachments=attachments)

    def answered() -> list[dict] | None:
        new = fake.bot_messages_in(dm)[before:]
        return new if new and new[-1]["content"].endswith(ending) else None

    return await fake.wait_for(answered, 30, description=f"a DM answer ending {ending!r}")


# --- formats ---------------------------------------------------------------------------------


async def test_jpeg_webp_gif_and_bmp_are_read(fake: FakeDiscord, bot: RunningBot) -> None:
    frames = [team_photo("red", 3), team_photo("blue", 2)]
    attachments = [
        encoded(bar_chart(), "chart.jpg", "JPEG", "image/jpeg"),
        encoded(book_cover(), "cover.webp", "WEBP", "image/webp"),
        encoded(frames[0], "team.gif", "GIF", "image/gif", save_all=True, append_images=frames[1:]),
        encoded(team_photo("green", 4).resize((160, 100)), "scan.bmp", "BMP", "image/bmp"),
    ]
    answers = await dm_answer(fake, "count images", attachments, "images.")
    assert answers[-1]["content"] == "I see 4 images."


async def test_a_png_name_on_a_broken_pdf_is_read_as_a_pdf(fake: FakeDiscord, bot: RunningBot) -> None:
    await refused_then_answered(  # the bytes decide, not the name
        fake, [("report.png", PDF, "image/png")], "⚠️ I could not read `report.png` as a PDF."
    )


async def test_a_png_name_on_text_is_refused(fake: FakeDiscord, bot: RunningBot) -> None:
    await refused_then_answered(
        fake,
        [("notes.png", b"just some notes", "image/png")],
        "⚠️ `notes.png` is not an image (PNG, JPEG, WebP, GIF or BMP).",
    )


async def test_a_broken_image_among_good_ones_is_refused(fake: FakeDiscord, bot: RunningBot) -> None:
    data = png(bar_chart())[1]
    await refused_then_answered(
        fake,
        [png(book_cover(), "cover.png"), ("cut.png", data[: len(data) // 2], "image/png")],
        "⚠️ I could not read `cut.png` as an image.",
    )


# --- sizes -----------------------------------------------------------------------------------


async def test_an_image_over_the_byte_limit_is_refused(fake: FakeDiscord, bot: RunningBot) -> None:
    big = noise(300, "big.png")
    assert len(big[1]) > MAX_IMAGE_BYTES
    await refused_then_answered(
        fake, [big], f"⚠️ `big.png` is too large ({len(big[1]) / 1024:.0f} KB): the limit is 200 KB per image."
    )


async def test_a_download_bigger_than_declared_is_cut_off(fake: FakeDiscord, bot: RunningBot) -> None:
    served = noise(320, "x.png")[1]
    fake.set_cdn_response("liar.png", body=served)  # declared: the size of a small chart
    expected = f"⚠️ `liar.png` is too large ({len(served) / 1024:.0f} KB): the limit is 200 KB per image."
    await refused_then_answered(fake, [png(bar_chart(), "liar.png")], expected)


async def test_a_decompression_bomb_is_refused(fake: FakeDiscord, bot: RunningBot) -> None:
    await refused_then_answered(
        fake,
        [("bomb.png", png_header_only(50_000, 50_000), "image/png")],
        "⚠️ `bomb.png` has too many pixels (2500 megapixels): the limit is 40 megapixels.",
    )


async def test_a_large_photo_is_scaled_down_and_answered(fake: FakeDiscord, bot: RunningBot) -> None:
    photo = bar_chart().resize((3000, 2250))
    attachment = encoded(photo, "photo.jpg", "JPEG", "image/jpeg", quality=30)
    assert len(attachment[1]) < MAX_IMAGE_BYTES
    answers = await dm_answer(fake, "count images", [attachment], "images.")
    assert answers[-1]["content"] == "I see 1 images."


# --- downloads -------------------------------------------------------------------------------


async def test_a_download_that_fails_gets_a_clear_reply(fake: FakeDiscord, bot: RunningBot) -> None:
    fake.set_cdn_response("gone.png", status=404)
    await refused_then_answered(
        fake,
        [png(bar_chart(), "gone.png")],
        "⚠️ I could not download `gone.png` (HTTP 404). Try sending it again.",
    )


async def test_a_download_that_hangs_gets_a_clear_reply(fake: FakeDiscord, bot: RunningBot) -> None:
    fake.set_cdn_response("slow.png", delay=60)
    await refused_then_answered(
        fake,
        [png(bar_chart(), "slow.png")],
        "⚠️ Downloading `slow.png` took too long (over 1 s). Try again in a moment.",
    )


# --- how many --------------------------------------------------------------------------------


async def test_at_most_four_images_per_question(fake: FakeDiscord, bot: RunningBot) -> None:
    attachments = [png(team_photo("red", n), f"team{n}.png") for n in range(1, 6)]
    answers = await dm_answer(fake, "count images", attachments, "images.")
    assert answers[-1]["content"] == "I see 4 images."


async def test_a_thread_keeps_at_most_four_images(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = await new_channel(fake, "many")
    first = [png(team_photo("red", n), f"first{n}.png") for n in range(1, 4)]
    question = await fake.send_message(
        fake.alice, channel, "count images", attachments=first, mention_bot=True
    )
    await answer_in_thread(fake, question, "I see 3 images.")
    more = [png(team_photo("blue", n), f"more{n}.png") for n in range(1, 3)]
    await fake.send_message(fake.alice, int(question["id"]), "count images again", attachments=more)
    answers = await answer_in_thread(fake, question, "I see 4 images.")
    assert answers[-1]["content"] == "I see 4 images."


async def test_an_earlier_broken_image_does_not_block_the_thread(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = await new_channel(fake, "thread-broken")
    question = await fake.send_message(
        fake.alice, channel, "count images", attachments=[png(bar_chart())], mention_bot=True
    )
    thread = int(question["id"])
    await answer_in_thread(fake, question, "I see 1 images.")
    await fake.send_message(
        fake.alice, thread, "and this?", attachments=[("broken.png", b"\x89PNG\r\n\x1a\nnope", "image/png")]
    )
    await answer_in_thread(fake, question, "⚠️ I could not read `broken.png` as an image.")
    await fake.send_message(fake.alice, thread, "count images, just the chart then")
    answers = await answer_in_thread(fake, question, "I see 1 images.")
    assert [m["content"] for m in answers] == [
        "I see 1 images.",
        "⚠️ I could not read `broken.png` as an image.",
        "I see 1 images.",
    ]


# --- slash commands --------------------------------------------------------------------------


async def test_slash_command_with_a_non_image_is_refused(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = await new_channel(fake, "ask-files")
    await fake.invoke_command(
        fake.alice,
        channel,
        "ask",
        {"question": "what do you see"},
        {"image": png(bar_chart()), "image2": ("scan.png", b"plain text", "image/png")},
    )
    reply = await fake.wait_for_bot_message(channel, lambda m: m["content"], timeout=30)
    assert reply["content"] == "⚠️ `scan.png` is not an image (PNG, JPEG, WebP, GIF or BMP)."
    await fake.invoke_command(
        fake.alice, channel, "ask", {"question": "what do you see"}, {"image": png(bar_chart())}
    )
    answer = await fake.wait_for_bot_message(
        channel, lambda m: m["content"].endswith("what do you see"), timeout=30
    )
    assert answer["content"] == "I see 1 images. You asked: what do you see"


# --- notices (need client.py to send them) ---------------------------------------------------


async def test_skipped_attachments_are_named_before_the_answer(fake: FakeDiscord, bot: RunningBot) -> None:
    attachments = [
        png(bar_chart(), "chart.png"),
        ("notes.txt", b"some notes", "text/plain"),
        (*png(book_cover(), "photo.txt")[:2], "text/plain"),  # a PNG named and typed as text: an image
        *(png(team_photo("red", n), f"team{n}.png") for n in range(1, 5)),
    ]
    answers = await dm_answer(fake, "count images", attachments, "images.")
    assert [m["content"] for m in answers] == [
        "⚠️ Skipped `notes.txt`: not an image.\n"
        "⚠️ I look at 4 images at a time, so I left out `team3.png`, `team4.png`.",
        "I see 4 images.",
    ]


async def test_a_question_with_only_a_text_file_is_answered_from_the_text(
    fake: FakeDiscord, bot: RunningBot
) -> None:
    channel = await new_channel(fake, "text-only")
    question = await fake.send_message(
        fake.alice,
        channel,
        "count images",
        attachments=[("notes.txt", b"hi", "text/plain")],
        mention_bot=True,
    )
    answers = await answer_in_thread(fake, question, "I see 0 images.")
    assert [m["content"] for m in answers] == ["⚠️ Skipped `notes.txt`: not an image.", "I see 0 images."]


async def test_a_thread_says_which_earlier_images_it_leaves_out(fake: FakeDiscord, bot: RunningBot) -> None:
    channel = await new_channel(fake, "left-out")
    first = [png(team_photo("red", n), f"old{n}.png") for n in range(1, 5)]
    question = await fake.send_message(
        fake.alice, channel, "count images", attachments=first, mention_bot=True
    )
    await answer_in_thread(fake, question, "I see 4 images.")
    await fake.send_message(
        fake.alice, int(question["id"]), "count images", attachments=[png(bar_chart(), "new.png")]
    )
    thread = int(question["id"])

    def second_answer() -> list[dict] | None:
        found = fake.bot_messages_in(thread)
        return found if len(found) > 1 and found[-1]["content"] == "I see 4 images." else None

    answers = await fake.wait_for(second_answer, 30, description="a second answer")
    assert [m["content"] for m in answers[1:]] == [
        "⚠️ I look at 4 images at a time, so this answer leaves out `old4.png` from earlier in this thread.",
        "I see 4 images.",
    ]
