"""Who may use the bot, where: the server owner's allow and block lists."""

from __future__ import annotations

import discord

from .settings import BotSettings


def is_allowed(
    settings: BotSettings, user: discord.abc.User, channel: object, guild: discord.Guild | None
) -> bool:
    """True when every configured list admits this person here (empty lists admit everyone).

    A thread counts as its parent channel, so allowing a channel allows its threads.
    """
    if user.id in settings.blocked_user_ids:
        return False
    if settings.allowed_user_ids and user.id not in settings.allowed_user_ids:
        return False
    if guild is None:
        return settings.allow_dms
    if settings.allowed_guild_ids and guild.id not in settings.allowed_guild_ids:
        return False
    if settings.allowed_channel_ids:
        here = {getattr(channel, "id", None), getattr(channel, "parent_id", None)}
        if not here & settings.allowed_channel_ids:
            return False
    if settings.allowed_role_ids:
        roles = {role.id for role in getattr(user, "roles", ())}
        if not roles & settings.allowed_role_ids:
            return False
    return True
