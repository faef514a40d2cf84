"""Messages that are questions for the bot, and where each is answered.

A mention in a channel opens a thread from the message and answers there; a mention in a
thread, and any DM, is answered in place; every message in a thread the bot made is a
follow-up, answered with the whole thread as the conversation (``bot/history.py``). A
pasted link's embed is waited for briefly (``bot/sources.py``). The answering itself is the
responder's (``bot/responder.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import discord

from inference import Conversation

from . import texts
from .answering import notice, typing_shown
from .discord_calls import UNKNOWN_MESSAGE, describe, with_retries
from .history import collect_images, question_text, thread_conversation
from .images import ImageProblem
from .limits import Refused
from .questions import Question
from .quotas import is_moderator
from .responder import Responder
from .sources import wait_for_unfurl

log = logging.getLogger(__name__)

THREAD_NAME_LIMIT = 100

Handler = Callable[[Question, discord.Message, discord.abc.Messageable], Awaitable[None]]


def thread_name(question: str) -> str:
    name = " ".join(question.split())[:THREAD_NAME_LIMIT].strip()
    return name or "Image question"


class MessageTriggers:
    """Handed the client (who the bot is; its events) and the responder."""

    def __init__(self, client: discord.Client, responder: Responder) -> None:
        self._client = client
        self._responder = responder

    async def on_message(self, message: discord.Message) -> None:
        me = self._client.user
        if message.author.bot or me is None or self._responder.shutting_down:  # ourselves included
            return
        channel = message.channel
        mentioned = me in message.mentions
        handle: Handler
        if isinstance(channel, discord.DMChannel):
            handle, kind = self._in_place, "dm"
        elif isinstance(channel, discord.Thread) and channel.owner_id == me.id:
            handle, kind = self._follow_up, "follow-up"  # type: ignore[assignment]
        elif mentioned and isinstance(channel, discord.Thread):
            handle, kind = self._in_place, "mention"
        elif mentioned:
            handle, kind = self._in_new_thread, "mention"
        else:
            return
        if not self._responder.allowed(message.author, channel, message.guild):
            log.info(
                "ignoring a question from user %s in channel %s: not allowed", message.author.id, channel.id
            )
            self._responder.metrics.count(kind, "refused")
            return
        # Before any await: a MESSAGE_DELETE handled after this finds the question.
        with self._responder.questions.asked(
            message.id, message.author.id, channel.id, message_id=message.id
        ) as question:

            async def tell(text: str) -> None:
                await self._responder.reply_notice(message, text, question)

            await self._responder.run(question, self._take(question, message, handle, kind), tell)

    async def _take(self, question: Question, message: discord.Message, handle: Handler, kind: str) -> None:
        responder = self._responder
        guild_id = message.guild.id if message.guild else None
        moderator = is_moderator(message.author, message.channel)
        try:
            async with responder.admitted(kind, message.author, guild_id, moderator=moderator):
                await wait_for_unfurl(self._client, message)  # a pasted link's embed, at most 2 s
                await handle(question, message, message.channel)
        except Refused as refusal:
            log.info("%s: refused: %s", question.label, refusal)
            await responder.reply_notice(message, notice(str(refusal)), question)
        except ImageProblem as problem:
            log.info("%s: image problem: %s", question.label, problem)
            await responder.reply_notice(message, notice(str(problem)), question)
        except discord.Forbidden as error:
            log.warning(
                "%s: missing permission in channel %s (%s): give the bot Send Messages, Send Messages "
                "in Threads, Create Public Threads and Read Message History there",
                question.label,
                message.channel.id,
                describe(error),
            )

    async def _in_new_thread(
        self, question: Question, message: discord.Message, _channel: object = None
    ) -> None:
        asked = await self._question_in(question, message)
        if asked is None:
            return
        conversation, notices = asked
        if isinstance(message.channel, discord.TextChannel):
            text = question_text(message, self._my_id)
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
                await self._responder.respond_in(question, conversation, thread, notices=notices)
                return
        await self._responder.respond_in(
            question, conversation, message.channel, reference=message, notices=notices
        )

    async def _in_place(
        self, question: Question, message: discord.Message, channel: discord.abc.Messageable
    ) -> None:
        asked = await self._question_in(question, message)
        if asked is None:
            return
        conversation, notices = asked
        await self._responder.respond_in(question, conversation, channel, reference=message, notices=notices)

    async def _question_in(
        self, question: Question, message: discord.Message
    ) -> tuple[Conversation, list[str]] | None:
        """The message's question (its images under the describe prompt if it has no text)
        and the notices about its images; None, once the asker is told, if it asks nothing."""
        text = question_text(message, self._my_id)
        collected = await collect_images(message, self._responder.images)
        if not text and not collected.images:
            await self._no_question(question, message, collected.notices)
            return None
        conversation = Conversation.single(text or self._describe_prompt(message.guild), collected.images)
        return conversation, collected.notices

    async def _follow_up(self, question: Question, message: discord.Message, thread: discord.Thread) -> None:
        me = self._client.user
        assert me is not None
        questions = self._responder.questions
        # Answered in order: the conversation then holds the earlier questions' answers.
        await questions.wait_for_earlier(question)
        async with typing_shown(thread):
            rebuilt = await thread_conversation(
                thread,
                me,
                self._describe_prompt(thread.guild),
                self._responder.images,
                kind_of=questions.kind_of,
                up_to=message.id,
            )
        conversation = rebuilt.conversation
        if not conversation.turns or conversation.turns[-1].role != "user":
            return
        await self._responder.respond_in(question, conversation, thread, notices=rebuilt.notices)

    async def _no_question(self, question: Question, message: discord.Message, notices: list[str]) -> None:
        text = "\n".join(notice(line) for line in [*notices, texts.NO_QUESTION])
        await self._responder.reply_notice(message, text, question)

    @property
    def _my_id(self) -> int:
        assert self._client.user is not None
        return self._client.user.id

    def _describe_prompt(self, guild: discord.Guild | None) -> str:
        """The question for images sent without one: the server's describe prompt."""
        return self._responder.prompt(guild and guild.id, "describe")
