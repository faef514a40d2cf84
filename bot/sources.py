"""What in a Discord message can be an image: attachments, embedded images, stickers.

In the order the model sees them: the attachments (images and PDFs; the bytes decide, see
``bot/images.py``), then each embed's image (Discord unfurls a pasted image link into an
embed with an ``image`` or ``thumbnail``, usually in a MESSAGE_UPDATE a moment after the
message), then the stickers. An embedded image is fetched only from Discord's media proxy
(its ``proxy_url``), never from the host the link names; a sticker from Discord's sticker
URL. What cannot be used is named in a notice: an embed on another host, a Lottie sticker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import discord
import yarl

from .media_urls import MediaHosts, host_of
from .texts import foreign_embed, lottie_sticker

log = logging.getLogger(__name__)

#: How long a question with a link but no embed yet waits for Discord's unfurl.
UNFURL_WAIT_SECONDS = 2.0
_LINK = re.compile(r"https?://\S+", re.IGNORECASE)


@dataclass(frozen=True)
class MediaSource:
    """One thing to download: what :class:`bot.images.ImageFetcher` reads (like an attachment)."""

    id: Hashable
    filename: str  # the name people see in notices
    url: str
    size: int | None = None
    content_type: str | None = None
    declared: str | None = None  # "image" for embeds and stickers; attachments: their type or name
    # A URL that came with a user's link (an embed): downloaded only from Discord's media hosts.
    discord_hosts_only: bool = False


@dataclass
class MessageMedia:
    sources: list[MediaSource] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    def __iadd__(self, other: MessageMedia) -> MessageMedia:
        self.sources += other.sources
        self.notices += other.notices
        return self


def from_attachment(attachment: discord.Attachment) -> MediaSource:
    return MediaSource(
        id=("attachment", attachment.id),
        filename=attachment.filename,
        url=attachment.url,
        size=attachment.size,
        content_type=attachment.content_type,
    )


def _embed_name(url: str | None, index: int) -> str:
    try:
        name = PurePosixPath(yarl.URL(url or "").path).name
    except (ValueError, TypeError):
        name = ""
    return name or f"embedded image {index}"


def embed_media(message: discord.Message, hosts: MediaHosts) -> MessageMedia:
    """The image of each embed (its ``image``, else its ``thumbnail``), via Discord's proxy only."""
    media = MessageMedia()
    for index, embed in enumerate(message.embeds, 1):
        picture = embed.image if (embed.image.url or embed.image.proxy_url) else embed.thumbnail
        if not (picture.url or picture.proxy_url):
            continue  # an embed without a picture: a text card, a video without a preview
        proxy_url = picture.proxy_url
        if not hosts.allows(proxy_url):
            log.info("skipped an embedded image of message %s: %s", message.id, proxy_url or picture.url)
            media.notices.append(foreign_embed(host_of(proxy_url or picture.url)))
            continue
        media.sources.append(
            MediaSource(
                id=("embed", message.id, index),
                filename=_embed_name(picture.url or proxy_url, index),
                url=str(proxy_url),
                content_type=getattr(picture, "content_type", None),
                declared="image",
                discord_hosts_only=True,
            )
        )
    return media


def sticker_media(message: discord.Message, hosts: MediaHosts) -> MessageMedia:
    """PNG, APNG and GIF stickers (the first frame is read); Lottie ones are skipped with a notice."""
    media = MessageMedia()
    for sticker in message.stickers:
        if sticker.format is discord.StickerFormatType.lottie:
            media.notices.append(lottie_sticker(sticker.name))
            continue
        media.sources.append(
            MediaSource(
                id=("sticker", message.id, sticker.id),
                filename=sticker.name,
                url=hosts.built(sticker.url),
                declared="image",
            )
        )
    return media


def message_media(message: discord.Message, hosts: MediaHosts) -> MessageMedia:
    """Everything in ``message`` that can be an image, in order, and notices for what cannot."""
    media = MessageMedia([from_attachment(attachment) for attachment in message.attachments])
    media += embed_media(message, hosts)
    media += sticker_media(message, hosts)
    return media


def awaits_unfurl(message: discord.Message) -> bool:
    """A link in the text but no embed yet: Discord's unfurl may still be on its way."""
    return not message.embeds and _LINK.search(message.content or "") is not None


async def wait_for_unfurl(
    client: discord.Client, message: discord.Message, timeout: float = UNFURL_WAIT_SECONDS
) -> None:
    """Until the message's embeds arrive (a MESSAGE_UPDATE), at most ``timeout`` seconds.

    discord.py updates its cached message in place; a message it did not cache takes the
    embeds from the event.
    """
    if not awaits_unfurl(message):
        return

    def unfurled(event: discord.RawMessageUpdateEvent) -> bool:
        return event.message_id == message.id and bool(event.data.get("embeds"))

    with contextlib.suppress(asyncio.TimeoutError):
        event = await client.wait_for("raw_message_edit", check=unfurled, timeout=timeout)
        if not message.embeds:
            message.embeds = [discord.Embed.from_dict(data) for data in event.data["embeds"]]
        return
    log.info("no embed arrived within %g s for the link in message %s", timeout, message.id)

