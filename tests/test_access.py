"""Who may ask: the allow and block lists an operator sets."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from bot.access import is_allowed
from bot.settings import BotSettings

GUILD = SimpleNamespace(id=10)
CHANNEL = SimpleNamespace(id=20)
THREAD = SimpleNamespace(id=21, parent_id=20)
OTHER_CHANNEL = SimpleNamespace(id=30)
MEMBER = SimpleNamespace(id=1, roles=[SimpleNamespace(id=100)])
STRANGER = SimpleNamespace(id=2, roles=[])


def settings(**changes: object) -> BotSettings:
    return replace(BotSettings(token="t"), **changes)  # type: ignore[arg-type]


def test_everyone_everywhere_by_default() -> None:
    assert is_allowed(settings(), STRANGER, CHANNEL, GUILD)
    assert is_allowed(settings(), STRANGER, None, None)  # a DM


@pytest.mark.parametrize(
    ("changes", "user", "channel", "guild", "allowed"),
    [
        ({"blocked_user_ids": frozenset({1})}, MEMBER, CHANNEL, GUILD, False),
        ({"allowed_user_ids": frozenset({1})}, MEMBER, CHANNEL, GUILD, True),
        ({"allowed_user_ids": frozenset({1})}, STRANGER, CHANNEL, GUILD, False),
        ({"allowed_guild_ids": frozenset({11})}, MEMBER, CHANNEL, GUILD, False),
        ({"allowed_channel_ids": frozenset({20})}, MEMBER, CHANNEL, GUILD, True),
        ({"allowed_channel_ids": frozenset({20})}, MEMBER, THREAD, GUILD, True),
        ({"allowed_channel_ids": frozenset({20})}, MEMBER, OTHER_CHANNEL, GUILD, False),
        ({"allowed_role_ids": frozenset({100})}, MEMBER, CHANNEL, GUILD, True),
        ({"allowed_role_ids": frozenset({100})}, STRANGER, CHANNEL, GUILD, False),
        ({"allow_dms": False}, MEMBER, None, None, False),
        ({"allowed_guild_ids": frozenset({11})}, MEMBER, None, None, True),  # DMs follow ALLOW_DMS
    ],
)
def test_lists(changes: dict, user: object, channel: object, guild: object, allowed: bool) -> None:
    assert is_allowed(settings(**changes), user, channel, guild) is allowed  # type: ignore[arg-type]


def test_ids_are_read_from_comma_separated_settings() -> None:
    loaded = BotSettings.from_env(
        {"DISCORD_TOKEN": "t", "ALLOWED_ROLE_IDS": "100, 200 300", "ALLOW_DMS": "no"}
    )
    assert loaded.allowed_role_ids == {100, 200, 300}
    assert loaded.allow_dms is False
