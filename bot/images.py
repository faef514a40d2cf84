"""Images from Discord attachments: which ones are images, downloading them safely, decoding.

The rules, in the order a request meets them:

1. **Which attachments are images.** An attachment is an image *candidate* when its
   content type (which Discord sets by sniffing the upload) starts with ``image/`` or its
   name ends in .png, .jpg, .jpeg, .webp, .gif or .bmp. Anything else (``notes.txt``, a
   PDF, a zip) is skipped with a notice; a slash command's image option refuses it instead.
   The name and type only nominate: the *bytes* decide. A candidate is opened with
   Pillow's decoders for PNG, JPEG, WebP, GIF and BMP only, so a ``.png`` that is really a
   PDF, or an HEIC, SVG or TIFF, is refused with a clear reply rather than guessed at.
2. **How many.** At most ``max_images`` candidates per request, in order; the rest are
   left out with a notice and never downloaded.
3. **How big in bytes.** The size Discord declares is checked before downloading, and the
   download itself stops at ``max_bytes`` whatever was declared (the body is streamed in
   chunks, after any content decoding). A failed (HTTP error, connection error) or slow
   (``download_timeout_seconds``) download is refused with a clear reply.
4. **How big in pixels.** The width and height are read from the header and checked
   against ``max_pixels`` before any pixel is decoded (decompression bombs: a few KB of PNG
   can claim 50000 x 50000 pixels). Pillow's own bomb limit is set to the same number as a
   second guard.
5. **Decoding** runs in a worker thread (a large PNG takes long enough to delay Discord's
   heartbeats), two at a time per bot to bound memory: the first frame of an animation,
   EXIF orientation applied, 16-bit greyscale scaled to 8 bits, transparency laid over
   white, then RGB. Very large images are scaled down to what the model can use at most
   (see :func:`model_size_cap`).

A candidate that fails 3-5 refuses the whole request (:class:`ImageProblem`): the question
is about that image, and an answer without it would mislead. Texts of problems and notices
are plain sentences; the bot shows each with the notice prefix (``⚠️ ``), which also keeps
them out of rebuilt conversations.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Protocol

import aiohttp
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"})
# Pillow format names: Image.open(..., formats=...) tries these decoders and no others.
DECODERS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
KINDS = "PNG, JPEG, WebP, GIF or BMP"

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
DEFAULT_MAX_IMAGES = 4
DEFAULT_DOWNLOAD_TIMEOUT_SECONDS = 30.0
# Phi-3-vision cuts an image into tiles of 336 x 336 pixels, 16 of them at most by default.
TILE = 336
DEFAULT_MAX_CROPS = 16
DECODES_AT_ONCE = 2
_CHUNK = 64 * 1024


class ImageProblem(Exception):
    """An image the user sent cannot be used; the message (a plain sentence) is shown to them."""


class AttachmentLike(Protocol):
    """What is used of a :class:`discord.Attachment` (tests pass simple stand-ins)."""

    id: int
    filename: str
    size: int
    url: str
    content_type: str | None


# --- settings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageLimits:
    """The limits of one bot; build with :meth:`from_settings` (or :meth:`from_env`)."""

    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_images: int = DEFAULT_MAX_IMAGES
    download_timeout_seconds: float = DEFAULT_DOWNLOAD_TIMEOUT_SECONDS
    # The most tiles the model is ever asked to use for one image (NUM_CROPS, or 16).
    max_crops: int = DEFAULT_MAX_CROPS

    @classmethod
    def from_settings(cls, settings: Any) -> ImageLimits:
        """From a :class:`bot.settings.BotSettings` (which reads and checks the environment)."""
        num_crops = getattr(getattr(settings, "inference", None), "num_crops", None)
        return cls(
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            max_images=settings.max_images,
            download_timeout_seconds=settings.image_download_timeout_seconds,
            max_crops=max(DEFAULT_MAX_CROPS, num_crops or 0),
        )


# --- which attachments are images -----------------------------------------------------------


def looks_like_image(attachment: AttachmentLike) -> bool:
    """An image candidate: its content type or its name says image (its bytes decide later)."""
    content_type = (attachment.content_type or "").split(";")[0].strip().lower()
    if content_type.startswith("image/"):
        return True
    return PurePosixPath(attachment.filename).suffix.lower() in IMAGE_SUFFIXES


def image_attachments(attachments: Iterable[AttachmentLike]) -> list[AttachmentLike]:
    return [attachment for attachment in attachments if looks_like_image(attachment)]


def sort_attachments(
    attachments: Iterable[AttachmentLike], *, strict: bool = False
) -> tuple[list[AttachmentLike], list[str]]:
    """The image candidates, and a notice for each other attachment (``strict``: refuse it)."""
    candidates: list[AttachmentLike] = []
    notices: list[str] = []
    for attachment in attachments:
        if looks_like_image(attachment):
            candidates.append(attachment)
        elif strict:
            raise ImageProblem(not_an_image(attachment.filename))
        else:
            notices.append(skipped_not_an_image(attachment.filename))
    return candidates, notices


def not_an_image(name: str) -> str:
    return f"`{name}` is not an image ({KINDS})."


def skipped_not_an_image(name: str) -> str:
    return f"Skipped `{name}`: not an image."


def too_many_images(max_images: int, left_out: Sequence[str], *, earlier: bool = False) -> str:
    names = ", ".join(f"`{name}`" for name in left_out)
    if earlier:
        return (
            f"I look at {max_images} images at a time, "
            f"so this answer leaves out {names} from earlier in this thread."
        )
    return f"I look at {max_images} images at a time, so I left out {names}."


def _number(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}".removesuffix(".0")


def _bytes_text(size: int) -> str:
    if size >= 1024 * 1024:
        return f"{_number(size / (1024 * 1024))} MB"
    return f"{_number(size / 1024)} KB"


def too_many_bytes(name: str, max_bytes: int, size: int | None = None) -> str:
    actual = f" ({_bytes_text(size)})" if size is not None else ""
    return f"`{name}` is too large{actual}: the limit is {_bytes_text(max_bytes)} per image."


def too_many_pixels(name: str, max_pixels: int, pixels: int | None = None) -> str:
    actual = f" ({_number(pixels / 1_000_000)} megapixels)" if pixels is not None else ""
    return f"`{name}` has too many pixels{actual}: the limit is {_number(max_pixels / 1_000_000)} megapixels."


# --- decoding -------------------------------------------------------------------------------

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)


def sniff_format(data: bytes) -> str | None:
    """The supported format the first bytes announce, or None (then it is no image we read)."""
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def model_size_cap(width: int, height: int, max_crops: int = DEFAULT_MAX_CROPS) -> tuple[int, int]:
    """The size to scale a ``width`` x ``height`` image down to before the processor.

    Phi-3-vision's processor (``HD_transform`` in the hub's ``image_processing_phi3_v.py``)
    always resizes an image, keeping its aspect ratio, so that its longer side is
    ``s * 336`` for the largest whole ``s`` whose grid of ``s`` by ``ceil(s / ratio)``
    tiles has at most ``num_crops`` tiles; then it pads to whole tiles. So the model never
    sees a longer side above ``336 * num_crops`` (``s <= num_crops``) nor a shorter side
    above ``336 * isqrt(num_crops)`` (the shorter side is at most ``336 * min(s, ceil(s /
    ratio))``, and the product of the two is at most ``num_crops``): 5376 and 1344 pixels
    for 16 tiles. Scaling down to within both, aspect ratio kept, never below what the
    processor resizes to, loses nothing the model would see (up to a pixel of rounding), and
    saves it resizing a 40-megapixel image on the GPU worker's thread. Smaller images are
    left alone (the processor scales them up itself).
    """
    long_cap = TILE * max_crops
    short_cap = TILE * math.isqrt(max_crops)
    long_side, short_side = max(width, height), min(width, height)
    factor = min(1.0, long_cap / long_side, short_cap / short_side)
    if factor >= 1.0:
        return width, height
    return max(1, round(width * factor)), max(1, round(height * factor))


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for the processor: transparency over white (not black), 16-bit greyscale scaled."""
    if image.mode.startswith("I"):  # 16-bit greyscale PNG: convert("RGB") would clip to white
        image = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    if _has_transparency(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(
    data: bytes,
    name: str,
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_crops: int = DEFAULT_MAX_CROPS,
) -> Image.Image:
    """Bytes to an RGB image ready for the model, or :class:`ImageProblem`. Blocking: call in a thread."""
    try:
        opened = Image.open(io.BytesIO(data), formats=DECODERS)  # lazy: reads the header only
    except Image.DecompressionBombError as error:  # Pillow's own limit, before ours: size in its text
        log.info("refused %s: %s", name, error)
        found = re.search(r"\((\d+) pixels\)", str(error))
        raise ImageProblem(too_many_pixels(name, max_pixels, int(found[1]) if found else None)) from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        # Pillow's "cannot identify image file <_io.BytesIO object at 0x…>" says no more than this.
        reason = "not a format Pillow knows" if isinstance(error, UnidentifiedImageError) else error
        log.info("cannot open %s: %s", name, reason)
        if sniff_format(data) is None:
            raise ImageProblem(not_an_image(name)) from error
        raise ImageProblem(f"I could not read `{name}` as an image.") from error
    with opened:
        width, height = opened.size
        if width < 1 or height < 1:
            raise ImageProblem(f"I could not read `{name}` as an image.")
        if width * height > max_pixels:
            log.info("refused %s: %d x %d pixels", name, width, height)
            raise ImageProblem(too_many_pixels(name, max_pixels, width * height))
        target = model_size_cap(width, height, max_crops)
        try:
            if opened.format == "JPEG" and target != (width, height):
                # Decode at 1/2, 1/4 or 1/8 scale straight from the DCT, never below `target`.
                opened.draft(None, target)
            opened.seek(0)  # the first frame of an animation
            opened.load()
            image = ImageOps.exif_transpose(opened)
            image = to_rgb(image)
        except Image.DecompressionBombError as error:
            raise ImageProblem(too_many_pixels(name, max_pixels, width * height)) from error
        except (OSError, ValueError, SyntaxError, EOFError, IndexError) as error:
            log.info("cannot decode %s: %s", name, error)
            raise ImageProblem(f"I could not read `{name}` as an image.") from error
    target = model_size_cap(image.width, image.height, max_crops)
    if target != image.size:
        image = image.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image


# --- downloading ----------------------------------------------------------------------------


@dataclass
class CollectedImages:
    """The images of a request, in order, and notices to show before the answer.

    ``notices`` are plain sentences (``Skipped `notes.txt`: not an image.``): show them as
    one message, each line ``notice(text)`` (``⚠️ `` in front), in the place of the answer.
    """

    images: list[Image.Image] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


class ImageFetcher:
    """Downloads and decodes the images of one bot within its :class:`ImageLimits`.

    One per bot: it owns an ``aiohttp`` session (created on first use, without the bot's
    token: the CDN needs none) unless one is passed in. Call :meth:`close` on shutdown.
    """

    def __init__(self, limits: ImageLimits | None = None, session: aiohttp.ClientSession | None = None):
        self.limits = limits or ImageLimits()
        self._session = session
        self._owns_session = session is None
        self._decodes = asyncio.Semaphore(DECODES_AT_ONCE)
        # A second guard behind the header check (process-wide; the bot has one fetcher).
        # Pillow warns above this many pixels and refuses above twice as many.
        Image.MAX_IMAGE_PIXELS = self.limits.max_pixels

    async def __aenter__(self) -> ImageFetcher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._owns_session = True
        return self._session

    async def collect(
        self, attachments: Sequence[AttachmentLike], *, strict: bool = False
    ) -> CollectedImages:
        """The images among ``attachments`` (see the module's rules), or :class:`ImageProblem`.

        ``strict`` (slash commands, whose options are all meant to be images): a non-image
        refuses the request instead of being skipped with a notice.
        """
        candidates, notices = sort_attachments(attachments, strict=strict)
        if len(candidates) > self.limits.max_images:
            left_out = candidates[self.limits.max_images :]
            candidates = candidates[: self.limits.max_images]
            notices.append(too_many_images(self.limits.max_images, [a.filename for a in left_out]))
        return CollectedImages(await self.fetch_all(candidates), notices)

    async def fetch_all(self, attachments: Sequence[AttachmentLike]) -> list[Image.Image]:
        """Each attachment as an image, in order, fetched together.

        The first problem stops the others (no waiting for a slow download to time out
        before the reply); when several failed at once, the first in order is raised.
        """
        tasks = [asyncio.ensure_future(self.fetch(attachment)) for attachment in attachments]
        if not tasks:
            return []
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        failures = [task.exception() for task in tasks if not task.cancelled() and task.exception()]
        if failures:
            raise failures[0]  # type: ignore[misc]
        return [task.result() for task in tasks]

    async def fetch(self, attachment: AttachmentLike) -> Image.Image:
        """One attachment downloaded within the limits and decoded off the event loop."""
        data = await self.download(attachment)
        async with self._decodes:
            return await asyncio.to_thread(
                decode_image,
                data,
                attachment.filename,
                max_pixels=self.limits.max_pixels,
                max_crops=self.limits.max_crops,
            )

    async def download(self, attachment: AttachmentLike) -> bytes:
        """The attachment's bytes, at most ``max_bytes`` of them whatever Discord declared."""
        name, max_bytes = attachment.filename, self.limits.max_bytes
        if attachment.size is not None and attachment.size > max_bytes:
            raise ImageProblem(too_many_bytes(name, max_bytes, attachment.size))
        timeout = aiohttp.ClientTimeout(total=self.limits.download_timeout_seconds)
        try:
            async with self._http().get(attachment.url, timeout=timeout) as response:
                if response.status != 200:
                    log.warning("download of %s failed: HTTP %d", name, response.status)
                    raise ImageProblem(
                        f"I could not download `{name}` (HTTP {response.status}). Try sending it again."
                    )
                if response.content_length is not None and response.content_length > max_bytes:
                    raise ImageProblem(too_many_bytes(name, max_bytes, response.content_length))
                body = bytearray()
                async for chunk in response.content.iter_chunked(_CHUNK):
                    body += chunk
                    if len(body) > max_bytes:
                        log.warning(
                            "download of %s passed %d bytes (declared %s)", name, max_bytes, attachment.size
                        )
                        raise ImageProblem(too_many_bytes(name, max_bytes))
                return bytes(body)
        except (asyncio.TimeoutError, TimeoutError) as error:
            log.warning("download of %s timed out", name)
            raise ImageProblem(
                f"Downloading `{name}` took too long (over {self.limits.download_timeout_seconds:g} s). "
                "Try again in a moment."
            ) from error
        except (aiohttp.ClientError, ValueError) as error:
            log.warning("download of %s failed: %r", name, error)
            raise ImageProblem(f"I could not download `{name}`. Try sending it again.") from error
