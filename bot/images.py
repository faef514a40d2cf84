"""Images from Discord messages: which ones are images, downloading them safely, decoding.

The rules, in the order a request meets them:

1. **Which attachments are images.** The *bytes* decide: any attachment whose first bytes
   are a PNG, JPEG, WebP, GIF or BMP is an image, whatever its name or content type (a
   screenshot saved as ``upload.bin``), and one whose first bytes are a PDF is read as its
   pages (``bot/pdf.py``). An attachment whose type or name says image or PDF is *declared*
   one (its declared size is checked before downloading, and it counts towards the limit
   before any download); any other attachment is sniffed: its download stops after the
   first bytes unless they are an image or a PDF, and it is then skipped with a notice (a
   slash command refuses it instead). A declared image whose bytes are neither, or an
   HEIC, SVG or TIFF, is refused with a clear reply rather than guessed at. Embedded images
   and stickers (``bot/sources.py``) come as sources of the same shape.
2. **How many.** At most ``max_images`` images per request (a PDF's pages count one each),
   in order; the rest are left out with a notice, declared ones never downloaded.
3. **How big in bytes.** The size Discord declares is checked before downloading, and the
   download itself stops at ``max_bytes`` (``max_pdf_bytes`` for a PDF) whatever was
   declared (the body is streamed in chunks, after any content decoding). A failed (HTTP
   error, connection error) or slow (``download_timeout_seconds``) download is refused with
   a clear reply.
4. **How big in pixels.** The width and height are read from the header and checked
   against ``max_pixels`` before any pixel is decoded (decompression bombs: a few KB of PNG
   can claim 50000 x 50000 pixels). Pillow's own bomb limit is set to the same number as a
   second guard.
5. **Decoding** runs in a worker thread (a large PNG takes long enough to delay Discord's
   heartbeats), two at a time per bot to bound memory: the first frame of an animation,
   EXIF orientation applied, 16-bit greyscale scaled to 8 bits, transparency laid over
   white, then RGB. Very large images are scaled down to what the model can use at most
   (see :func:`model_size_cap`). A PDF's first ``max_pdf_pages`` pages are rendered the
   same way, in the same worker threads, at that size (``bot/pdf.py``).

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Protocol

import aiohttp
from PIL import Image, ImageOps, UnidentifiedImageError

from .media_urls import MediaHosts
from .pdf import DEFAULT_MAX_PDF_PAGES, PdfProblem, is_pdf, render_pdf
from .texts import (
    download_failed,
    download_too_slow,
    not_an_image,
    not_on_discord,
    pages_left_out,
    skipped_not_an_image,
    too_many_bytes,
    too_many_images,
    too_many_pixels,
    unreadable_image,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"})
# Pillow format names: Image.open(..., formats=...) tries these decoders and no others.
DECODERS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")

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


class NotMedia(ImageProblem):
    """The first bytes are neither an image the bot reads nor a PDF."""


class AttachmentLike(Protocol):
    """What is used of a :class:`discord.Attachment` (tests pass simple stand-ins); embedded
    images and stickers come as :class:`bot.sources.MediaSource`, which adds ``declared``."""

    id: Any  # unique within a conversation
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
    max_pdf_pages: int = DEFAULT_MAX_PDF_PAGES
    max_pdf_bytes: int = DEFAULT_MAX_IMAGE_BYTES

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
            max_pdf_pages=settings.max_pdf_pages,
            max_pdf_bytes=settings.max_pdf_bytes,
        )


# --- which attachments are images -----------------------------------------------------------


def looks_like_image(attachment: AttachmentLike) -> bool:
    """An image candidate: its content type or its name says image (its bytes decide later)."""
    content_type = (attachment.content_type or "").split(";")[0].strip().lower()
    if content_type.startswith("image/"):
        return True
    return PurePosixPath(attachment.filename).suffix.lower() in IMAGE_SUFFIXES


def looks_like_pdf(attachment: AttachmentLike) -> bool:
    content_type = (attachment.content_type or "").split(";")[0].strip().lower()
    return content_type == "application/pdf" or PurePosixPath(attachment.filename).suffix.lower() == ".pdf"


def declared_kind(source: AttachmentLike) -> str | None:
    """``image`` or ``pdf`` as the source's type or name says (its bytes decide later), else None."""
    declared = getattr(source, "declared", None)
    if declared:
        return str(declared)
    if looks_like_image(source):
        return "image"
    return "pdf" if looks_like_pdf(source) else None


# --- decoding -------------------------------------------------------------------------------

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)


def sniff_kind(data: bytes) -> str | None:
    """``image`` or ``pdf`` as the first bytes say, else None."""
    if sniff_format(data) is not None:
        return "image"
    return "pdf" if is_pdf(data) else None


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
        raise ImageProblem(unreadable_image(name)) from error
    with opened:
        width, height = opened.size
        if width < 1 or height < 1:
            raise ImageProblem(unreadable_image(name))
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
            raise ImageProblem(unreadable_image(name)) from error
    target = model_size_cap(image.width, image.height, max_crops)
    if target != image.size:
        image = image.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image


# --- downloading ----------------------------------------------------------------------------

_SNIFF_BYTES = 1024  # enough for every signature, and for a PDF header after some junk


@dataclass(frozen=True)
class Picture:
    """One image the model sees, and where it came from (a PDF's page: ``page`` from 1)."""

    image: Image.Image
    name: str
    page: int | None = None

    @property
    def label(self) -> str:
        return self.name if self.page is None else f"{self.name} page {self.page}"


@dataclass
class CollectedImages:
    """The images of a request, in order, and notices to show before the answer.

    ``notices`` are plain sentences (``Skipped `notes.txt`: not an image.``): show them as
    one message, each line ``notice(text)`` (``⚠️ `` in front), in the place of the answer.
    """

    pictures: list[Picture] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    @property
    def images(self) -> list[Image.Image]:
        return [picture.image for picture in self.pictures]


class ImageFetcher:
    """Downloads and decodes the images (and renders the PDFs) of one bot within its limits.

    One per bot: it owns an ``aiohttp`` session (created on first use, without the bot's
    token: the CDN needs none) unless one is passed in. Call :meth:`close` on shutdown.
    With ``hosts``, an embed's image on any other host is never requested (``bot/media_urls.py``).
    """

    def __init__(
        self,
        limits: ImageLimits | None = None,
        session: aiohttp.ClientSession | None = None,
        hosts: MediaHosts | None = None,
    ):
        self.limits = limits or ImageLimits()
        self.hosts = hosts
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
        self, sources: Sequence[AttachmentLike], *, strict: bool = False, max_images: int | None = None
    ) -> CollectedImages:
        """The images of ``sources`` in order (see the module's rules), or :class:`ImageProblem`.

        ``strict`` (slash commands, whose options are all meant to be images): a non-image
        refuses the request instead of being skipped with a notice. ``max_images``: another
        limit than the fetcher's (reading page by page, one image per answer).
        """
        limit = max_images or self.limits.max_images
        chosen: list[AttachmentLike] = []
        not_downloaded: list[str] = []
        declared = 0
        for source in sources:
            if declared_kind(source) is not None:
                if declared >= limit:
                    not_downloaded.append(source.filename)
                    continue
                declared += 1
            chosen.append(source)
        results = await self._fetch_together([self._fetch_or_skip(source, strict) for source in chosen])
        collected = CollectedImages()
        for result in results:
            collected.pictures += result.pictures
            collected.notices += result.notices
        left_out = [picture.label for picture in collected.pictures[limit:]] + not_downloaded
        del collected.pictures[limit:]
        if left_out:
            collected.notices.append(too_many_images(limit, left_out))
        return collected

    async def fetch_all(self, sources: Sequence[AttachmentLike]) -> list[Image.Image]:
        """Each source's images, in order, fetched together (a non-image is a problem).

        The first problem stops the others (no waiting for a slow download to time out
        before the reply); when several failed at once, the first in order is raised.
        """
        results = await self._fetch_together([self.fetch(source) for source in sources])
        return [picture.image for result in results for picture in result.pictures]

    async def _fetch_together(self, fetches: Sequence[Any]) -> list[CollectedImages]:
        tasks = [asyncio.ensure_future(fetch) for fetch in fetches]
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

    async def _fetch_or_skip(self, source: AttachmentLike, strict: bool) -> CollectedImages:
        try:
            return await self.fetch(source)
        except NotMedia:
            if strict or declared_kind(source) is not None:
                raise
            return CollectedImages(notices=[skipped_not_an_image(source.filename)])

    async def fetch(self, source: AttachmentLike) -> CollectedImages:
        """One source downloaded within the limits and decoded (or rendered) off the event loop:
        one picture for an image, the first pages for a PDF (with a notice if some are left out)."""
        data, kind = await self.download(source)
        name = source.filename
        async with self._decodes:
            if kind == "image":
                image = await asyncio.to_thread(
                    decode_image,
                    data,
                    name,
                    max_pixels=self.limits.max_pixels,
                    max_crops=self.limits.max_crops,
                )
                return CollectedImages([Picture(image, name)])
            try:
                rendered = await asyncio.to_thread(
                    render_pdf,
                    data,
                    name,
                    max_pages=self.limits.max_pdf_pages,
                    max_pixels=self.limits.max_pixels,
                    max_long_side=TILE * self.limits.max_crops,
                    max_short_side=TILE * math.isqrt(self.limits.max_crops),
                )
            except PdfProblem as problem:
                raise ImageProblem(str(problem)) from problem
        pictures = [Picture(page, name, number) for number, page in enumerate(rendered.pages, 1)]
        notices = []
        if rendered.total_pages > len(pictures):
            notices.append(pages_left_out(name, len(pictures), rendered.total_pages))
        return CollectedImages(pictures, notices)

    def _byte_limit(self, kind: str | None) -> int:
        if kind == "image":
            return self.limits.max_bytes
        if kind == "pdf":
            return self.limits.max_pdf_bytes
        return max(self.limits.max_bytes, self.limits.max_pdf_bytes)

    async def download(self, source: AttachmentLike) -> tuple[bytes, str]:
        """The source's bytes and what they are (``image`` or ``pdf``), within the byte limit
        of that kind whatever was declared; :class:`NotMedia` after the first bytes otherwise."""
        name, declared = source.filename, declared_kind(source)
        if declared is not None and source.size is not None and source.size > self._byte_limit(declared):
            raise ImageProblem(too_many_bytes(name, self._byte_limit(declared), source.size, declared))
        only_discord = getattr(source, "discord_hosts_only", False)
        if only_discord and self.hosts is not None and not self.hosts.allows(source.url):
            log.warning("not downloading %s: %s is not one of Discord's media hosts", name, source.url)
            raise ImageProblem(not_on_discord(name))
        timeout = aiohttp.ClientTimeout(total=self.limits.download_timeout_seconds)
        try:
            async with self._http().get(source.url, timeout=timeout) as response:
                if response.status != 200:
                    log.warning("download of %s failed: HTTP %d", name, response.status)
                    raise ImageProblem(download_failed(name, response.status))
                limit = self._byte_limit(declared)
                if response.content_length is not None and response.content_length > limit:
                    size = response.content_length
                    raise ImageProblem(too_many_bytes(name, limit, size, declared or "image"))
                body = bytearray()
                kind: str | None = None
                async for chunk in response.content.iter_chunked(_CHUNK):
                    body += chunk
                    if kind is None and len(body) >= _SNIFF_BYTES:
                        kind = self._kind_of(body, name, declared)
                        limit = self._byte_limit(kind)
                    if len(body) > limit:
                        log.warning("download of %s passed %d bytes (declared %s)", name, limit, source.size)
                        raise ImageProblem(too_many_bytes(name, limit, kind=kind or declared or "image"))
                if kind is None:
                    kind = self._kind_of(body, name, declared)
                    if len(body) > self._byte_limit(kind):
                        raise ImageProblem(too_many_bytes(name, self._byte_limit(kind), len(body), kind))
                return bytes(body), kind
        except (asyncio.TimeoutError, TimeoutError) as error:
            log.warning("download of %s timed out", name)
            raise ImageProblem(download_too_slow(name, self.limits.download_timeout_seconds)) from error
        except (aiohttp.ClientError, ValueError) as error:
            log.warning("download of %s failed: %r", name, error)
            raise ImageProblem(download_failed(name)) from error

    @staticmethod
    def _kind_of(data: bytearray, name: str, declared: str | None) -> str:
        kind = sniff_kind(bytes(data[:_SNIFF_BYTES]))
        if kind is None:
            log.info("%s is neither an image nor a PDF (declared %s)", name, declared)
            raise NotMedia(not_an_image(name))
        return kind
