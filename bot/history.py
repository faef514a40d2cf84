"""Turning Discord messages into the conversation the model sees.

State lives in Discord, not in the bot: a thread's conversation is rebuilt from its
messages on every follow-up, so it survives restarts and edits.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import discord
from PIL import Image

from inference import Conversation, Turn

from .images import CollectedImages, ImageFetcher, ImageProblem, declared_kind, too_many_images
from .media_urls import MediaHosts
from .sources import MediaSource, MessageMedia, message_media
from .texts import NOTICE_PREFIX, WAITING_PREFIX  # messages the bot left out of conversations

log = logging.getLogger(__name__)

HISTORY_LIMIT = 100
_CHAT_MESSAGE_TYPES = (discord.MessageType.default, discord.MessageType.reply)


def question_text(message: discord.Message, bot_id: int) -> str:
    """The message's text without the bot's mention."""
    return re.sub(rf"<@!?{bot_id}>", "", message.content).strip()


async def referenced_message(message: discord.Message) -> discord.Message | None:
    """The message this one replies to, fetched if Discord did not include it."""
    reference = message.reference
    if reference is None or reference.message_id is None:
        return None
    if isinstance(reference.resolved, discord.Message):
        return reference.resolved
    try:
        return await message.channel.fetch_message(reference.message_id)
    except discord.HTTPException as error:
        log.info("cannot fetch replied-to message %s: %s", reference.message_id, error)
        return None


async def media_of(
    message: discord.Message, hosts: MediaHosts | None = None, *, with_reply: bool = True
) -> MessageMedia:
    """The message's attachments, embedded images and stickers (``bot/sources.py``), after
    those of the message it replies to (read first)."""
    hosts = hosts or MediaHosts()
    media = MessageMedia()
    if with_reply:
        replied = await referenced_message(message)
        if replied is not None:
            media += message_media(replied, hosts)
    media += message_media(message, hosts)
    return media


async def collect_images(
    message: discord.Message, fetcher: ImageFetcher, *, with_reply: bool = True
) -> CollectedImages:
    """The images of a message and of the message it replies to, with notices to show.

    Raises :class:`ImageProblem` when one of them cannot be used (see ``bot/images.py``).
    """
    media = await media_of(message, fetcher.hosts, with_reply=with_reply)
    collected = await fetcher.collect(media.sources)
    collected.notices[:0] = media.notices
    return collected


@dataclass
class _PendingTurn:
    role: str
    texts: list[str] = field(default_factory=list)
    # (message id, image candidates of that message) in order; images replace them later.
    attachments: list[tuple[int, list[MediaSource]]] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)


@dataclass
class ThreadConversation:
    """A thread's conversation and the notices to show before the answer (see CollectedImages)."""

    conversation: Conversation
    notices: list[str] = field(default_factory=list)


async def thread_conversation(
    thread: discord.Thread,
    bot_user: discord.ClientUser,
    default_question: str,
    fetcher: ImageFetcher,
    *,
    kind_of: Callable[[int], str | None] = lambda _id: None,
    up_to: int | None = None,
) -> ThreadConversation:
    """The thread as turns, up to the message `up_to` (the question being answered; later
    messages are later questions): its starter message, the bot's answers, the people's
    messages. `kind_of` says what each bot message is ("answer"; anything else is left out);
    for one it does not know (written before this run) the notice and status prefixes decide.

    Consecutive messages of one side are merged into one turn (a long answer spans several
    messages; people often send an image, then the question).

    Images: at most ``fetcher.limits.max_images`` in the whole conversation. The newest
    message's images (with those of the message it replies to) come first: the new question
    is about them. The rest of the budget goes to the thread's earlier images, oldest first:
    a follow-up usually asks about the images the thread started with. Images left out are
    named in a notice. An attachment seen twice (a reply to a message of the thread) counts
    once. Problems with the newest message's images refuse the request (ImageProblem), as
    for any new question; an earlier image that cannot be used (broken, too large: the bot
    said so when it was sent; or deleted since) is left out quietly, so one bad image never
    blocks the rest of the thread nor repeats its notice. Nothing is downloaded when the
    thread does not end with a question.
    """
    messages: list[discord.Message] = []
    starter = await _starter_message(thread)
    if starter is not None:
        messages.append(starter)
    # The newest HISTORY_LIMIT messages up to the question (newest first from Discord).
    before = discord.Object(up_to + 1) if up_to is not None else None
    recent = [message async for message in thread.history(limit=HISTORY_LIMIT, before=before)]
    messages += [m for m in reversed(recent) if m.type in _CHAT_MESSAGE_TYPES]
    turns: list[_PendingTurn] = []
    seen: set[int] = set()
    newest_id: int | None = None  # the newest person's message: the new question
    newest_notices: list[str] = []
    for message in messages:
        attachments: list[MediaSource] = []
        if message.author.id == bot_user.id:
            kind = kind_of(message.id)
            if kind is None and message.content.startswith((NOTICE_PREFIX, WAITING_PREFIX)):
                continue
            if kind is not None and kind != "answer":
                continue
            role, text = "assistant", message.content
        elif message.author.bot:
            continue
        else:
            role = "user"
            text = question_text(message, bot_user.id)
            media = await media_of(message, fetcher.hosts, with_reply=True)
            attachments = [a for a in media.sources if a.id not in seen]
            seen.update(a.id for a in attachments)
            newest_notices = media.notices
            newest_id = message.id
        if not (turns and turns[-1].role == role):
            turns.append(_PendingTurn(role))
        turns[-1].texts.append(text)
        if attachments:
            turns[-1].attachments.append((message.id, attachments))
    while turns and turns[0].role == "assistant":
        turns.pop(0)
    if not turns or turns[-1].role != "user":
        return ThreadConversation(_conversation(turns, default_question))
    notices = await _thread_images(turns, fetcher, newest_id, newest_notices)
    return ThreadConversation(_conversation(turns, default_question), notices)


async def _thread_images(
    turns: list[_PendingTurn], fetcher: ImageFetcher, newest_id: int | None, newest_notices: list[str]
) -> list[str]:
    """Downloads the images the conversation keeps into ``turns``; returns the notices."""
    limit = fetcher.limits.max_images
    notices = list(newest_notices)
    last = turns[-1]
    newest: list[MediaSource] = []
    if last.attachments and last.attachments[-1][0] == newest_id:
        newest = last.attachments.pop()[1]
    earlier = [
        (turn, attachment)
        for turn in turns
        for _, attachments in turn.attachments
        for attachment in attachments
    ]
    budget = max(0, limit - sum(declared_kind(a) is not None for a in newest))  # before sniffing
    left_out = [a.filename for _, a in earlier[budget:]]
    earlier = earlier[:budget]
    earlier_fetches = asyncio.gather(*(fetcher.fetch(a) for _, a in earlier), return_exceptions=True)
    try:
        collected = await fetcher.collect(newest)  # a problem here refuses the request
    except BaseException:
        earlier_fetches.cancel()
        await asyncio.gather(earlier_fetches, return_exceptions=True)
        raise
    notices += collected.notices
    budget = limit - len(collected.pictures)
    cut: list[str] = []
    results = await earlier_fetches
    for (turn, attachment), result in zip(earlier, results, strict=True):
        if isinstance(result, ImageProblem):  # told when it was sent (or since deleted): no notice
            log.info("left out %s from earlier in the thread: %s", attachment.filename, result)
        elif isinstance(result, BaseException):
            raise result
        else:  # a PDF's pages count one each
            cut += [picture.label for picture in result.pictures[max(0, budget) :]]
            turn.images += [picture.image for picture in result.pictures[: max(0, budget)]]
            budget -= len(result.pictures)
    if cut or left_out:
        notices.append(too_many_images(limit, cut + left_out, earlier=True))
    last.images += collected.images
    return notices


def _conversation(turns: list[_PendingTurn], default_question: str) -> Conversation:
    result: list[Turn] = []
    for turn in turns:
        text = "\n".join(part for part in turn.texts if part)
        if turn.role == "user" and not text:
            text = default_question
        result.append(Turn(turn.role, text, tuple(turn.images)))  # type: ignore[arg-type]
    return Conversation(tuple(result))


async def _starter_message(thread: discord.Thread) -> discord.Message | None:
    """A thread made from a message has that message's id; it lives in the parent channel."""
    if thread.starter_message is not None:
        return thread.starter_message
    parent = thread.parent
    if not isinstance(parent, discord.TextChannel):
        return None
    try:
        return await parent.fetch_message(thread.id)
    except discord.HTTPException:
        return None  # a thread started without a message, or the message was deleted
