"""The slash commands: /ask, /ocr and /compare, the cookbook's three uses."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands

if TYPE_CHECKING:
    from .client import SeeBot


def register_commands(tree: app_commands.CommandTree, bot: SeeBot) -> None:
    @tree.command(name="ask", description="Ask a question about one to three images")
    @app_commands.describe(
        image="The image to ask about",
        question="What you want to know",
        image2="A second image (optional)",
        image3="A third image (optional)",
    )
    async def ask(
        interaction: discord.Interaction,
        image: discord.Attachment,
        question: app_commands.Range[str, 1, 2000],
        image2: discord.Attachment | None = None,
        image3: discord.Attachment | None = None,
    ) -> None:
        images = [a for a in (image, image2, image3) if a is not None]
        await bot.answer_interaction(interaction, question, images)

    @tree.command(name="ocr", description="Read all the text in an image")
    @app_commands.describe(image="The image to read")
    async def ocr(interaction: discord.Interaction, image: discord.Attachment) -> None:
        prompt = bot.server_settings.prompt(interaction.guild_id, "ocr")
        await bot.answer_interaction(interaction, prompt, [image])

    @tree.command(name="compare", description="Compare two images")
    @app_commands.describe(
        image1="The first image",
        image2="The second image",
        question="What to compare (default: what is different)",
    )
    async def compare(
        interaction: discord.Interaction,
        image1: discord.Attachment,
        image2: discord.Attachment,
        question: app_commands.Range[str, 1, 2000] | None = None,
    ) -> None:
        prompt = question or bot.server_settings.prompt(interaction.guild_id, "compare")
        await bot.answer_interaction(interaction, prompt, [image1, image2])
