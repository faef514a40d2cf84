"""`/seebot`: a server's admins change where the bot answers, its prompts and a daily limit.

Discord shows the group to members with Manage Server (`default_permissions`); server owners
can widen that in Server Settings > Integrations, so the bot checks the permission again on
every call. Every reply is ephemeral (only the admin sees it). A change applies to the next
question; one that could not be saved says so and changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Literal

import discord
from discord import app_commands

from .server_settings import MAX_PROMPT_LENGTH, InvalidSetting, NotSaved, PromptUse, ServerSettings
from .settings import BotSettings

log = logging.getLogger(__name__)

NOT_ADMIN = "⚠️ Only members with the Manage Server permission can change SeeBot's settings."
SERVERS_ONLY = "⚠️ These settings belong to a server: use `/seebot` there."
# Three prompts of 1,000 characters, or a hundred channels, would not fit in one message.
SHOWN_PROMPT_LENGTH = 300
SHOWN_CHANNELS = 20
PROMPT_NAMES = {
    "ocr": "OCR prompt (/ocr)",
    "describe": "Describe prompt",
    "compare": "Compare prompt (/compare)",
}


def _shorten(text: str) -> str:
    return text if len(text) <= SHOWN_PROMPT_LENGTH else text[: SHOWN_PROMPT_LENGTH - 1] + "…"


def not_saved(error: NotSaved) -> str:
    return f"⚠️ Not saved, nothing changed: {error}. Ask the person who runs the bot to check its `DATA_DIR`."


class AdminCommands:
    """The handlers behind `/seebot`, handed the settings they read and change."""

    def __init__(self, server_settings: ServerSettings, defaults: BotSettings) -> None:
        self._servers = server_settings
        self._defaults = defaults

    async def _allowed(self, interaction: discord.Interaction) -> int | None:
        """The server's id if the caller may change its settings; else replies and returns None."""
        if interaction.guild_id is None:
            await interaction.response.send_message(SERVERS_ONLY, ephemeral=True)
            return None
        if not interaction.permissions.manage_guild:
            log.info("user %s may not use /seebot in server %s", interaction.user.id, interaction.guild_id)
            await interaction.response.send_message(NOT_ADMIN, ephemeral=True)
            return None
        return interaction.guild_id

    async def _change(
        self, interaction: discord.Interaction, what: str, change: Awaitable[None], done: str
    ) -> None:
        """Await the change; reply `done`, or why it was not made."""
        try:
            await change
        except InvalidSetting as error:
            await interaction.response.send_message(f"⚠️ {error}", ephemeral=True)
            return
        except NotSaved as error:
            await interaction.response.send_message(not_saved(error), ephemeral=True)
            return
        await self._done(interaction, what, done)

    async def _done(self, interaction: discord.Interaction, what: str, reply: str) -> None:
        log.info("user %s changed %s in server %s", interaction.user.id, what, interaction.guild_id)
        await interaction.response.send_message(reply, ephemeral=True)

    async def show(self, interaction: discord.Interaction) -> None:
        guild_id = await self._allowed(interaction)
        if guild_id is None:
            return
        await interaction.response.send_message(self.describe(guild_id), ephemeral=True)

    def describe(self, guild_id: int) -> str:
        """This server's effective settings, each with where it comes from."""
        channels = self._servers.channels(guild_id)
        if channels:
            listed = sorted(channels)[:SHOWN_CHANNELS]
            more = f" and {len(channels) - len(listed)} more" if len(channels) > len(listed) else ""
            where = ", ".join(f"<#{c}>" for c in listed) + more + " (server)"
        elif self._defaults.allowed_channel_ids:
            where = "the channels in ALLOWED_CHANNEL_IDS (default)"
        else:
            where = "every channel (default)"
        lines = ["**SeeBot's settings in this server**", f"Channels: {where}"]
        for use in ("ocr", "describe", "compare"):
            prompt = self._servers.sourced_prompt(guild_id, use)  # type: ignore[arg-type]
            lines.append(f"{PROMPT_NAMES[use]}: “{_shorten(str(prompt.value))}” ({prompt.source})")
        quota = self._servers.daily_quota(guild_id)
        limit = f"{quota.value} per person" if quota.value else "no limit"
        lines.append(f"Daily questions: {limit} ({quota.source}); moderators are not counted")
        if not self._servers.can_save:
            lines.append(f"⚠️ Changes cannot be saved right now: {self._servers.save_problem}.")
        return "\n".join(lines)

    async def add_channel(self, interaction: discord.Interaction, channel: discord.TextChannel) -> None:
        guild_id = await self._allowed(interaction)
        if guild_id is None:
            return
        try:
            channels = await self._servers.add_channel(guild_id, channel.id)
        except NotSaved as error:
            await interaction.response.send_message(not_saved(error), ephemeral=True)
            return
        done = f"I'll answer in {channel.mention}" + (
            "." if len(channels) == 1 else f" and {len(channels) - 1} more channels."
        )
        if self._defaults.allowed_channel_ids and channel.id not in self._defaults.allowed_channel_ids:
            done += " Note: the bot's ALLOWED_CHANNEL_IDS does not include it, so I still won't answer there."
        await self._done(interaction, "channels", done)

    async def remove_channel(self, interaction: discord.Interaction, channel: discord.TextChannel) -> None:
        guild_id = await self._allowed(interaction)
        if guild_id is None:
            return
        listed = channel.id in self._servers.channels(guild_id)
        try:
            channels = await self._servers.remove_channel(guild_id, channel.id)
        except NotSaved as error:
            await interaction.response.send_message(not_saved(error), ephemeral=True)
            return
        if not listed:
            done = f"{channel.mention} was not in the list; nothing changed."
        elif channels:
            done = f"I won't answer in {channel.mention} any more."
        else:
            done = f"Removed {channel.mention}; the list is empty, so I answer in every channel again."
        await self._done(interaction, "channels", done)

    async def clear_channels(self, interaction: discord.Interaction) -> None:
        guild_id = await self._allowed(interaction)
        if guild_id is None:
            return
        done = "The channel list is empty: I answer in every channel the bot is allowed in."
        await self._change(interaction, "channels", self._servers.clear_channels(guild_id), done)

    async def set_prompt(self, interaction: discord.Interaction, use: PromptUse, text: str | None) -> None:
        guild_id = await self._allowed(interaction)
        if guild_id is None:
            return
        name = PROMPT_NAMES[use]
        done = f"{name} set. It applies to the next question." if text else f"{name} is back to the default."
        await self._change(
            interaction, f"the {use} prompt", self._servers.set_prompt(guild_id, use, text), done
        )

    async def set_quota(self, interaction: discord.Interaction, questions: int | None) -> None:
        guild_id = await self._allowed(interaction)
        if guild_id is None:
            return
        if questions is None:
            done = "The daily limit is back to the default."
        elif questions == 0:
            done = "No daily limit in this server."
        else:
            done = (
                f"Each person can ask {questions} questions a day here "
                "(UTC days; moderators are not counted)."
            )
        await self._change(
            interaction, "the daily limit", self._servers.set_daily_quota(guild_id, questions), done
        )


def register_admin_commands(
    tree: app_commands.CommandTree, server_settings: ServerSettings, defaults: BotSettings
) -> None:
    admin = AdminCommands(server_settings, defaults)
    seebot = app_commands.Group(
        name="seebot",
        description="SeeBot's settings in this server",
        default_permissions=discord.Permissions(manage_guild=True),
        guild_only=True,
    )
    channels = app_commands.Group(
        name="channels", description="Where SeeBot answers in this server", parent=seebot
    )

    @seebot.command(name="show", description="This server's settings and where each comes from")
    async def show(interaction: discord.Interaction) -> None:
        await admin.show(interaction)

    @channels.command(name="add", description="Answer in this channel (and its threads)")
    @app_commands.describe(channel="The channel to add")
    async def add(interaction: discord.Interaction, channel: discord.TextChannel) -> None:
        await admin.add_channel(interaction, channel)

    @channels.command(name="remove", description="Stop answering in this channel")
    @app_commands.describe(channel="The channel to remove")
    async def remove(interaction: discord.Interaction, channel: discord.TextChannel) -> None:
        await admin.remove_channel(interaction, channel)

    @channels.command(name="clear", description="Answer in every channel again")
    async def clear(interaction: discord.Interaction) -> None:
        await admin.clear_channels(interaction)

    @seebot.command(name="prompt", description="The prompt for one use in this server (no text: the default)")
    @app_commands.describe(use="Which prompt", text="The new prompt; leave it out to go back to the default")
    async def prompt(
        interaction: discord.Interaction,
        use: Literal["ocr", "describe", "compare"],
        text: app_commands.Range[str, 1, MAX_PROMPT_LENGTH] | None = None,
    ) -> None:
        await admin.set_prompt(interaction, use, text)

    @seebot.command(name="quota", description="Questions per person per day in this server (0: no limit)")
    @app_commands.describe(questions="Questions per person per UTC day; 0: no limit; leave out: the default")
    async def quota(
        interaction: discord.Interaction, questions: app_commands.Range[int, 0, 1_000_000] | None = None
    ) -> None:
        await admin.set_quota(interaction, questions)

    tree.add_command(seebot)
