"""Daily quotas: at most N questions per person, per server, per UTC day, counted in SQLite.

N is the server's own `/seebot quota` or else `DAILY_QUESTIONS_PER_USER` (0: no limit).
Moderators (Manage Messages) are not counted. Direct messages count as one "server" of
their own with the environment's limit. A count that cannot be written lets the question
through (and says so in the log): a disk problem should not silence the bot.
"""

from __future__ import annotations

import datetime
import logging
import sqlite3
from collections.abc import Callable

import discord

from .limits import Refused
from .server_settings import DIRECT_MESSAGES, ServerSettings
from .storage import Storage

log = logging.getLogger(__name__)


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def is_moderator(user: discord.abc.User, channel: object) -> bool:
    """Manage Messages in this channel (a server's moderators are not counted)."""
    permissions_for = getattr(channel, "permissions_for", None)
    return (
        isinstance(user, discord.Member)
        and permissions_for is not None
        and permissions_for(user).manage_messages
    )


def next_utc_midnight(now: datetime.datetime) -> datetime.datetime:
    tomorrow = now.astimezone(datetime.timezone.utc).date() + datetime.timedelta(days=1)
    return datetime.datetime.combine(tomorrow, datetime.time(), tzinfo=datetime.timezone.utc)


def quota_refusal(used: int, limit: int, now: datetime.datetime) -> str:
    """What a person over the limit reads: how many they asked, and when they can ask again."""
    resets = next_utc_midnight(now)
    left = resets - now
    hours, minutes = divmod(max(1, round(left.total_seconds() / 60)), 60)
    wait = f"{hours} h {minutes} min" if hours else f"{minutes} min"
    asked = "1 question" if used == 1 else f"{used} questions"
    return (
        f"You have used your daily questions here: {asked} of {limit} today. "
        f"The count resets at midnight UTC (in {wait}, <t:{int(resets.timestamp())}:t> your time)."
    )


class DailyQuotas:
    def __init__(
        self,
        storage: Storage,
        server_settings: ServerSettings,
        *,
        clock: Callable[[], datetime.datetime] | None = None,
    ) -> None:
        self._storage = storage
        self._servers = server_settings
        self._clock = clock

    async def take(self, guild_id: int | None, user_id: int, *, moderator: bool) -> None:
        """Count one question, or raise `Refused` when today's limit is reached."""
        limit = self._servers.questions_per_day(guild_id)
        if limit <= 0 or moderator:
            return
        now = self._clock() if self._clock is not None else utc_now()
        day = now.astimezone(datetime.timezone.utc).date().isoformat()
        try:
            taken, used = await self._storage.take_question(guild_id or DIRECT_MESSAGES, user_id, day, limit)
        except sqlite3.Error as error:
            log.error("cannot count a question of user %s (%s): letting it through", user_id, error)
            return
        if not taken:
            log.info("user %s reached the daily limit of %d in server %s", user_id, limit, guild_id)
            raise Refused(quota_refusal(used, limit, now))
