"""The Discord client: its lifecycle (the model starting, presence, shutdown) and its events,
handed to the ways to ask (``bot/triggers.py``, ``bot/commands.py``, ``bot/context_menus.py``),
which hand questions to the responder (``bot/responder.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import discord
from discord import app_commands

from inference import Engine, EngineError

from . import texts
from .admin_commands import register_admin_commands
from .commands import register_commands
from .context_menus import register_context_menus
from .discord_api import use_gateway_of_api
from .images import ImageFetcher, ImageLimits
from .media_urls import MediaHosts
from .metrics import ENGINE_PROBLEMS, MeteredEngine, Metrics
from .ops_server import gateway_problem
from .quotas import DailyQuotas
from .responder import Responder
from .server_settings import ServerSettings
from .settings import BotSettings
from .storage import Storage
from .triggers import MessageTriggers

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 5.0
STARTING_UP_STATUS = texts.STARTING_UP_STATUS
# The start-up status changes at most this often (each change is a gateway presence update).
START_STATUS_EVERY_SECONDS = 5.0


class SeeBot(discord.Client):
    def __init__(self, settings: BotSettings, engine: Engine, **client_options: Any) -> None:
        # The bot never joins voice: the "PyNaCl/davey is not installed" warnings are noise.
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
        intents = discord.Intents.default()
        intents.message_content = True
        super().__init__(
            intents=intents,
            allowed_mentions=discord.AllowedMentions.none(),
            # Shown in the member list until the model is ready (then: online, no status).
            status=discord.Status.idle,
            activity=discord.CustomActivity(STARTING_UP_STATUS),
            **client_options,
        )
        self.settings = settings
        self.metrics = Metrics()
        self.engine = MeteredEngine(engine, self.metrics)
        self.storage = Storage(settings.data_dir)
        self.server_settings = ServerSettings(settings, self.storage)
        self.tree = app_commands.CommandTree(self)
        self.exit_code = 0
        self._engine_task: asyncio.Task[None] | None = None
        # Set when setup_hook ends: a model that fails at once must not close the HTTP session
        # under the command sync still running there.
        self._set_up = asyncio.Event()
        self._stopping: asyncio.Task[None] | None = None
        self._start_status: asyncio.Task[None] | None = None  # sends the start-up status's changes
        self._start_status_wanted = self._start_status_shown = STARTING_UP_STATUS
        self.images = ImageFetcher(
            ImageLimits.from_settings(settings), hosts=MediaHosts(settings.api_base_url)
        )
        self.responder = Responder(
            settings,
            self.engine,
            self.images,
            on_engine_closed=self._engine_stopped,
            server_settings=self.server_settings,
            quotas=DailyQuotas(self.storage, self.server_settings),
            metrics=self.metrics,
        )
        self.triggers = MessageTriggers(self, self.responder)
        self._closed: asyncio.Future[None] | None = None

    @property
    def shutting_down(self) -> bool:
        return self.responder.shutting_down

    async def setup_hook(self) -> None:
        try:
            await self._set_up_everything()
        finally:
            self._set_up.set()

    async def _set_up_everything(self) -> None:
        if self.settings.api_base_url:
            await use_gateway_of_api(self)
        await self.storage.open()
        await self.server_settings.load()
        # The model loads on the engine's worker thread while the gateway connects.
        self._engine_task = asyncio.create_task(self._start_engine(), name="engine-start")
        register_commands(self.tree, self.responder)
        register_context_menus(self.tree, self.responder)
        register_admin_commands(self.tree, self.server_settings, self.settings)
        self.tree.on_error = self.responder.on_command_error
        guild = discord.Object(self.settings.dev_guild_id) if self.settings.dev_guild_id else None
        if guild is not None:
            self.tree.copy_global_to(guild=guild)
        synced = await self.tree.sync(guild=guild)
        log.info("synced %d slash commands %s", len(synced), f"to guild {guild.id}" if guild else "globally")

    async def _start_engine(self) -> None:
        try:
            await self.engine.start(self._show_start_progress)
        except EngineError as error:  # a clear one-line reason: a bad MODEL_ID, no server...
            log.error("the model could not be started, stopping: %s", error)
            await self._stop_after_setup()
            return
        except Exception:
            log.exception("the model could not be started; stopping")
            await self._stop_after_setup()
            return
        log.info("model loaded; answering questions")
        self.responder.engine_ready.set()
        await self._show_online()

    async def _stop_after_setup(self) -> None:
        self.exit_code = 1
        await self._set_up.wait()
        await self.close()

    def _show_start_progress(self, progress: str) -> None:
        """The start-up status says how far the model is: now, or (the latest words) once
        START_STATUS_EVERY_SECONDS have passed since the last change was sent."""
        if self.responder.engine_ready.is_set():
            return
        self._start_status_wanted = texts.starting_up_status(progress)
        if self._start_status is None or self._start_status.done():
            self._start_status = asyncio.create_task(self._send_start_status(), name="start-status")

    async def _send_start_status(self) -> None:
        ready = self.responder.engine_ready
        while not ready.is_set() and self._start_status_wanted != self._start_status_shown:
            self._start_status_shown = self._start_status_wanted
            self.activity = discord.CustomActivity(self._start_status_shown)  # and any later IDENTIFY's
            try:
                await self.change_presence(status=discord.Status.idle, activity=self.activity)
            except Exception as error:  # not connected yet: the IDENTIFY will carry it
                log.debug("start-up status not updated yet: %r", error)
            with contextlib.suppress(TimeoutError):  # the next change waits, unless the model is ready
                await asyncio.wait_for(ready.wait(), START_STATUS_EVERY_SECONDS)

    async def _show_online(self) -> None:
        """Online, without the "starting up" status: now, and in every later IDENTIFY."""
        if self._start_status is not None:  # a start-up status on its way goes first
            await asyncio.gather(self._start_status, return_exceptions=True)
        self.status, self.activity = discord.Status.online, None
        try:
            await self.change_presence(status=discord.Status.online, activity=None)
        except Exception as error:  # not connected yet: the IDENTIFY or on_ready will say it
            log.debug("bot status not updated yet: %r", error)

    async def shutdown(self) -> None:
        """Stop taking requests, tell people whose answers are cut off, then close."""
        if self.shutting_down:
            return
        log.info("shutting down: %d requests in progress", self.responder.in_progress)
        await self.responder.cut_off_all(SHUTDOWN_GRACE_SECONDS)
        await self.close()

    async def close(self) -> None:
        """Close Discord, the image downloads' session and the engine, once: a second call
        (a signal's shutdown and `async with` both close) waits for the first to finish."""
        if self._closed is None:
            self._closed = asyncio.ensure_future(self._close_everything())
        await asyncio.shield(self._closed)

    async def _close_everything(self) -> None:
        try:
            await super().close()
        finally:
            for task in (self._engine_task, self._start_status):
                if task is not None and not task.done():
                    task.cancel()
            await self.images.close()
            await self.engine.close()
            await self.storage.close()

    def health_problem(self) -> str | None:
        """Why the bot cannot answer now (for /healthz), or None when it can."""
        if self.shutting_down:
            return "the bot is shutting down"
        if self.engine.state != "ready":
            return ENGINE_PROBLEMS[self.engine.state]
        return gateway_problem(self)

    async def on_ready(self) -> None:
        assert self.user is not None
        log.info("connected as %s (id %s) to %d servers", self.user, self.user.id, len(self.guilds))
        if self.responder.engine_ready.is_set():  # ready before the gateway was: say so now
            await self._show_online()

    def _engine_stopped(self) -> None:
        # Never a bot that takes questions and answers none: stop, and let the
        # supervisor (systemd, docker --restart) start a fresh one.
        log.critical("the model worker stopped; shutting down with exit code 1")
        self.exit_code = 1
        self._stopping = asyncio.create_task(self.shutdown())

    # --- events -------------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        await self.triggers.on_message(message)

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        self.responder.questions.message_deleted(payload.message_id)

    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        for message_id in payload.message_ids:
            self.responder.questions.message_deleted(message_id)

    async def on_raw_thread_delete(self, payload: discord.RawThreadDeleteEvent) -> None:
        self.responder.questions.channel_deleted(payload.thread_id)

    async def on_guild_channel_delete(self, channel: discord.abc.GuildChannel) -> None:
        self.responder.questions.channel_deleted(channel.id)


class ShardedSeeBot(SeeBot, discord.AutoShardedClient):
    """The same bot over several gateway connections (shards), for bots in many servers.

    Discord requires sharding from 2,500 servers; all shards of a process share one engine.
    """


def create_bot(settings: BotSettings, engine: Engine) -> SeeBot:
    """A plain client, or with SHARD_COUNT set, an auto-sharded one (0 = Discord's advice)."""
    if settings.shard_count is None:
        return SeeBot(settings, engine)
    return ShardedSeeBot(settings, engine, shard_count=settings.shard_count or None)
