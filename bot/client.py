"""The Discord client: who it answers, where, and with what conversation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import discord
from discord import app_commands

from inference import Conversation, Engine, EngineClosed, EngineError, Turn

from .access import is_allowed
from .admin_commands import register_admin_commands
from .answering import answer, notice, typing_shown, unexpected_error_notice
from .discord_api import use_gateway_of_api
from .discord_calls import (
    DISCORD_FAILURES,
    UNKNOWN_MESSAGE,
    channel_gone,
    describe,
    reply_reference,
    with_retries,
)
from .history import collect_images, question_text, thread_conversation
from .images import ImageFetcher, ImageLimits, ImageProblem
from .interactions import InteractionRoute, command_name
from .limits import Refused, RequestGate
from .metrics import ENGINE_PROBLEMS, MeteredEngine, Metrics
from .ops_server import gateway_problem
from .questions import Question, Questions
from .quotas import DailyQuotas, is_moderator
from .replies import EditableMessage, SendMessage
from .server_settings import ServerSettings
from .settings import BotSettings
from .storage import Storage

log = logging.getLogger(__name__)

NO_QUESTION = "Mention me with a question, and attach the image(s) it is about."
NOT_ALLOWED = "You can't use me here."
DISCORD_FAILED = "Discord kept failing while I was answering this, so I had to stop. Please ask again."
CUT_OFF = "The bot is restarting, so this answer was cut off. Please ask again in a minute."
SHUTDOWN_GRACE_SECONDS = 5.0
THREAD_NAME_LIMIT = 100
STARTING_UP_STATUS = "Starting up: loading the model…"


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
        self.questions = Questions()
        self._closed: asyncio.Future[None] | None = None

    async def setup_hook(self) -> None:
        from .commands import register_commands

        if self.settings.api_base_url:
            await use_gateway_of_api(self)
        await self.storage.open()
        await self.server_settings.load()
        # The model loads on the engine's worker thread while the gateway connects.
        self._engine_task = asyncio.create_task(self._start_engine(), name="engine-start")
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
        """Close Discord, the image downloads' session and the engine, once: a second call
        (a signal's shutdown and `async with` both close) waits for the first to finish."""
        if self._closed is None:
            self._closed = asyncio.ensure_future(self._close_everything())
        await asyncio.shield(self._closed)

    async def _close_everything(self) -> None:
        try:
            await super().close()
        finally:
            if self._engine_task is not None and not self._engine_task.done():
                self._engine_task.cancel()
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
        if self._engine_ready.is_set():  # ready before the gateway was: say so now
            await self._show_online()

    # --- deletions ---------------------------------------------------------------------

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        self.questions.message_deleted(payload.message_id)

    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        for message_id in payload.message_ids:
            self.questions.message_deleted(message_id)

    async def on_raw_thread_delete(self, payload: discord.RawThreadDeleteEvent) -> None:
        self.questions.channel_deleted(payload.thread_id)

    async def on_guild_channel_delete(self, channel: discord.abc.GuildChannel) -> None:
        self.questions.channel_deleted(channel.id)

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
        # Before any await: a MESSAGE_DELETE handled after this finds the question.
        with self.questions.asked(
            message.id, message.author.id, channel.id, message_id=message.id
        ) as question:

            async def tell(text: str) -> None:
                await self._reply_notice(message, text, question)

            await self._run_question(question, self._take_message(question, message, handle, kind), tell)

    async def _take_message(
        self,
        question: Question,
        message: discord.Message,
        handle: Callable[..., Awaitable[None]],
        kind: str,
    ) -> None:
        try:
            with self.metrics.question(kind), self.gate.admit(message.author.id), self._tracked():
                guild_id = message.guild.id if message.guild else None
                moderator = is_moderator(message.author, message.channel)
                await self.quotas.take(guild_id, message.author.id, moderator=moderator)
                await handle(question, message, message.channel)
        except Refused as refusal:
            log.info("%s: refused: %s", question.label, refusal)
            await self._reply_notice(message, notice(str(refusal)), question)
        except ImageProblem as problem:
            log.info("%s: image problem: %s", question.label, problem)
            await self._reply_notice(message, notice(str(problem)), question)
        except discord.Forbidden as error:
            log.warning(
                "%s: missing permission in channel %s (%s): give the bot Send Messages, Send Messages "
                "in Threads, Create Public Threads and Read Message History there",
                question.label,
                message.channel.id,
                describe(error),
            )

    async def _run_question(
        self, question: Question, work: Awaitable[None], tell: Callable[[str], Awaitable[None]]
    ) -> None:
        """Run a question's work so that nothing escapes it untold: a stopped question (its
        message or thread deleted, Cancel pressed) ends quietly; Discord failing is told to
        the asker (or, when that fails too, logged with the question's id); a bug is told with
        an error id. A shutdown's cancellation propagates (the cut-off notice is sent)."""
        try:
            await work
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if question.stopped_because is None or self.shutting_down or task is None:
                raise
            task.uncancel()
            log.info("%s: stopped: %s", question.label, question.stopped_because)
        except DISCORD_FAILURES as error:
            if channel_gone(error) or question.channel_gone:
                log.info(
                    "%s: its channel is gone (%s); nothing to answer in", question.label, describe(error)
                )
                return
            log.warning("%s: Discord failed (%s); telling the asker", question.label, describe(error))
            await tell(notice(DISCORD_FAILED))
        except Exception as error:
            await tell(unexpected_error_notice(question.label, error))

    async def _reply_notice(self, message: discord.Message, text: str, question: Question) -> None:
        """A notice replying to `message` (posted plainly if it was deleted), retried."""
        try:
            sent = await with_retries(
                lambda: message.channel.send(text, reference=reply_reference(message), mention_author=False),
                f"{question.label}: a notice",
            )
        except DISCORD_FAILURES as error:
            log.error("%s: could not tell the asker %r (%s)", question.label, text, describe(error))
            return
        self.questions.mark(sent.id, "notice")

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

    async def _answer_in_new_thread(
        self, question: Question, message: discord.Message, _channel: object = None
    ) -> None:
        text = question_text(message, self._my_id)
        collected = await collect_images(message, self.images)
        images = collected.images
        if not text and not images:
            await self._reply_notice(
                message, "\n".join(notice(t) for t in [*collected.notices, NO_QUESTION]), question
            )
            return
        if isinstance(message.channel, discord.TextChannel):
            try:
                thread = await with_retries(
                    lambda: message.create_thread(
                        name=thread_name(text or "Image question"), auto_archive_duration=1440
                    ),
                    f"{question.label}: making its thread",
                )
            except discord.NotFound as error:
                if error.code == UNKNOWN_MESSAGE:  # deleted before its thread was made
                    log.info("%s: its message is gone; not answering", question.label)
                    return
                raise
            except discord.HTTPException as error:
                log.warning(
                    "%s: cannot create a thread in channel %s (%s); replying in the channel",
                    question.label,
                    message.channel.id,
                    describe(error),
                )
            else:
                question.channel_id = thread.id
                await self._respond(
                    question,
                    Conversation.single(text or self._describe_prompt(message.guild), images),
                    thread,
                    notices=collected.notices,
                )
                return
        await self._respond(
            question,
            Conversation.single(text or self._describe_prompt(message.guild), images),
            message.channel,
            reference=message,
            notices=collected.notices,
        )

    async def _answer_message(
        self, question: Question, message: discord.Message, channel: discord.abc.Messageable
    ) -> None:
        text = question_text(message, self._my_id)
        collected = await collect_images(message, self.images)
        images = collected.images
        if not text and not images:
            await self._reply_notice(
                message, "\n".join(notice(t) for t in [*collected.notices, NO_QUESTION]), question
            )
            return
        conversation = Conversation.single(text or self._describe_prompt(message.guild), images)
        await self._respond(question, conversation, channel, reference=message, notices=collected.notices)

    async def _answer_follow_up(
        self, question: Question, message: discord.Message, thread: discord.Thread
    ) -> None:
        assert self.user is not None
        # Answered in order: the conversation then holds the earlier questions' answers.
        await self.questions.wait_for_earlier(question)
        async with typing_shown(thread):
            rebuilt = await thread_conversation(
                thread,
                self.user,
                self._describe_prompt(thread.guild),
                self.images,
                kind_of=self.questions.kind_of,
                up_to=message.id,
            )
        conversation = rebuilt.conversation
        if not conversation.turns or conversation.turns[-1].role != "user":
            return
        await self._respond(question, conversation, thread, notices=rebuilt.notices)

    async def _respond(
        self,
        question: Question,
        conversation: Conversation,
        channel: discord.abc.Messageable,
        *,
        reference: discord.Message | None = None,
        notices: Sequence[str] = (),
    ) -> None:
        first = True

        async def send(content: str, *, view: discord.ui.View | None = None) -> EditableMessage:
            nonlocal first
            use_reference = reply_reference(reference) if first and reference is not None else None
            sent = await channel.send(
                content,
                reference=use_reference,  # type: ignore[arg-type]
                mention_author=False,
                view=view,  # type: ignore[arg-type]
            )
            first = False
            return sent

        if notices:  # skipped attachments, images left out: before the answer, in its place
            sent = await with_retries(
                lambda: send("\n".join(notice(text) for text in notices)), f"{question.label}: notices"
            )
            self.questions.mark(sent.id, "notice")
        await self._answer_or_say_cut_off(question, conversation, send, typing_in=channel)

    async def _answer_or_say_cut_off(
        self,
        question: Question,
        conversation: Conversation,
        send: SendMessage,
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
                question=question,
                mark=self.questions.mark,
                typing_in=typing_in,
                engine_ready=self._engine_ready,
            )
        except asyncio.CancelledError:
            if self.shutting_down and question.stopped_because is None:
                with contextlib.suppress(*DISCORD_FAILURES):
                    sent = await send(notice(CUT_OFF))
                    self.questions.mark(sent.id, "notice")
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
        name = command_name(interaction)
        if self.shutting_down:
            await interaction.response.send_message(notice(CUT_OFF), ephemeral=True)
            return
        if not self._allowed(interaction.user, interaction.channel, interaction.guild):
            log.info("refused /%s from user %s: not allowed here", name, interaction.user.id)
            self.metrics.count(name, "refused")
            await interaction.response.send_message(notice(NOT_ALLOWED), ephemeral=True)
            return
        channel_id = interaction.channel_id or 0
        with self.questions.asked(interaction.id, interaction.user.id, channel_id) as asked:
            route = InteractionRoute(interaction, asked)

            await self._run_question(
                asked, self._take_interaction(asked, route, question, attachments), route.tell
            )

    async def _take_interaction(
        self,
        asked: Question,
        route: InteractionRoute,
        question: str,
        attachments: Sequence[discord.Attachment],
    ) -> None:
        interaction = route.interaction
        try:
            with self.metrics.question(route.name), self.gate.admit(interaction.user.id), self._tracked():
                moderator = interaction.guild_id is not None and interaction.permissions.manage_messages
                await self.quotas.take(interaction.guild_id, interaction.user.id, moderator=moderator)
                await route.acknowledge()
                await self._answer_interaction(asked, route, question, attachments)
        except Refused as refusal:
            log.info("%s: refused /%s: %s", asked.label, route.name, refusal)
            await route.tell(notice(str(refusal)), ephemeral=True)

    async def _answer_interaction(
        self,
        asked: Question,
        route: InteractionRoute,
        question: str,
        attachments: Sequence[discord.Attachment],
    ) -> None:
        try:
            collected = await self.images.collect(attachments, strict=True)
        except ImageProblem as problem:
            log.info("%s: image problem: %s", asked.label, problem)
            await route.tell(notice(str(problem)))
            return
        images = collected.images
        if collected.notices:
            sent = await with_retries(
                lambda: route.send("\n".join(notice(text) for text in collected.notices)),
                f"{asked.label}: notices",
            )
            self.questions.mark(sent.id, "notice")
        await self._answer_or_say_cut_off(
            asked, Conversation((Turn("user", question, tuple(images)),)), route.send
        )

    async def _on_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        """A slash command failed unexpectedly: tell the user (with an id) and keep serving."""
        name = command_name(interaction)
        text = unexpected_error_notice(f"/{name}", error)
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except DISCORD_FAILURES as failure:
            log.warning("could not report the failure of /%s to the user (%s)", name, describe(failure))

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
