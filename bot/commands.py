"""The slash commands: /ask, /ocr and /compare, the cookbook's three uses."""

from __future__ import annotations

import discord
from discord import app_commands

from .responder import Responder


def register_commands(tree: app_commands.CommandTree, responder: Responder) -> None:
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
        await responder.respond_to_interaction(interaction, question, images)

    @tree.command(name="ocr", description="Read all the text in an image or a PDF")
    @app_commands.describe(image="The image or PDF to read")
    async def ocr(interaction: discord.Interaction, image: discord.Attachment) -> None:
        await responder.respond_to_interaction(
            interaction, responder.prompt(interaction.guild_id, "ocr"), [image], read_text=True
        )

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
        await responder.respond_to_interaction(
            interaction, question or responder.prompt(interaction.guild_id, "compare"), [image1, image2]
        )
