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
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import discord

from .discord_calls import DISCORD_FAILURES, channel_gone, describe, with_retries
from .questions import MessageKind
from .splitting import split_message
from .texts import end_missing

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 2000


class EditableMessage(Protocol):
    id: int

    async def edit(self, **fields: Any) -> object: ...


class SendMessage(Protocol):
    """Sends one message where the answer goes; `view` carries buttons (the first message's)."""

    async def __call__(self, content: str, *, view: Any = None) -> EditableMessage: ...


class StreamingReply:
    """One answer's messages. Every write goes through one path: mid-stream updates that fail
    are carried by the next one; the last update, statuses and notices are retried
    (`with_retries`), and when the end of an answer still cannot be shown the reply says so
    (or, with Discord unreachable, logs it under `label`). `mark` hears what each message is
    (see `bot/questions.py`), so a thread's rebuild can tell answers from the rest."""

    def __init__(
        self,
        send: SendMessage,
        *,
        edit_interval: float = 1.0,
        limit: int = MESSAGE_LIMIT,
        first_message_view: Any = None,
        label: str = "an answer",
        mark: Callable[[int, MessageKind], None] | None = None,
        channel_gone: Callable[[], bool] = lambda: False,
    ) -> None:
        self._send = send
        self._view = first_message_view
        self._edit_interval = edit_interval
        self._limit = limit
        self._label = label
        self._mark = mark or (lambda _id, _kind: None)
        self._channel_gone = channel_gone
        self._messages: list[EditableMessage] = []
        self._shown: list[str] = []
        self._lock = asyncio.Lock()  # status updates and streaming edits take turns
        self.text = ""

    @property
    def label(self) -> str:
        """Who and what the answer is for, in log lines ("question 42 from user 7")."""
        return self._label

    @property
    def message_count(self) -> int:
        return len(self._messages)

    async def stream(self, pieces: AsyncIterator[str]) -> str:
        """Show the pieces as they come; returns the whole answer. Errors propagate after
        what was generated so far is on screen (or the reply said it could not be).

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
                    called = await self._show()
                except DISCORD_FAILURES as error:
                    if channel_gone(error):
                        raise
                    interval = max(interval * 2, 1.0)
                    log.warning(
                        "%s: a streaming update failed (%s); next in %.1f s",
                        self._label,
                        describe(error),
                        interval,
                    )
                    last_update = time.monotonic()
                    continue
                if called:
                    last_update = time.monotonic()
                    interval = max(self._edit_interval, 2 * (last_update - started))
        finally:
            await self._show_the_end()
        return self.text

    async def _show_the_end(self) -> None:
        """The last update: retried; if Discord still fails, say what is missing."""
        if self._channel_gone():
            return
        try:
            await with_retries(self._show, f"{self._label}: the last update of the answer")
        except DISCORD_FAILURES as error:
            if channel_gone(error):
                log.info("%s: the answer's channel is gone (%s)", self._label, describe(error))
                return
            chunks = split_message(self.text, self._limit)
            shown = sum(len(c) for c, s in zip(chunks, self._shown, strict=False) if c == s)
            missing = max(0, len(self.text) - shown)
            log.warning("%s: the end of the answer could not be shown (%s)", self._label, describe(error))
            await self._send_notice(end_missing(missing))
            return
        if self.text.strip():
            for message in self._messages:
                self._mark(message.id, "answer")

    async def show_status(self, status: str) -> None:
        """Show a status line (e.g. the place in line) until the answer's text replaces it."""
        async with self._lock:
            if self.text.strip() or self._channel_gone():
                return
            if not self._messages:
                message = await self._send_next(status)
                self._messages.append(message)
                self._shown.append(status)
                self._mark(message.id, "status")
            elif self._shown[0] != status:
                await self._messages[0].edit(content=status)
                self._shown[0] = status

    async def conclude(self, content: str) -> None:
        """Say how the answer ended (a notice): in place of a status still on screen (the
        place in line, "starting up"), else in a new message. Retried; a notice that still
        cannot be posted is logged under the reply's label."""
        if self._channel_gone():
            log.info("%s: not told %r: the channel is gone", self._label, content)
            return
        async with self._lock:
            if self._messages and not self.text.strip():
                first = self._messages[0]
                try:
                    await with_retries(lambda: first.edit(content=content), f"{self._label}: a notice")
                except DISCORD_FAILURES as error:
                    log.error("%s: could not show %r (%s)", self._label, content, describe(error))
                    return
                self._shown[0] = content
                self._mark(first.id, "notice")
                return
        await self._send_notice(content)

    async def _send_notice(self, content: str) -> None:
        try:
            message = await with_retries(lambda: self._send(content), f"{self._label}: a notice")
        except DISCORD_FAILURES as error:
            log.error("%s: could not post %r (%s)", self._label, content, describe(error))
            return
        self._mark(message.id, "notice")

    async def remove_view(self) -> None:
        """Take the buttons off the first message once the answer is over."""
        if self._view is not None and self._messages and not self._channel_gone():
            first = self._messages[0]
            # Say "no pings" on every write, even one that leaves the text as it is.
            try:
                await with_retries(
                    lambda: first.edit(view=None, allowed_mentions=discord.AllowedMentions.none()),
                    f"{self._label}: taking the Cancel button off",
                )
            except DISCORD_FAILURES as error:
                log.info("%s: the Cancel button stays on (%s)", self._label, describe(error))
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
                        if error.status not in (401, 404) or channel_gone(error):
                            raise
                        # Deleted, or an expired interaction's message: carry on in a new one.
                        log.warning(
                            "%s: cannot edit a message of the answer (%s); sending it anew",
                            self._label,
                            describe(error),
                        )
                        self._messages[index] = await self._send(chunk)
                    self._shown[index] = chunk
                    self._mark(self._messages[index].id, "writing")
                    called = True
            else:
                message = await self._send_next(chunk)
                self._messages.append(message)
                self._shown.append(chunk)
                self._mark(message.id, "writing")
                called = True
        return called
