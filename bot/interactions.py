"""Where a slash command's answer goes: the interaction's follow-ups while Discord takes
them, else the channel it was asked in (the acknowledgement failed, or the 15 minutes of an
interaction token ran out during a long wait in line)."""

from __future__ import annotations

import logging
from typing import Any

import discord

from .discord_calls import DISCORD_FAILURES, describe, with_retries
from .questions import Question
from .replies import EditableMessage
from .texts import ack_failed

log = logging.getLogger(__name__)


def command_name(interaction: discord.Interaction) -> str:
    return interaction.command.name if interaction.command is not None else "?"


def interaction_expired(error: discord.HTTPException) -> bool:
    """Unknown Webhook (10015), Unknown interaction (10062) or Invalid Webhook Token (50027)."""
    return error.status in (401, 404) or error.code in (10015, 10062, 50027)


class InteractionRoute:
    """Sends a question's messages for one interaction, falling back to its channel."""

    def __init__(self, interaction: discord.Interaction, question: Question) -> None:
        self.interaction = interaction
        self.question = question
        self.name = command_name(interaction)
        self._in_channel = False  # the interaction cannot carry the answer any more

    async def acknowledge(self) -> None:
        """ "SeeBot is thinking…"; if Discord does not take it (it must within 3 s), the answer
        goes in the channel instead, after a line that says for whom."""
        try:
            await self.interaction.response.defer(thinking=True)
        except DISCORD_FAILURES as error:
            log.warning(
                "%s: Discord did not take the acknowledgement of /%s (%s); answering in the channel",
                self.question.label,
                self.name,
                describe(error),
            )
            self._in_channel = True
            await self.tell(ack_failed(self.interaction.user.mention, self.name))

    async def send(self, content: str, *, view: Any = None) -> EditableMessage:
        """One message of the answer (see `SendMessage`)."""
        if not self._in_channel:
            try:
                if view is None:
                    return await self.interaction.followup.send(content, wait=True)
                return await self.interaction.followup.send(content, wait=True, view=view)
            except discord.HTTPException as error:
                if not interaction_expired(error):
                    raise
                log.warning(
                    "%s: the /%s follow-up failed (%s); answering in the channel",
                    self.question.label,
                    self.name,
                    describe(error),
                )
                self._in_channel = True
        channel = self.interaction.channel
        if not isinstance(channel, discord.abc.Messageable):
            raise RuntimeError("the interaction expired and its channel cannot be written to")
        return await channel.send(content, view=view)  # type: ignore[arg-type]

    async def tell_privately(self, text: str) -> None:
        """A notice only the asker sees, after "thinking…" was shown: that goes first (the
        first follow-up after a deferral takes the deferral's visibility, public here)."""
        if self._in_channel or not self.interaction.response.is_done():
            await self.tell(text, ephemeral=True)
            return
        label = self.question.label
        try:
            await with_retries(self.interaction.delete_original_response, f"{label}: thinking")
            await with_retries(
                lambda: self.interaction.followup.send(text, ephemeral=True), f"{label}: a notice"
            )
        except DISCORD_FAILURES as error:
            log.warning("%s: could not tell the asker privately (%s)", self.question.label, describe(error))
            await self.tell(text)

    async def tell(self, text: str, *, ephemeral: bool = False) -> None:
        """A notice for the asker: the interaction's response while none was given, else a
        follow-up or a channel message. Retried; logged with the question's id if it fails."""
        response = self.interaction.response

        async def say() -> object:
            if not self._in_channel and not response.is_done():
                return await response.send_message(text, ephemeral=ephemeral)
            return await self.send(text)

        failure: BaseException
        try:
            await with_retries(say, f"{self.question.label}: a notice")
            return
        except DISCORD_FAILURES as error:
            failure = error
        if not self._in_channel and not response.is_done():
            self._in_channel = True  # the 3 s are over: the channel is left
            try:
                await with_retries(lambda: self.send(text), f"{self.question.label}: a notice")
                return
            except DISCORD_FAILURES as error:
                failure = error
        log.error("%s: could not tell the asker %r (%s)", self.question.label, text, describe(failure))
