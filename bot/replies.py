"""Streaming an answer into Discord messages: edit as text arrives, split at 2000 characters.

The first message appears with the first text; after that it is edited at most once per
`edit_interval` seconds (Discord rate-limits edits, and readers cannot follow faster). When
the answer outgrows a message the split is final (the splitter is prefix-stable), so earlier
messages are never touched again and the answer goes on in a new one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import discord

from .splitting import split_message

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 2000


class EditableMessage(Protocol):
    async def edit(self, **fields: Any) -> object: ...


class SendMessage(Protocol):
    """Sends one message where the answer goes; `view` carries buttons (the first message's)."""

    async def __call__(self, content: str, *, view: Any = None) -> EditableMessage: ...


class StreamingReply:
    def __init__(
        self,
        send: SendMessage,
        *,
        edit_interval: float = 1.0,
        limit: int = MESSAGE_LIMIT,
        first_message_view: Any = None,
    ) -> None:
        self._send = send
        self._view = first_message_view
        self._edit_interval = edit_interval
        self._limit = limit
        self._messages: list[EditableMessage] = []
        self._shown: list[str] = []
        self._lock = asyncio.Lock()  # status updates and streaming edits take turns
        self.text = ""

    @property
    def message_count(self) -> int:
        return len(self._messages)

    async def stream(self, pieces: AsyncIterator[str]) -> str:
        """Show the pieces as they come; returns the whole answer. Errors propagate after
        what was generated so far is on screen.

        The pause between updates backs off when Discord is slow or failing: it is at least
        twice the time the last update took (a rate-limited edit waits inside discord.py),
        and doubles after each failed update, so a struggling API is not hammered.
        """
        last_update = -math.inf
        interval = self._edit_interval
        try:
            async for piece in pieces:
                self.text += piece
                if time.monotonic() - last_update < interval:
                    continue
                started = time.monotonic()
                try:
                    # Shielded: a Cancel that lands inside discord.py's rate limiter would
                    # leave the route's bucket shut for 30 s (the final update then waits).
                    called = await asyncio.shield(self._show())
                except discord.HTTPException as error:
                    interval = max(interval * 2, 1.0)
                    log.warning("a streaming update failed (%s); next in %.1f s", error, interval)
                    last_update = time.monotonic()
                    continue
                if called:
                    last_update = time.monotonic()
                    interval = max(self._edit_interval, 2 * (last_update - started))
        finally:
            await self._show()
        return self.text

    async def show_status(self, status: str) -> None:
        """Show a status line (e.g. the place in line) until the answer's text replaces it."""
        async with self._lock:
            if self.text.strip():
                return
            if not self._messages:
                self._messages.append(await self._send_next(status))
                self._shown.append(status)
            elif self._shown[0] != status:
                await self._messages[0].edit(content=status)
                self._shown[0] = status

    async def conclude(self, content: str) -> None:
        """Say how the answer ended (a notice): in place of a status still on screen (the
        place in line, "starting up"), else in a new message."""
        async with self._lock:
            if self._messages and not self.text.strip():
                await self._messages[0].edit(content=content)
                self._shown[0] = content
                return
        await self._send(content)

    async def remove_view(self) -> None:
        """Take the buttons off the first message once the answer is over."""
        if self._view is not None and self._messages:
            # Say "no pings" on every write, even one that leaves the text as it is.
            await self._messages[0].edit(view=None, allowed_mentions=discord.AllowedMentions.none())
            self._view = None

    async def _send_next(self, content: str) -> EditableMessage:
        return await self._send(content, view=self._view if not self._messages else None)

    async def _show(self) -> bool:
        async with self._lock:
            return await self._show_unlocked()

    async def _show_unlocked(self) -> bool:
        """Bring the messages up to date with the text; True if Discord was called."""
        called = False
        for index, chunk in enumerate(split_message(self.text, self._limit)):
            if index < len(self._messages):
                if self._shown[index] != chunk:
                    try:
                        await self._messages[index].edit(content=chunk)
                    except discord.HTTPException as error:
                        if error.status not in (401, 404):
                            raise
                        # Deleted, or an expired interaction's message: carry on in a new one.
                        log.warning("cannot edit a message of the answer (%s); sending it anew", error)
                        self._messages[index] = await self._send(chunk)
                    self._shown[index] = chunk
                    called = True
            else:
                self._messages.append(await self._send_next(chunk))
                self._shown.append(chunk)
                called = True
        return called
