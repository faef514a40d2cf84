"""The Discord client: who it answers, where, and with what conversation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import discord
from discord import app_commands

from inference import Conversation, Engine, EngineClosed, EngineError, Turn

from .access import is_allowed
from .admin_commands import register_admin_commands
from .answering import answer, notice, unexpected_error_notice
from .discord_api import use_gateway_of_api
from .history import collect_images, question_text, thread_conversation
from .images import ImageFetcher, ImageLimits, ImageProblem
from .limits import Refused, RequestGate
from .metrics import ENGINE_PROBLEMS, MeteredEngine, Metrics
from .ops_server import gateway_problem
from .quotas import DailyQuotas, is_moderator
from .replies import EditableMessage, SendMessage
from .server_settings import ServerSettings
from .settings import BotSettings
from .storage import Storage

log = logging.getLogger(__name__)

NO_QUESTION = "Mention me with a question, and attach the image(s) it is about."
NOT_ALLOWED = "You can't use me here."
CUT_OFF = "The bot is restarting, so this answer was cut off. Please ask again in a minute."
SHUTDOWN_GRACE_SECONDS = 5.0
THREAD_NAME_LIMIT = 100
STARTING_UP_STATUS = "Starting up: loading the model…"


def interaction_expired(error: discord.HTTPException) -> bool:
    """Unknown Webhook (10015) or Invalid Webhook Token (50027): the 15 minutes are over."""
    return error.status in (401, 404) or error.code in (10015, 50027)


def thread_name(question: str) -> str:
    name = " ".join(question.split())[:THREAD_NAME_LIMIT].strip()
    return name or "Image question"


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
        self.quotas = DailyQuotas(self.storage, self.server_settings)
        self.tree = app_commands.CommandTree(self)
        self.exit_code = 0
        self._engine_ready = asyncio.Event()
        self._engine_task: asyncio.Task[None] | None = None
        self.gate = RequestGate(settings)
        self.shutting_down = False
        self._requests: set[asyncio.Task[object]] = set()
        self._stopping: asyncio.Task[None] | None = None
        self.images = ImageFetcher(ImageLimits.from_settings(settings))

    async def setup_hook(self) -> None:
        from .commands import register_commands

        if self.settings.api_base_url:
            await use_gateway_of_api(self)
        # The model loads on the engine's worker thread while the gateway connects.
        self._engine_task = asyncio.create_task(self._start_engine(), name="engine-start")
        await self.storage.open()
        await self.server_settings.load()
        register_commands(self.tree, self)
        register_admin_commands(self.tree, self.server_settings, self.settings)
        self.tree.on_error = self._on_command_error
        guild = discord.Object(self.settings.dev_guild_id) if self.settings.dev_guild_id else None
        if guild is not None:
            self.tree.copy_global_to(guild=guild)
        synced = await self.tree.sync(guild=guild)
        log.info("synced %d slash commands %s", len(synced), f"to guild {guild.id}" if guild else "globally")

    async def _start_engine(self) -> None:
        try:
            await self.engine.start()
        except EngineError as error:  # a clear one-line reason: a bad MODEL_ID, no server...
            log.error("the model could not be started, stopping: %s", error)
            self.exit_code = 1
            await self.close()
            return
        except Exception:
            log.exception("the model could not be started; stopping")
            self.exit_code = 1
            await self.close()
            return
        log.info("model loaded; answering questions")
        self._engine_ready.set()
        await self._show_online()

    async def _show_online(self) -> None:
        """Online, without the "starting up" status: now, and in every later IDENTIFY."""
        self.status, self.activity = discord.Status.online, None
        try:
            await self.change_presence(status=discord.Status.online, activity=None)
        except Exception as error:  # not connected yet: the IDENTIFY or on_ready will say it
            log.debug("bot status not updated yet: %r", error)

    async def shutdown(self) -> None:
        """Stop taking requests, tell people whose answers are cut off, then close."""
        if self.shutting_down:
            return
        self.shutting_down = True
        log.info("shutting down: %d requests in progress", len(self._requests))
        for task in self._requests:
            task.cancel()
        if self._requests:
            await asyncio.wait(self._requests, timeout=SHUTDOWN_GRACE_SECONDS)
        await self.close()

    async def close(self) -> None:
        await super().close()
        if self._engine_task is not None and not self._engine_task.done():
            self._engine_task.cancel()
        await self.engine.close()
        await self.images.close()
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
        if self._engine_ready.is_set():  # ready before the gateway was: say so now
            await self._show_online()

    # --- messages -----------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot or self.user is None or self.shutting_down:  # ourselves included
            return
        channel = message.channel
        mentioned = self.user in message.mentions
        if isinstance(channel, discord.DMChannel):
            handle, kind = self._answer_message, "dm"
        elif isinstance(channel, discord.Thread) and channel.owner_id == self.user.id:
            handle, kind = self._answer_follow_up, "follow-up"  # type: ignore[assignment]
        elif mentioned and isinstance(channel, discord.Thread):
            handle, kind = self._answer_message, "mention"
        elif mentioned:
            handle, kind = self._answer_in_new_thread, "mention"  # type: ignore[assignment]
        else:
            return
        if not self._allowed(message.author, channel, message.guild):
            log.info(
                "ignoring a question from user %s in channel %s: not allowed", message.author.id, channel.id
            )
            self.metrics.count(kind, "refused")
            return
        try:
            with self.metrics.question(kind), self.gate.admit(message.author.id), self._tracked():
                guild_id = message.guild.id if message.guild else None
                moderator = is_moderator(message.author, channel)
                await self.quotas.take(guild_id, message.author.id, moderator=moderator)
                await handle(message, channel)  # type: ignore[arg-type]
        except Refused as refusal:
            log.info("refused a question from user %s: %s", message.author.id, refusal)
            await message.reply(notice(str(refusal)))
        except ImageProblem as problem:
            log.info("image problem from %s: %s", message.author.id, problem)
            await message.channel.send(notice(str(problem)), reference=message)
        except discord.Forbidden as error:
            log.warning(
                "missing permission in channel %s (%s): give the bot Send Messages, Send Messages in "
                "Threads, Create Public Threads and Read Message History there",
                channel.id,
                error,
            )

    def _allowed(self, user: discord.abc.User, channel: object, guild: discord.Guild | None) -> bool:
        """The environment's access lists, then the server's own channel list (`/seebot channels`)."""
        return is_allowed(self.settings, user, channel, guild) and self.server_settings.answers_in(
            guild and guild.id, channel
        )

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        """Remember the running request, so a shutdown can cut it off and say so."""
        task = asyncio.current_task()
        assert task is not None
        self._requests.add(task)
        try:
            yield
        finally:
            self._requests.discard(task)

    async def _answer_in_new_thread(self, message: discord.Message, _channel: object = None) -> None:
        question = question_text(message, self._my_id)
        collected = await collect_images(message, self.images)
        images = collected.images
        if not question and not images:
            await message.reply("\n".join(notice(text) for text in [*collected.notices, NO_QUESTION]))
            return
        if isinstance(message.channel, discord.TextChannel):
            try:
                thread = await message.create_thread(
                    name=thread_name(question or "Image question"), auto_archive_duration=1440
                )
            except discord.HTTPException as error:
                log.warning(
                    "cannot create a thread in #%s (%s); replying in the channel", message.channel, error
                )
            else:
                await self._respond(
                    Conversation.single(question or self._describe_prompt(message.guild), images),
                    thread,
                    message.author,
                    notices=collected.notices,
                )
                return
        await self._respond(
            Conversation.single(question or self._describe_prompt(message.guild), images),
            message.channel,
            message.author,
            reference=message,
            notices=collected.notices,
        )

    async def _answer_message(self, message: discord.Message, channel: discord.abc.Messageable) -> None:
        question = question_text(message, self._my_id)
        collected = await collect_images(message, self.images)
        images = collected.images
        if not question and not images:
            await message.reply("\n".join(notice(text) for text in [*collected.notices, NO_QUESTION]))
            return
        conversation = Conversation.single(question or self._describe_prompt(message.guild), images)
        await self._respond(
            conversation, channel, message.author, reference=message, notices=collected.notices
        )

    async def _answer_follow_up(self, message: discord.Message, thread: discord.Thread) -> None:
        assert self.user is not None
        async with thread.typing():
            rebuilt = await thread_conversation(
                thread, self.user, self._describe_prompt(thread.guild), self.images
            )
        conversation = rebuilt.conversation
        if not conversation.turns or conversation.turns[-1].role != "user":
            return
        await self._respond(conversation, thread, message.author, notices=rebuilt.notices)

    async def _respond(
        self,
        conversation: Conversation,
        channel: discord.abc.Messageable,
        requester: discord.abc.User,
        *,
        reference: discord.Message | None = None,
        notices: Sequence[str] = (),
    ) -> None:
        first = True

        async def send(content: str, *, view: discord.ui.View | None = None) -> EditableMessage:
            nonlocal first
            use_reference = reference if first else None
            first = False
            return await channel.send(
                content,
                reference=use_reference,  # type: ignore[arg-type]
                mention_author=False,
                view=view,  # type: ignore[arg-type]
            )

        if notices:  # skipped attachments, images left out: before the answer, in its place
            await send("\n".join(notice(text) for text in notices))
        await self._answer_or_say_cut_off(conversation, send, requester, typing_in=channel)

    async def _answer_or_say_cut_off(
        self,
        conversation: Conversation,
        send: SendMessage,
        requester: discord.abc.User,
        *,
        typing_in: discord.abc.Messageable | None = None,
    ) -> None:
        try:
            await answer(
                self.engine,
                conversation,
                send,
                edit_interval=self.settings.edit_interval_seconds,
                timeout=self.settings.generation_timeout_seconds,
                requester_id=requester.id,
                typing_in=typing_in,
                engine_ready=self._engine_ready,
            )
        except asyncio.CancelledError:
            if self.shutting_down:
                await send(notice(CUT_OFF))
            raise
        except EngineClosed:
            if not self.shutting_down:
                # Never a bot that takes questions and answers none: stop, and let the
                # supervisor (systemd, docker --restart) start a fresh one.
                log.critical("the model worker stopped; shutting down with exit code 1")
                self.exit_code = 1
                self._stopping = asyncio.create_task(self.shutdown())

    # --- slash commands (called from commands.py) ---------------------------------------

    async def answer_interaction(
        self, interaction: discord.Interaction, question: str, attachments: Sequence[discord.Attachment]
    ) -> None:
        if self.shutting_down:
            await interaction.response.send_message(notice(CUT_OFF), ephemeral=True)
            return
        kind = interaction.command.name if interaction.command else "command"
        if not self._allowed(interaction.user, interaction.channel, interaction.guild):
            log.info("refused /%s from user %s: not allowed here", interaction.command, interaction.user.id)
            self.metrics.count(kind, "refused")
            await interaction.response.send_message(notice(NOT_ALLOWED), ephemeral=True)
            return
        try:
            with self.metrics.question(kind), self.gate.admit(interaction.user.id), self._tracked():
                moderator = interaction.guild_id is not None and interaction.permissions.manage_messages
                await self.quotas.take(interaction.guild_id, interaction.user.id, moderator=moderator)
                await interaction.response.defer(thinking=True)
                await self._answer_interaction(interaction, question, attachments)
        except Refused as refusal:
            log.info("refused /%s from user %s: %s", interaction.command, interaction.user.id, refusal)
            await interaction.response.send_message(notice(str(refusal)), ephemeral=True)

    async def _answer_interaction(
        self, interaction: discord.Interaction, question: str, attachments: Sequence[discord.Attachment]
    ) -> None:
        try:
            collected = await self.images.collect(attachments, strict=True)
        except ImageProblem as problem:
            log.info("image problem from %s: %s", interaction.user.id, problem)
            await interaction.followup.send(notice(str(problem)))
            return

        expired = False

        async def send(content: str, *, view: discord.ui.View | None = None) -> EditableMessage:
            nonlocal expired
            if not expired:
                try:
                    if view is None:
                        return await interaction.followup.send(content, wait=True)
                    return await interaction.followup.send(content, wait=True, view=view)
                except discord.HTTPException as error:
                    if not interaction_expired(error):
                        raise
                    # Interaction tokens last 15 minutes; a long wait in line outlives them.
                    log.warning(
                        "/%s follow-up failed (%s); answering in the channel", interaction.command, error
                    )
                    expired = True
            channel = interaction.channel
            if not isinstance(channel, discord.abc.Messageable):
                raise RuntimeError("the interaction expired and its channel cannot be written to")
            return await channel.send(content, view=view)  # type: ignore[arg-type]

        images = collected.images
        if collected.notices:
            await send("\n".join(notice(text) for text in collected.notices))
        await self._answer_or_say_cut_off(
            Conversation((Turn("user", question, tuple(images)),)), send, interaction.user
        )

    async def _on_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        """A slash command failed unexpectedly: tell the user (with an id) and keep serving."""
        name = interaction.command.name if interaction.command else "?"
        text = unexpected_error_notice(f"/{name}", error)
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException:
            log.warning("could not report the failure of /%s to the user", name)

    @property
    def _my_id(self) -> int:
        assert self.user is not None
        return self.user.id

    def _describe_prompt(self, guild: discord.Guild | None) -> str:
        """The question for images sent without one: the server's describe prompt."""
        return self.server_settings.prompt(guild and guild.id, "describe")


class ShardedSeeBot(SeeBot, discord.AutoShardedClient):
    """The same bot over several gateway connections (shards), for bots in many servers.

    Discord requires sharding from 2,500 servers; all shards of a process share one engine.
    """


def create_bot(settings: BotSettings, engine: Engine) -> SeeBot:
    """A plain client, or with SHARD_COUNT set, an auto-sharded one (0 = Discord's advice)."""
    if settings.shard_count is None:
        return SeeBot(settings, engine)
    return ShardedSeeBot(settings, engine, shard_count=settings.shard_count or None)
