"""Turning Discord messages into the conversation the model sees.

State lives in Discord, not in the bot: a thread's conversation is rebuilt from its
messages on every follow-up, so it survives restarts and edits.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import discord
from PIL import Image

from inference import Conversation, Turn

from .images import download_images, image_attachments

log = logging.getLogger(__name__)

# Bot messages that start with this are notices (errors, hints), not answers: they are left
# out of the conversation the model sees.
NOTICE_PREFIX = "⚠️"
# A status line (the place in line) that an answer was meant to replace, e.g. if it was cancelled.
WAITING_PREFIX = "⏳"
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


async def images_of(message: discord.Message, *, with_reply: bool = True) -> list[Image.Image]:
    """The message's images, after those of the message it replies to (read first)."""
    attachments: list[discord.Attachment] = []
    if with_reply:
        replied = await referenced_message(message)
        if replied is not None:
            attachments += image_attachments(replied.attachments)
    attachments += image_attachments(message.attachments)
    return await download_images(attachments)


@dataclass
class _PendingTurn:
    role: str
    texts: list[str] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)


async def conversation_from_thread(
    thread: discord.Thread, bot_user: discord.ClientUser, default_question: str
) -> Conversation:
    """The whole thread as turns: its starter message, the bot's answers, later messages.

    Consecutive messages of one side are merged into one turn (a long answer spans several
    messages; people often send an image, then the question).
    """
    messages: list[discord.Message] = []
    starter = await _starter_message(thread)
    if starter is not None:
        messages.append(starter)
    async for message in thread.history(limit=HISTORY_LIMIT, oldest_first=True):
        if message.type in _CHAT_MESSAGE_TYPES:
            messages.append(message)
    turns: list[_PendingTurn] = []
    for message in messages:
        if message.author.id == bot_user.id:
            if message.content.startswith((NOTICE_PREFIX, WAITING_PREFIX)):
                continue
            role, text, images = "assistant", message.content, []
        elif message.author.bot:
            continue
        else:
            role = "user"
            text = question_text(message, bot_user.id)
            images = await images_of(message, with_reply=True)
        if turns and turns[-1].role == role:
            turns[-1].texts.append(text)
            turns[-1].images += images
        else:
            turns.append(_PendingTurn(role, [text], images))
    while turns and turns[0].role == "assistant":
        turns.pop(0)
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
