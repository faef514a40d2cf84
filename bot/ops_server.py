"""The HTTP endpoint for the people who run the bot: `/metrics` (Prometheus) and `/healthz`.

Served on the bot's event loop with aiohttp (already a dependency) when METRICS_PORT is set,
on METRICS_HOST (127.0.0.1 unless told otherwise: metrics are not for the whole internet).
`/healthz` answers 200 "ok" when the gateway is connected and the model is ready, else 503
with the reason, for container health checks and load balancers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import discord
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


def gateway_problem(client: discord.Client) -> str | None:
    """Why the client is not connected to Discord's gateway now, or None when it is.

    Connected means a live websocket whose session Discord accepted (READY), not discord.py's
    `is_ready()`, which waits a further two seconds for the guilds to arrive.
    """
    if client.is_closed():
        return "the bot is shutting down"
    if isinstance(client, discord.AutoShardedClient):
        down = sorted(shard_id for shard_id, shard in client.shards.items() if shard.is_closed())
        if not client.shards or down:
            return (
                f"gateway shards {down} are not connected"
                if down
                else "not connected to the Discord gateway yet"
            )
    elif client.ws is None or not client.ws.open:
        return "not connected to the Discord gateway"
    if client.user is None:
        return "not connected to the Discord gateway yet"
    return None


class OpsServer:
    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, health_problem: Callable[[], str | None]
    ) -> None:
        self._host = host
        self._port = port
        self._registry = registry
        self._health_problem = health_problem
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        log.info("metrics at http://%s:%d/metrics, health at /healthz", self._host, self._port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _request: web.Request) -> web.Response:
        problem = self._health_problem()
        if problem is None:
            return web.Response(text="ok\n")
        return web.Response(status=503, text=f"{problem}\n")
