"""Images people send: which attachments count, safe downloads, safe decoding, thread budgets.

Downloads go to a small aiohttp server on 127.0.0.1 that this module starts; nothing
leaves the machine.
"""

from __future__ import annotations

import asyncio
import io
import math
import struct
import threading
import zlib
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
import discord
import numpy as np
import pytest
import pytest_asyncio
from aiohttp import web
from PIL import Image, features

from bot import images as images_module
from bot.history import thread_conversation
from bot.images import (
    DEFAULT_MAX_IMAGE_BYTES,
    CollectedImages,
    ImageFetcher,
    ImageLimits,
    ImageProblem,
    declared_kind,
    decode_image,
    model_size_cap,
    sniff_format,
)
from bot.settings import BotSettings
from inference import SettingsError

# --- helpers --------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def chart(size: tuple[int, int] = (64, 48), color: str = "#4472c4") -> Image.Image:
    image = Image.new("RGB", size, "white")
    image.paste(color, (8, 8, size[0] - 8, size[1] - 8))
    return image


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels in a few dozen bytes: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def noise_png(side: int) -> bytes:
    rng = np.random.default_rng(side)
    return encode(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)), "PNG")


@dataclass
class Attachment:
    """Stands in for discord.Attachment: what bot/images.py reads of it."""

    id: int
    filename: str
    url: str
    size: int
    content_type: str | None = None


@pytest.fixture(autouse=True)
def _restore_pillow_limit() -> Iterator[None]:
    before = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = before


# --- which attachments are images -----------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "content_type", "expected"),
    [
        ("chart.png", "image/png", True),
        ("CHART.JPEG", None, True),
        ("photo", "image/webp; charset=binary", True),
        ("anim.gif", "application/octet-stream", True),
        ("scan.bmp", None, True),
        ("notes.txt", "text/plain; charset=utf-8", None),
        ("photo.txt", "text/plain", None),  # declared text: its bytes are sniffed, and decide
        ("report.pdf", "application/pdf", "pdf"),
        ("scan", "application/pdf", "pdf"),
        ("archive.png.zip", "application/zip", None),
    ],
)
def test_declared_kinds_by_content_type_or_name(
    filename: str, content_type: str | None, expected: str | None
) -> None:
    attachment = Attachment(1, filename, "http://x/", 10, content_type)
    assert declared_kind(attachment) == ("image" if expected is True else expected)


def test_sniffing_knows_the_supported_signatures() -> None:
    image = chart()
    assert sniff_format(encode(image, "PNG")) == "PNG"
    assert sniff_format(encode(image, "JPEG")) == "JPEG"
    assert sniff_format(encode(image, "GIF")) == "GIF"
    assert sniff_format(encode(image, "BMP")) == "BMP"
    if features.check("webp"):
        assert sniff_format(encode(image, "WEBP")) == "WEBP"
    assert sniff_format(b"%PDF-1.7\n") is None
    assert sniff_format(b"") is None


# --- decoding -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_every_supported_format_decodes_to_rgb(fmt: str) -> None:
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow was built without WebP")
    image = decode_image(encode(chart(), fmt), f"chart.{fmt.lower()}")
    assert image.mode == "RGB"
    assert image.size == (64, 48)
    red, green, blue = image.getpixel((32, 24))  # type: ignore[misc]
    assert blue > 150 and red < 120, (red, green, blue)


def test_the_bytes_decide_not_the_name() -> None:
    # A PNG named like a JPEG is read as the PNG it is.
    assert decode_image(encode(chart(), "PNG"), "photo.jpg").size == (64, 48)
    # A PDF named .png, and formats Pillow could read but the bot does not take, are refused.
    for data in (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", encode(chart(), "TIFF"), encode(chart(), "ICO")):
        with pytest.raises(ImageProblem) as refused:
            decode_image(data, "report.png")
        assert str(refused.value) == "`report.png` is not an image (PNG, JPEG, WebP, GIF or BMP)."


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\nnope",
        encode(chart((300, 200)), "PNG")[:200],
        encode(chart((300, 200)), "JPEG")[:300],
        b"GIF89a\x01",
        b"BM" + b"\0" * 10,
    ],
    ids=["png-signature-only", "truncated-png", "truncated-jpeg", "gif-header-only", "bmp-header-only"],
)
def test_broken_images_are_refused_clearly(data: bytes) -> None:
    with pytest.raises(ImageProblem) as refused:
        decode_image(data, "broken.png")
    assert str(refused.value) == "I could not read `broken.png` as an image."


def test_a_decompression_bomb_is_refused_from_its_header_without_decoding() -> None:
    bomb = png_header_only(50_000, 50_000)  # 2.5 gigapixels in under 100 bytes
    assert len(bomb) < 100
    with pytest.raises(ImageProblem) as refused:
        decode_image(bomb, "bomb.png")
    assert str(refused.value) == (
        "`bomb.png` has too many pixels (2500 megapixels): the limit is 40 megapixels."
    )
    # Between our limit and Pillow's: our own header check refuses it.
    just_over = png_header_only(8_000, 5_001)
    with pytest.raises(ImageProblem) as refused:
        decode_image(just_over, "big.png")
    assert str(refused.value) == "`big.png` has too many pixels (40 megapixels): the limit is 40 megapixels."
    # A small limit applies to real images too.
    with pytest.raises(ImageProblem, match="too many pixels"):
        decode_image(encode(chart((101, 100)), "PNG"), "a.png", max_pixels=10_000)


def test_pillows_own_bomb_limit_follows_the_fetchers() -> None:
    ImageFetcher(ImageLimits(max_pixels=1_000_000))
    assert Image.MAX_IMAGE_PIXELS == 1_000_000
    # Pillow itself now refuses above twice that, whoever opens the image.
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(png_header_only(2_000, 1_001)))


def test_only_the_first_frame_of_an_animation_is_used() -> None:
    frames = [chart(color="red"), chart(color="blue")]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    image = decode_image(data, "anim.gif")
    red, _, blue = image.getpixel((32, 24))  # type: ignore[misc]
    assert red > 200 and blue < 60


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encode(chart((80, 40)), "JPEG", exif=exif.tobytes())
    assert decode_image(data, "phone.jpg").size == (40, 80)


def test_transparency_is_laid_over_white() -> None:
    clear_red = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    half_blue = Image.new("RGBA", (8, 8), (0, 0, 255, 128))
    assert decode_image(encode(clear_red, "PNG"), "a.png").getpixel((0, 0)) == (255, 255, 255)
    red, green, blue = decode_image(encode(half_blue, "PNG"), "b.png").getpixel((0, 0))  # type: ignore[misc]
    assert blue == 255 and 120 <= red <= 135 and red == green
    grey_alpha = Image.new("LA", (8, 8), (0, 0))
    assert decode_image(encode(grey_alpha, "PNG"), "c.png").getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255])
    gif = encode(palette, "GIF", transparency=1)
    assert decode_image(gif, "d.gif").getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_greyscale_keeps_its_greys() -> None:
    levels = np.array([[0, 32768, 65535]], dtype=np.uint16)
    image = decode_image(encode(Image.fromarray(levels), "PNG"), "depth.png")
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def hd_target(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """Our reading of what Phi-3-vision's processor resizes an image to (before padding).

    The longer side becomes ``s * 336`` for the largest ``s`` with ``s * ceil(s / ratio)``
    at most ``num_crops``; the shorter side keeps the ratio.
    """
    long_side, short_side = max(width, height), min(width, height)
    ratio = long_side / short_side
    scale = 1
    while (scale + 1) * math.ceil((scale + 1) / ratio) <= num_crops:
        scale += 1
    resized = (scale * 336, int(scale * 336 / ratio))
    return resized if width >= height else (resized[1], resized[0])


def test_the_size_cap_matches_what_the_model_can_use() -> None:
    assert model_size_cap(10_000, 10_000) == (1344, 1344)
    assert model_size_cap(20_000, 1_000) == (5376, 269)
    assert model_size_cap(4_000, 8_000) == (1344, 2688)
    assert model_size_cap(1280, 720) == (1280, 720)  # small images are left to the processor
    assert model_size_cap(10_000, 10_000, max_crops=25) == (1680, 1680)
    # Never below what the processor resizes to, for any shape: nothing the model sees is lost.
    rng = np.random.default_rng(7)
    for _ in range(2000):
        width, height = (int(v) for v in rng.integers(1, 30_000, 2))
        for crops in (4, 16):
            capped = model_size_cap(width, height, max_crops=crops)
            target = hd_target(width, height, crops)
            if capped != (width, height):
                assert capped[0] >= target[0] - 1 and capped[1] >= target[1] - 1, (width, height, crops)


def test_very_large_images_are_scaled_down_before_the_model() -> None:
    big = chart((4000, 3000))
    for fmt in ("PNG", "JPEG"):  # JPEG goes through Pillow's draft mode (decodes at 1/2 scale)
        image = decode_image(encode(big, fmt, **({"quality": 70} if fmt == "JPEG" else {})), f"big.{fmt}")
        assert image.size == (1792, 1344), fmt
        assert image.mode == "RGB"


# --- settings -------------------------------------------------------------------------------


def test_limits_come_from_the_settings() -> None:
    defaults = ImageLimits.from_settings(BotSettings.from_env({"DISCORD_TOKEN": "t"}))
    assert defaults == ImageLimits()
    assert (defaults.max_bytes, defaults.max_pixels, defaults.max_images) == (20 * 1024 * 1024, 40_000_000, 4)
    assert defaults.download_timeout_seconds == 30.0 and defaults.max_crops == 16
    env = {
        "DISCORD_TOKEN": "t",
        "MAX_IMAGE_BYTES": "1000",
        "MAX_IMAGE_PIXELS": "5000",
        "MAX_IMAGES": "2",
        "IMAGE_DOWNLOAD_TIMEOUT_SECONDS": "2.5",
        "NUM_CROPS": "25",
    }
    expected = ImageLimits(1000, 5000, 2, 2.5, 25)
    assert ImageLimits.from_settings(BotSettings.from_env(env)) == expected
    for name, value in (("MAX_IMAGE_BYTES", "lots"), ("MAX_IMAGES", "0"), ("MAX_IMAGE_PIXELS", "-1")):
        with pytest.raises(SettingsError, match=name):
            BotSettings.from_env({"DISCORD_TOKEN": "t", name: value})


# --- downloading ----------------------------------------------------------------------------


@dataclass
class Cdn:
    """A tiny CDN: ``/files/{name}`` serves ``files[name]``; ``hits`` counts requests."""

    base: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)
    served_bytes: dict[str, int] = field(default_factory=dict)
    _next_id: int = 1

    def attachment(
        self, name: str, data: bytes, content_type: str | None = "image/png", *, declared: int | None = None
    ) -> Attachment:
        self.files[name] = data
        self._next_id += 1
        size = len(data) if declared is None else declared
        return Attachment(self._next_id, name, f"{self.base}/files/{name}", size, content_type)

    def missing(self, name: str) -> Attachment:
        return Attachment(999, name, f"{self.base}/missing/{name}", 10, "image/png")


@pytest_asyncio.fixture
async def cdn() -> AsyncIterator[Cdn]:
    state = Cdn()

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        state.hits.append(name)
        if name.startswith("slow"):
            await asyncio.sleep(30)
        if name.startswith("endless"):  # no Content-Length, never ends: only the cap stops it
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(b"\x89PNG\r\n\x1a\n")  # an image, as far as its first bytes go
            chunk = b"\0" * 65536
            sent = 0
            try:
                while True:
                    await response.write(chunk)
                    sent += len(chunk)
                    state.served_bytes[name] = sent
            except (ConnectionError, asyncio.CancelledError):
                return response
        if name not in state.files:
            return web.Response(status=404)
        return web.Response(body=state.files[name], content_type="image/png")

    app = web.Application()
    app.router.add_get("/files/{name}", serve)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.base = f"http://127.0.0.1:{port}"
    yield state
    await runner.cleanup()


async def test_collect_downloads_and_decodes_in_order(cdn: Cdn) -> None:
    attachments = [
        cdn.attachment("one.png", encode(chart(color="red"), "PNG")),
        cdn.attachment("notes.txt", b"hello", "text/plain"),
        cdn.attachment("two.jpg", encode(chart(color="blue"), "JPEG"), "image/jpeg"),
    ]
    async with ImageFetcher() as fetcher:
        collected = await fetcher.collect(attachments)
    assert isinstance(collected, CollectedImages)
    assert [image.getpixel((32, 24))[0] > 200 for image in collected.images] == [True, False]  # type: ignore[index]
    assert collected.notices == ["Skipped `notes.txt`: not an image."]
    assert sorted(cdn.hits) == ["notes.txt", "one.png", "two.jpg"]  # the bytes decide: all are read


async def test_the_bytes_decide_whatever_the_name_and_type(cdn: Cdn) -> None:
    attachments = [
        cdn.attachment("upload.bin", encode(chart(), "PNG"), "application/octet-stream"),
        cdn.attachment("photo.txt", encode(chart(), "JPEG"), "text/plain"),
        cdn.attachment("notes.txt", b"just some notes " * 200, "text/plain"),
    ]
    async with ImageFetcher() as fetcher:
        collected = await fetcher.collect(attachments)
        assert [p.name for p in collected.pictures] == ["upload.bin", "photo.txt"]
        assert collected.notices == ["Skipped `notes.txt`: not an image."]
        with pytest.raises(ImageProblem) as refused:  # a slash command's option must be one
            await fetcher.collect(attachments, strict=True)
    assert str(refused.value) == "`notes.txt` is not an image (PNG, JPEG, WebP, GIF or BMP)."


async def test_a_url_off_the_allowed_hosts_is_never_requested(cdn: Cdn) -> None:
    from bot.media_urls import MediaHosts
    from bot.sources import MediaSource

    attachment = cdn.attachment("a.png", encode(chart(), "PNG"))
    linked = MediaSource("e", "a.png", attachment.url, declared="image", discord_hosts_only=True)
    async with ImageFetcher(hosts=MediaHosts("http://127.0.0.1:1/api/v10")) as fetcher:
        with pytest.raises(ImageProblem, match="Discord's own servers"):
            await fetcher.collect([linked])
        assert cdn.hits == []
        collected = await fetcher.collect([attachment])  # Discord's own attachment URL: fetched
    assert len(collected.images) == 1 and cdn.hits == ["a.png"]


async def test_more_images_than_the_limit_uses_the_first_ones_and_says_so(cdn: Cdn) -> None:
    attachments = [cdn.attachment(f"{n}.png", encode(chart(), "PNG")) for n in "abcde"]
    async with ImageFetcher(ImageLimits(max_images=3)) as fetcher:
        collected = await fetcher.collect(attachments)
    assert len(collected.images) == 3
    assert collected.notices == ["I look at 3 images at a time, so I left out `d.png`, `e.png`."]
    assert sorted(cdn.hits) == ["a.png", "b.png", "c.png"]


async def test_a_declared_size_over_the_limit_is_refused_before_downloading(cdn: Cdn) -> None:
    huge = cdn.attachment("huge.png", b"x", declared=25 * 1024 * 1024)
    async with ImageFetcher() as fetcher:
        with pytest.raises(ImageProblem) as refused:
            await fetcher.collect([huge])
    assert str(refused.value) == "`huge.png` is too large (25 MB): the limit is 20 MB per image."
    assert cdn.hits == []


async def test_a_download_larger_than_declared_stops_at_the_limit(cdn: Cdn) -> None:
    liar = cdn.attachment("liar.png", noise_png(200), declared=100)  # Content-Length says the truth
    endless = Attachment(50, "endless.png", f"{cdn.base}/files/endless.png", 100, "image/png")
    async with ImageFetcher(ImageLimits(max_bytes=50 * 1024)) as fetcher:
        with pytest.raises(ImageProblem) as refused:
            await fetcher.fetch(liar)
        assert str(refused.value).startswith("`liar.png` is too large (")
        with pytest.raises(ImageProblem) as refused:
            await fetcher.fetch(endless)
        assert str(refused.value) == "`endless.png` is too large: the limit is 50 KB per image."
    await asyncio.sleep(0.1)
    assert cdn.served_bytes["endless.png"] < 10 * 1024 * 1024  # the client hung up near the cap


async def test_failed_and_slow_downloads_get_clear_problems(cdn: Cdn) -> None:
    async with ImageFetcher(ImageLimits(download_timeout_seconds=0.3)) as fetcher:
        with pytest.raises(ImageProblem) as refused:
            await fetcher.fetch(cdn.missing("gone.png"))
        assert str(refused.value) == "I could not download `gone.png` (HTTP 404). Try sending it again."
        with pytest.raises(ImageProblem) as refused:
            await fetcher.fetch(Attachment(9, "slow.png", f"{cdn.base}/files/slow.png", 10, "image/png"))
        assert str(refused.value) == (
            "Downloading `slow.png` took too long (over 0.3 s). Try again in a moment."
        )
        with pytest.raises(ImageProblem) as refused:
            await fetcher.fetch(Attachment(9, "x.png", "http://127.0.0.1:9/x.png", 10, "image/png"))
        assert str(refused.value) == "I could not download `x.png`. Try sending it again."
        # The fetcher still works after all that.
        ok = await fetcher.fetch(cdn.attachment("ok.png", encode(chart(), "PNG")))
        assert ok.images[0].size == (64, 48)


async def test_one_bad_image_refuses_the_request_at_once(cdn: Cdn) -> None:
    attachments = [
        cdn.attachment("good.png", encode(chart(), "PNG")),
        cdn.attachment("report.png", b"%PDF-1.4\n"),
        Attachment(9, "slow.png", f"{cdn.base}/files/slow.png", 10, "image/png"),
    ]
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with ImageFetcher(ImageLimits(download_timeout_seconds=20)) as fetcher:
        with pytest.raises(ImageProblem) as refused:
            await fetcher.collect(attachments)
    assert str(refused.value) == "I could not read `report.png` as a PDF."  # the bytes decide
    assert loop.time() - started < 5  # the slow download was given up, not waited for


async def test_decoding_runs_off_the_event_loop(cdn: Cdn, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []
    real_decode = images_module.decode_image

    def recording_decode(*args: Any, **kwargs: Any) -> Image.Image:
        threads.append(threading.current_thread())
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(images_module, "decode_image", recording_decode)
    async with ImageFetcher() as fetcher:
        await fetcher.fetch(cdn.attachment("a.png", encode(chart(), "PNG")))
    assert threads and threads[0] is not threading.main_thread()


async def test_the_session_is_made_once_and_closed_only_when_owned(cdn: Cdn) -> None:
    fetcher = ImageFetcher()
    await fetcher.fetch(cdn.attachment("a.png", encode(chart(), "PNG")))
    session = fetcher._session
    await fetcher.fetch(cdn.attachment("b.png", encode(chart(), "PNG")))
    assert fetcher._session is session is not None
    await fetcher.close()
    assert session.closed
    async with aiohttp.ClientSession() as shared:
        borrowing = ImageFetcher(session=shared)
        await borrowing.fetch(cdn.attachment("c.png", encode(chart(), "PNG")))
        await borrowing.close()
        assert not shared.closed


# --- thread conversations -------------------------------------------------------------------


BOT_ID, ALICE_ID = 1, 2


class FakeThread:
    """Stands in for a discord.Thread made from ``starter``: what bot/history.py reads."""

    def __init__(self, starter: Any, messages: list[Any]) -> None:
        self.id = starter.id
        self.starter_message = starter
        self._messages = messages
        self.parent = None

    async def history(self, *, limit: int, before: Any = None) -> AsyncIterator[Any]:
        """Newest first, as discord.py's default; `before` a snowflake-like object or None."""
        older = [m for m in self._messages if before is None or m.id < before.id]
        for message in reversed(older[-limit:]):
            yield message


def message(message_id: int, author_id: int, content: str, attachments: Sequence[Attachment] = ()) -> Any:
    author = SimpleNamespace(id=author_id, bot=author_id == BOT_ID)
    return SimpleNamespace(
        id=message_id,
        author=author,
        content=content,
        attachments=list(attachments),
        embeds=[],
        stickers=[],
        reference=None,
        type=discord.MessageType.default,
    )


async def test_a_thread_keeps_the_newest_images_then_the_earliest_within_the_limit(cdn: Cdn) -> None:
    bot_user = SimpleNamespace(id=BOT_ID)
    first = [cdn.attachment(f"{n}.png", encode(chart(), "PNG")) for n in "abc"]
    newest = [cdn.attachment(f"{n}.png", encode(chart(), "PNG")) for n in "de"]
    starter = message(10, ALICE_ID, "<@1> what are these?", first)
    thread = FakeThread(
        starter,
        [
            message(11, BOT_ID, "Three charts."),
            message(12, ALICE_ID, "and these?", [*newest, cdn.attachment("notes.txt", b"hi", "text/plain")]),
        ],
    )
    async with ImageFetcher() as fetcher:
        rebuilt = await thread_conversation(thread, bot_user, "Describe.", fetcher)  # type: ignore[arg-type]
    turns = rebuilt.conversation.turns
    assert [(t.role, t.text, len(t.images)) for t in turns] == [
        ("user", "what are these?", 2),
        ("assistant", "Three charts.", 0),
        ("user", "and these?", 2),
    ]
    assert rebuilt.notices == [
        "Skipped `notes.txt`: not an image.",
        "I look at 4 images at a time, so this answer leaves out `c.png` from earlier in this thread.",
    ]
    assert "c.png" not in cdn.hits


async def test_an_earlier_broken_image_is_left_out_but_a_new_one_refuses(cdn: Cdn) -> None:
    bot_user = SimpleNamespace(id=BOT_ID)
    starter = message(10, ALICE_ID, "<@1> what is it?", [cdn.attachment("a.png", encode(chart(), "PNG"))])
    broken = message(12, ALICE_ID, "this one?", [cdn.attachment("broken.png", b"\x89PNG\r\n\x1a\nnope")])
    history = [message(11, BOT_ID, "A chart."), broken, message(13, BOT_ID, "⚠️ I could not read it.")]
    async with ImageFetcher() as fetcher:
        with pytest.raises(ImageProblem, match=r"broken\.png"):
            await thread_conversation(FakeThread(starter, [*history[:2]]), bot_user, "D.", fetcher)  # type: ignore[arg-type]
        follow_up = message(14, ALICE_ID, "ok, just the first then")
        rebuilt = await thread_conversation(
            FakeThread(starter, [*history, follow_up]),
            bot_user,  # type: ignore[arg-type]
            "D.",
            fetcher,
        )
    assert [len(t.images) for t in rebuilt.conversation.turns] == [1, 0, 0]
    assert rebuilt.notices == []  # the bot said so when broken.png was sent


async def test_a_thread_that_ends_with_an_answer_downloads_nothing(cdn: Cdn) -> None:
    starter = message(10, ALICE_ID, "<@1> hi", [cdn.attachment("a.png", encode(chart(), "PNG"))])
    thread = FakeThread(starter, [message(11, BOT_ID, "Hello.")])
    async with ImageFetcher() as fetcher:
        rebuilt = await thread_conversation(thread, SimpleNamespace(id=BOT_ID), "D.", fetcher)  # type: ignore[arg-type]
    assert rebuilt.conversation.turns[-1].role == "assistant"
    assert cdn.hits == []


def test_default_limits_match_the_documented_defaults() -> None:
    assert DEFAULT_MAX_IMAGE_BYTES == 20971520
    example = open(__file__.replace("tests/test_images.py", ".env.example")).read()
    for line in ("MAX_IMAGE_BYTES=20971520", "MAX_IMAGE_PIXELS=40000000", "MAX_IMAGES=4"):
        assert line in example.splitlines(), line


async def test_a_rebuild_ends_at_its_question_and_keeps_the_newest_of_a_long_thread(cdn: Cdn) -> None:
    starter = message(10, ALICE_ID, "<@1> first question")
    history = []
    for n in range(80):  # 160 messages: more than the rebuild reads
        history += [
            message(100 + 2 * n, ALICE_ID, f"question {n}"),
            message(101 + 2 * n, BOT_ID, f"answer {n}"),
        ]
    later = message(1000, ALICE_ID, "a later question")
    thread = FakeThread(starter, [*history, later])
    async with ImageFetcher() as fetcher:
        rebuilt = await thread_conversation(
            thread,
            SimpleNamespace(id=BOT_ID),  # type: ignore[arg-type]
            "D.",
            fetcher,
            up_to=258,  # "question 79": the one being answered, not the later one
            kind_of={101 + 2 * n: "answer" for n in range(80)}.get,
        )
    turns = rebuilt.conversation.turns
    assert turns[0].text == "first question"
    assert turns[-1].text == "question 79"
    assert turns[-2].text == "answer 78"
