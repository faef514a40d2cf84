"""The one place a question is answered, whichever way it was asked (a mention, a DM, a
follow-up in a thread, a slash command, a message context menu).

Handed the settings, the engine and the image fetcher, it owns what every question goes
through: the fair-use gate, the questions in flight (deleting a question's message or thread
stops it), nothing escaping a question untold, the notices before an answer, the streamed
answer with its Cancel button, place in line and timeout (``bot/answering.py``), the
cut-off notice at shutdown, and for /ocr and Read text, reading page by page with the
``.txt`` copy. The ways to ask (``bot/triggers.py``, ``bot/commands.py``,
``bot/context_menus.py``) only say what was asked and where the answer goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence

import discord
from discord import app_commands

from inference import Conversation, Engine, EngineClosed, Turn

from . import texts
from .access import is_allowed
from .answering import answer, notice, unexpected_error_notice
from .discord_calls import DISCORD_FAILURES, channel_gone, describe, reply_reference, with_retries
from .images import AttachmentLike, ImageFetcher, ImageProblem
from .interactions import InteractionRoute, command_name
from .limits import Refused, RequestGate
from .metrics import Metrics
from .questions import Question, Questions
from .quotas import DailyQuotas
from .reading import PageByPage, RecordingSend, attach_text_file, headings_for, text_file_name
from .replies import EditableMessage, SendMessage
from .server_settings import PromptUse, ServerSettings
from .settings import BotSettings

log = logging.getLogger(__name__)


class Responder:
    """Answers questions; one per bot. ``on_engine_closed`` is called when the model worker
    stopped for good (the bot then shuts down, for its supervisor to restart it). Each
    server's own settings (``/seebot``) choose its channels and prompts; its daily quota is
    taken at the gate; ``metrics`` counts every question by how it ended."""

    def __init__(
        self,
        settings: BotSettings,
        engine: Engine,
        images: ImageFetcher,
        *,
        on_engine_closed: Callable[[], None],
        server_settings: ServerSettings,
        quotas: DailyQuotas,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.images = images
        self.server_settings = server_settings
        self.quotas = quotas
        self.metrics = metrics
        self.gate = RequestGate(settings)
        self.questions = Questions()
        self.engine_ready = asyncio.Event()  # set once the model is loaded and warmed up
        self.shutting_down = False
        self._requests: set[asyncio.Task[object]] = set()
        self._on_engine_closed = on_engine_closed

    # --- every question ---------------------------------------------------------------------

    @property
    def in_progress(self) -> int:
        return len(self._requests)

    async def cut_off_all(self, grace_seconds: float) -> None:
        """Shutting down: stop taking questions, cut off those in progress (each says so)."""
        self.shutting_down = True
        running = set(self._requests)
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=grace_seconds)

    def allowed(self, user: discord.abc.User, channel: object, guild: discord.Guild | None) -> bool:
        """The environment's access lists, then the server's own channel list (`/seebot channels`)."""
        return is_allowed(self.settings, user, channel, guild) and self.server_settings.answers_in(
            guild and guild.id, channel
        )

    def prompt(self, guild_id: int | None, use: PromptUse) -> str:
        """The server's prompt for /ocr ("ocr"), images without a question ("describe") or
        /compare without one ("compare"), else the environment's."""
        return self.server_settings.prompt(guild_id, use)

    @contextlib.asynccontextmanager
    async def admitted(
        self, kind: str, user: discord.abc.User, guild_id: int | None, *, moderator: bool
    ) -> AsyncIterator[None]:
        """The gate: a place in line (or `Refused`), today's quota taken (moderators are not
        counted), the request tracked for a shutdown, and the question counted by its outcome."""
        with self.metrics.question(kind), self.gate.admit(user.id), self.tracked():
            await self.quotas.take(guild_id, user.id, moderator=moderator)
            yield

    @contextlib.contextmanager
    def tracked(self) -> Iterator[None]:
        """Remember the running request, so a shutdown can cut it off and say so."""
        task = asyncio.current_task()
        assert task is not None
        self._requests.add(task)
        try:
            yield
        finally:
            self._requests.discard(task)

    async def run(
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
            await tell(notice(texts.DISCORD_FAILED))
        except Exception as error:
            await tell(unexpected_error_notice(question.label, error))

    async def reply_notice(self, message: discord.Message, text: str, question: Question) -> None:
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

    async def respond_in(
        self,
        question: Question,
        conversation: Conversation,
        channel: discord.abc.Messageable,
        *,
        reference: discord.Message | None = None,
        notices: Sequence[str] = (),
    ) -> None:
        """The answer in `channel` (its first message replying to `reference`), after the notices."""
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
            await self._notices(question, notices, send)
        await self.answer(question, conversation, send, typing_in=channel)

    async def _notices(self, question: Question, notices: Sequence[str], send: SendMessage) -> None:
        sent = await with_retries(
            lambda: send("\n".join(notice(text) for text in notices)), f"{question.label}: notices"
        )
        self.questions.mark(sent.id, "notice")

    async def answer(
        self,
        question: Question,
        conversation: Conversation,
        send: SendMessage,
        *,
        typing_in: discord.abc.Messageable | None = None,
        engine: Engine | None = None,
    ) -> str | None:
        """Stream the answer to `send`; the text, or None after a notice. Cut off by a
        shutdown, it says so; when the model worker stopped, the bot stops too."""
        try:
            return await answer(
                engine or self.engine,
                conversation,
                send,
                edit_interval=self.settings.edit_interval_seconds,
                timeout=self.settings.generation_timeout_seconds,
                question=question,
                mark=self.questions.mark,
                typing_in=typing_in,
                engine_ready=self.engine_ready,
            )
        except asyncio.CancelledError:
            if self.shutting_down and question.stopped_because is None:
                with contextlib.suppress(*DISCORD_FAILURES):
                    sent = await send(notice(texts.CUT_OFF))
                    self.questions.mark(sent.id, "notice")
            raise
        except EngineClosed:
            if not self.shutting_down:
                self._on_engine_closed()
        return None

    # --- slash commands and context menus -----------------------------------------------------

    async def respond_to_interaction(
        self,
        interaction: discord.Interaction,
        question: str,
        attachments: Sequence[AttachmentLike],
        *,
        strict: bool = True,
        read_text: bool = False,
        notices: Sequence[str] = (),
    ) -> None:
        """Answer a slash command or a context menu (``strict=False``: the images of a message,
        where a non-image is skipped with a notice). ``read_text``: page by page, and the whole
        text as a file when it takes more than one message."""
        name = command_name(interaction)
        if self.shutting_down:
            await interaction.response.send_message(notice(texts.CUT_OFF), ephemeral=True)
            return
        if not self.allowed(interaction.user, interaction.channel, interaction.guild):
            log.info("refused /%s from user %s: not allowed here", name, interaction.user.id)
            self.metrics.count(name, "refused")
            await interaction.response.send_message(notice(texts.NOT_ALLOWED), ephemeral=True)
            return
        if not attachments:  # a message with nothing that can be an image: say so privately
            text = "\n".join(notice(line) for line in [*notices, texts.NO_IMAGE])
            await interaction.response.send_message(text, ephemeral=True)
            return
        channel_id = interaction.channel_id or 0
        with self.questions.asked(interaction.id, interaction.user.id, channel_id) as asked:
            route = InteractionRoute(interaction, asked)
            work = self._take_interaction(
                asked, route, question, attachments, strict=strict, read_text=read_text, notices=notices
            )
            await self.run(asked, work, route.tell)

    async def _take_interaction(
        self,
        asked: Question,
        route: InteractionRoute,
        question: str,
        attachments: Sequence[AttachmentLike],
        *,
        strict: bool,
        read_text: bool,
        notices: Sequence[str],
    ) -> None:
        interaction = route.interaction
        moderator = interaction.guild_id is not None and interaction.permissions.manage_messages
        try:
            async with self.admitted(route.name, interaction.user, interaction.guild_id, moderator=moderator):
                await route.acknowledge()
                await self._interaction_answer(
                    asked, route, question, attachments, strict=strict, read_text=read_text, notices=notices
                )
        except Refused as refusal:
            log.info("%s: refused /%s: %s", asked.label, route.name, refusal)
            await route.tell(notice(str(refusal)), ephemeral=True)

    async def _interaction_answer(
        self,
        asked: Question,
        route: InteractionRoute,
        question: str,
        attachments: Sequence[AttachmentLike],
        *,
        strict: bool,
        read_text: bool,
        notices: Sequence[str],
    ) -> None:
        limits = self.images.limits
        try:
            collected = await self.images.collect(
                attachments,
                strict=strict,
                max_images=max(limits.max_images, limits.max_pdf_pages) if read_text else None,
            )
        except ImageProblem as problem:
            log.info("%s: image problem: %s", asked.label, problem)
            await route.tell(notice(str(problem)))
            return
        collected.notices[:0] = notices
        if not collected.pictures:  # only non-images after all: say so privately
            text = "\n".join(notice(line) for line in [*collected.notices, texts.NO_IMAGE])
            await route.tell_privately(text)
            return
        images = collected.images
        if collected.notices:
            await self._notices(asked, collected.notices, route.send)
        if not read_text:
            await self.answer(asked, Conversation((Turn("user", question, tuple(images)),)), route.send)
            return
        headings = headings_for(collected.pictures)
        recording = RecordingSend(route.send)
        text = await self.answer(
            asked,
            Conversation.single(question, images),
            recording,
            engine=PageByPage(self.engine, headings) if headings else None,
        )
        if text:
            await attach_text_file(recording.last, text, text_file_name(collected.pictures))

    async def on_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        """A command failed unexpectedly: tell the user (with an id) and keep serving."""
        name = command_name(interaction)
        text = unexpected_error_notice(f"/{name}", error)
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except DISCORD_FAILURES as failure:
            log.warning("could not report the failure of /%s to the user (%s)", name, describe(failure))
