"""Pointing discord.py at a Discord-compatible API (a self-hosted server, or the tests' fake).

`Route.BASE` moves REST, but discord.py dials `wss://gateway.discord.gg/` without asking; so
the gateway URL is taken from that server's own `GET /gateway/bot`, as Discord intends.
"""

from __future__ import annotations

import logging

import discord
import yarl
from discord.gateway import DiscordWebSocket

log = logging.getLogger(__name__)


def use_api_base(base_url: str) -> None:
    """Send REST requests to `base_url` (e.g. http://127.0.0.1:8080/api/v10). Call before login."""
    discord.http.Route.BASE = base_url.rstrip("/")
    log.info("Discord REST API at %s", discord.http.Route.BASE)


async def use_gateway_of_api(client: discord.Client) -> None:
    """Connect to the gateway the configured API names. Call after login, before connect."""
    _shards, url, _limits = await client.http.get_bot_gateway()
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(url)
    log.info("Discord gateway at %s", url)
