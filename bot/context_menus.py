"""Message context menu commands (right-click a message, Apps): Describe image, Read text and
Ask about this…, which asks for the question in a modal.

They read the images of the TARGET message, wherever it was sent and whoever sent it
(attachments, embedded images, stickers, PDFs: ``bot/sources.py``), and answer as the
interaction's follow-up, like the slash commands.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import discord
from discord import app_commands

from . import texts
from .answering import unexpected_error_notice
from .media_urls import MediaHosts
from .responder import Responder
from .sources import message_media

log = logging.getLogger(__name__)

DESCRIBE = "Describe image"
READ_TEXT = "Read text"
ASK = "Ask about this…"
QUESTION_MAX = 1000

OnQuestion = Callable[[discord.Interaction, str], Awaitable[None]]


class QuestionModal(discord.ui.Modal):
    """One paragraph field for the question; submitting it answers like any question."""

    question: discord.ui.TextInput[QuestionModal] = discord.ui.TextInput(
        label=texts.QUESTION_LABEL,
        custom_id="question",
        style=discord.TextStyle.paragraph,
        placeholder=texts.QUESTION_PLACEHOLDER,
        min_length=1,
        max_length=QUESTION_MAX,
    )

    def __init__(self, on_question: OnQuestion) -> None:
        super().__init__(title=texts.MODAL_TITLE, timeout=15 * 60)
        self._on_question = on_question

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await self._on_question(interaction, self.question.value.strip() or self.question.value)

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:
        text = unexpected_error_notice("the Ask about this… question", error)
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException:
            log.warning("could not report a failed question from user %s", interaction.user.id)


def register_context_menus(tree: app_commands.CommandTree, responder: Responder) -> None:
    async def answer(
        interaction: discord.Interaction, message: discord.Message, question: str, *, read_text: bool = False
    ) -> None:
        media = message_media(message, responder.images.hosts or MediaHosts())
        await responder.respond_to_interaction(
            interaction, question, media.sources, strict=False, read_text=read_text, notices=media.notices
        )

    async def describe(interaction: discord.Interaction, message: discord.Message) -> None:
        await answer(interaction, message, responder.prompt(interaction.guild_id, "describe"))

    async def read_text(interaction: discord.Interaction, message: discord.Message) -> None:
        await answer(interaction, message, responder.prompt(interaction.guild_id, "ocr"), read_text=True)

    async def ask(interaction: discord.Interaction, message: discord.Message) -> None:
        media = message_media(message, responder.images.hosts or MediaHosts())
        allowed = responder.allowed(interaction.user, interaction.channel, interaction.guild)
        if responder.shutting_down or not allowed or not media.sources:
            # The refusal the answer would give, now rather than after the question is typed.
            await answer(interaction, message, "")
            return

        async def on_question(submitted: discord.Interaction, question: str) -> None:
            log.info("user %s asked about message %s", submitted.user.id, message.id)
            await answer(submitted, message, question)

        await interaction.response.send_modal(QuestionModal(on_question))

    for name, callback in ((DESCRIBE, describe), (READ_TEXT, read_text), (ASK, ask)):
        tree.add_command(app_commands.ContextMenu(name=name, callback=callback))
