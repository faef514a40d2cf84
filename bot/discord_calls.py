"""Calling Discord when it may fail: retry what is worth retrying, describe failures in a
sentence, and reply to a message that may have been deleted meanwhile."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp
import discord

log = logging.getLogger(__name__)

T = TypeVar("T")

# discord.py already retries a 5xx or a 429 a few times inside each call; these are the
# pauses before the bot tries the whole call again once discord.py has given up.
RETRY_DELAYS = (1.0, 2.0, 4.0)
UNKNOWN_CHANNEL = 10003
UNKNOWN_MESSAGE = 10008

# What a call to Discord raises when Discord (or the way to it) fails, rather than the bot.
DISCORD_FAILURES: tuple[type[BaseException], ...] = (
    discord.HTTPException,
    aiohttp.ClientError,
    OSError,
    asyncio.TimeoutError,
)


def worth_retrying(error: BaseException) -> bool:
    """An outage (5xx), a rate limit that outlasted discord.py's patience, or no connection."""
    if isinstance(error, discord.HTTPException):
        return error.status >= 500 or error.status == 429
    return isinstance(error, DISCORD_FAILURES)


def channel_gone(error: BaseException) -> bool:
    """The channel or thread was deleted (or the bot can no longer see it)."""
    return isinstance(error, discord.NotFound) and error.code == UNKNOWN_CHANNEL


def describe(error: BaseException) -> str:
    """A failure in a few words for a log line (no reprs, no tracebacks)."""
    if isinstance(error, discord.HTTPException):
        text = f"HTTP {error.status}"
        if error.code:
            text += f" (code {error.code})"
        return f"{text}: {error.text}" if error.text else text
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


async def with_retries(call: Callable[[], Awaitable[T]], what: str) -> T:
    """`call()`, tried again after RETRY_DELAYS while Discord fails in a way worth retrying;
    the last failure propagates. `what` names the call in the log ("question 42: the answer")."""
    for delay in (*RETRY_DELAYS, None):
        try:
            return await call()
        except DISCORD_FAILURES as error:
            if delay is None or not worth_retrying(error):
                raise
            log.warning("%s failed (%s); trying again in %g s", what, describe(error), delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def reply_reference(message: discord.Message) -> discord.MessageReference:
    """A reply to `message` that Discord posts as a plain message if it was deleted meanwhile."""
    return message.to_reference(fail_if_not_exists=False)
