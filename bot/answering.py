"""Running one request: typing indicator, engine stream, streamed reply, clear errors."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

import discord

from inference import Conversation, Engine, EngineError, GenerationRequest

from .history import NOTICE_PREFIX
from .replies import SendMessage, StreamingReply

log = logging.getLogger(__name__)

EMPTY_ANSWER = f"{NOTICE_PREFIX} The model gave an empty answer. Try asking another way."


def notice(text: str) -> str:
    return f"{NOTICE_PREFIX} {text}"


def unexpected_error_notice(what: str, error: BaseException) -> str:
    """Log a bug with a short id and return the reply that quotes it, so reports can be matched."""
    error_id = secrets.token_hex(4)
    log.error("%s failed [error id %s]", what, error_id, exc_info=error)
    return notice(f"Something went wrong on my side (error id `{error_id}`).")


async def answer(
    engine: Engine,
    conversation: Conversation,
    send: SendMessage,
    *,
    edit_interval: float,
    typing_in: discord.abc.Messageable | None = None,
) -> str | None:
    """Stream the engine's answer to `send`; returns the answer, or None after an error reply."""
    reply = StreamingReply(send, edit_interval=edit_interval)
    typing = typing_in.typing() if typing_in is not None else contextlib.nullcontext()
    try:
        async with typing:
            pieces: AsyncIterator[str] = engine.stream(GenerationRequest(conversation))
            async with contextlib.aclosing(pieces):  # type: ignore[type-var]
                text = await reply.stream(pieces)
    except EngineError as error:
        log.warning("request failed: %s", error)
        await send(notice(f"Sorry, I could not answer: {error}"))
        return None
    except discord.HTTPException:
        raise
    except Exception as error:
        await send(unexpected_error_notice("request", error))
        return None
    if not text.strip():
        await send(EMPTY_ANSWER)
    return text
