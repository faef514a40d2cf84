"""Which URLs the bot may download from: Discord's own CDN and media hosts, nothing else.

People choose the links they paste; the bot never requests a host a user chose. Discord
proxies every embedded image through its media servers (the embed's ``proxy_url``), so an
image is fetched from there or not at all. With ``DISCORD_API_BASE_URL`` set (a
Discord-compatible server, the tests' fake) that server's origin is Discord's media host
too, and URLs the bot builds itself on Discord's hosts (discord.py's sticker URLs) are sent
there instead, as REST and the gateway already are.
"""

from __future__ import annotations

import re

import yarl

#: Discord's CDN, its media proxy and the external-image proxies (images-ext-1, -2...).
DISCORD_MEDIA_HOSTS = re.compile(
    r"cdn\.discordapp\.com|media\.discordapp\.net|images-ext-\d+\.discordapp\.net"
)
#: Where discord.py builds asset URLs (``Asset.BASE``, sticker URLs).
BUILT_ON = ("cdn.discordapp.com", "media.discordapp.net")


class MediaHosts:
    """The allowed media origins of one bot (Discord's, plus the configured API's origin)."""

    def __init__(self, api_base_url: str | None = None) -> None:
        self._api_origin: yarl.URL | None = None
        if api_base_url:
            url = yarl.URL(api_base_url)
            self._api_origin = url.origin()

    def allows(self, url: str | None) -> bool:
        """True when ``url`` is on Discord's media hosts (https) or the configured API's origin."""
        if not url:
            return False
        try:
            parsed = yarl.URL(url)
        except (ValueError, TypeError):
            return False
        if not parsed.absolute or not parsed.host:
            return False
        if self._api_origin is not None and parsed.origin() == self._api_origin:
            return True
        return parsed.scheme == "https" and DISCORD_MEDIA_HOSTS.fullmatch(parsed.host) is not None

    def built(self, url: str) -> str:
        """A URL the bot built on Discord's CDN, moved to the configured API's origin if any."""
        if self._api_origin is None:
            return url
        parsed = yarl.URL(url)
        if parsed.host not in BUILT_ON:
            return url
        return str(self._api_origin.join(yarl.URL(parsed.path_qs)))


def host_of(url: str | None) -> str:
    """The host a URL names, for notices ("example.com"); empty when there is none."""
    try:
        return yarl.URL(url or "").host or ""
    except (ValueError, TypeError):
        return ""
