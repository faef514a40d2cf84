"""Images from Discord attachments: which attachments are images, downloading, decoding.

Decoding runs in a worker thread: a large PNG takes long enough to delay heartbeats.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterable
from pathlib import PurePosixPath

import discord
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"})


class ImageProblem(Exception):
    """An attachment the user sent cannot be used; the message is shown to them."""


def looks_like_image(attachment: discord.Attachment) -> bool:
    content_type = (attachment.content_type or "").split(";")[0].strip().lower()
    if content_type.startswith("image/"):
        return True
    return PurePosixPath(attachment.filename).suffix.lower() in IMAGE_SUFFIXES


def image_attachments(attachments: Iterable[discord.Attachment]) -> list[discord.Attachment]:
    return [attachment for attachment in attachments if looks_like_image(attachment)]


def decode_image(data: bytes, name: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.seek(0)  # first frame of an animation
            image = ImageOps.exif_transpose(opened)
            if image.mode in ("RGBA", "LA", "P"):
                rgba = image.convert("RGBA")
                background = Image.new("RGB", rgba.size, "white")
                background.paste(rgba, mask=rgba.getchannel("A"))
                return background
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        log.info("cannot decode %s: %s", name, error)
        raise ImageProblem(f"I could not read `{name}` as an image.") from error


async def download_image(attachment: discord.Attachment) -> Image.Image:
    try:
        data = await attachment.read()
    except discord.HTTPException as error:
        log.warning("download of %s failed: %s", attachment.filename, error)
        raise ImageProblem(f"I could not download `{attachment.filename}`.") from error
    return await asyncio.to_thread(decode_image, data, attachment.filename)


async def download_images(attachments: Iterable[discord.Attachment]) -> list[Image.Image]:
    return list(await asyncio.gather(*(download_image(a) for a in attachments)))
