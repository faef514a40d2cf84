"""Each server's own settings, changed by its admins from Discord (`/seebot`), over the defaults.

The environment's settings are the defaults and the bounds: a server's channel list narrows
where the bot answers within the environment's access lists, never widens it. All servers'
changes are held in memory (loaded once at start), so a question reads them without waiting
on the disk; a change is saved first and applied only once saved, to the next question.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from typing import Literal

from inference import neutralise

from .settings import BotSettings
from .storage import PROMPT_USES, NotSaved, ServerRecord, Storage

log = logging.getLogger(__name__)

PromptUse = Literal["ocr", "describe", "compare"]
MAX_PROMPT_LENGTH = 1000
DIRECT_MESSAGES = 0  # the "server" of direct messages: the environment's settings only


class InvalidSetting(ValueError):
    """A value an admin gave that the bot will not take; the message says why."""


@dataclass(frozen=True)
class Sourced:
    """A setting's effective value and where it comes from: "server" or "default"."""

    value: object
    source: Literal["server", "default"]


def check_prompt(text: str) -> str:
    """The prompt as given, or `InvalidSetting` (too long, empty, or with control tokens)."""
    text = text.strip()
    if not text:
        raise InvalidSetting("A prompt needs some text (or give none to go back to the default).")
    if len(text) > MAX_PROMPT_LENGTH:
        raise InvalidSetting(
            f"A prompt can be at most {MAX_PROMPT_LENGTH:,} characters; this one has {len(text):,}."
        )
    if neutralise(text) != text:
        raise InvalidSetting(
            "A prompt cannot contain the model's control tokens (like `<|user|>` or `<|image_1|>`)."
        )
    return text


class ServerSettings:
    def __init__(self, defaults: BotSettings, storage: Storage) -> None:
        self._defaults = defaults
        self._storage = storage
        self._servers: dict[int, ServerRecord] = {}
        self._channels_lock = asyncio.Lock()

    @property
    def can_save(self) -> bool:
        return self._storage.persistent

    @property
    def save_problem(self) -> str | None:
        return self._storage.problem

    async def load(self) -> None:
        self._servers = await self._storage.load_servers()
        if self._servers:
            log.info("%d servers have settings of their own", len(self._servers))

    def _record(self, guild_id: int | None) -> ServerRecord:
        return self._servers.get(guild_id or DIRECT_MESSAGES, ServerRecord())

    # --- what a question reads ---------------------------------------------------------------

    def prompt(self, guild_id: int | None, use: PromptUse) -> str:
        return str(self.sourced_prompt(guild_id, use).value)

    def sourced_prompt(self, guild_id: int | None, use: PromptUse) -> Sourced:
        own = self._record(guild_id).prompts.get(use)
        if own is not None:
            return Sourced(own, "server")
        return Sourced(getattr(self._defaults, f"{use}_prompt"), "default")

    def channels(self, guild_id: int | None) -> frozenset[int]:
        """The server's channels (empty: wherever the environment allows)."""
        return self._record(guild_id).channels

    def answers_in(self, guild_id: int | None, channel: object) -> bool:
        """True unless the server chose channels and this is none of them (nor a thread of one)."""
        chosen = self.channels(guild_id)
        if guild_id is None or not chosen:
            return True
        here = {getattr(channel, "id", None), getattr(channel, "parent_id", None)}
        return bool(here & chosen)

    def questions_per_day(self, guild_id: int | None) -> int:
        """Questions per user per UTC day here (0: no limit)."""
        own = self._record(guild_id).daily_quota
        return own if own is not None else self._defaults.daily_questions_per_user

    def daily_quota(self, guild_id: int | None) -> Sourced:
        """Questions per user per UTC day (0: no limit)."""
        own = self._record(guild_id).daily_quota
        if own is not None:
            return Sourced(own, "server")
        return Sourced(self._defaults.daily_questions_per_user, "default")

    # --- what admins change (each saved before it applies; `NotSaved` if it cannot be) -------

    async def set_prompt(self, guild_id: int, use: PromptUse, text: str | None) -> None:
        if use not in PROMPT_USES:
            raise InvalidSetting(f"There is no {use!r} prompt; there are {', '.join(PROMPT_USES)}.")
        text = check_prompt(text) if text is not None else None
        await self._storage.save_value(guild_id, f"prompt_{use}", text)
        prompts = dict(self._record(guild_id).prompts)
        if text is None:
            prompts.pop(use, None)
        else:
            prompts[use] = text
        self._servers[guild_id] = replace(self._record(guild_id), prompts=prompts)

    async def set_daily_quota(self, guild_id: int, questions: int | None) -> None:
        if questions is not None and questions < 0:
            raise InvalidSetting("The daily limit is a number of questions: 0 or more.")
        await self._storage.save_value(guild_id, "daily_quota", None if questions is None else str(questions))
        self._servers[guild_id] = replace(self._record(guild_id), daily_quota=questions)

    async def add_channel(self, guild_id: int, channel_id: int) -> frozenset[int]:
        """Answer in this channel too; returns the server's channels now."""
        async with self._channels_lock:  # two admins at once: neither change is lost
            return await self._save_channels(guild_id, self.channels(guild_id) | {channel_id})

    async def remove_channel(self, guild_id: int, channel_id: int) -> frozenset[int]:
        async with self._channels_lock:
            return await self._save_channels(guild_id, self.channels(guild_id) - {channel_id})

    async def clear_channels(self, guild_id: int) -> None:
        async with self._channels_lock:
            await self._save_channels(guild_id, frozenset())

    async def _save_channels(self, guild_id: int, channels: frozenset[int]) -> frozenset[int]:
        await self._storage.save_channels(guild_id, channels)
        self._servers[guild_id] = replace(self._record(guild_id), channels=channels)
        return channels


__all__ = ["InvalidSetting", "NotSaved", "PromptUse", "ServerSettings", "Sourced", "check_prompt"]
