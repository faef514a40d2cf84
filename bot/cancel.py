"""The Cancel button on an answer: only the person who asked, or a moderator, may press it."""

from __future__ import annotations

import logging
from collections.abc import Callable

import discord

from .texts import ONLY_REQUESTER

log = logging.getLogger(__name__)



class CancelView(discord.ui.View):
    """One button; pressing it calls `on_cancel` with who pressed it, once."""

    def __init__(self, requester_id: int, on_cancel: Callable[[discord.abc.User], None]) -> None:
        super().__init__(timeout=None)  # lives as long as the answer; removed when it ends
        self.requester_id = requester_id
        self._on_cancel = on_cancel

    def may_cancel(self, interaction: discord.Interaction) -> bool:
        if interaction.user.id == self.requester_id:
            return True
        return interaction.guild is not None and interaction.permissions.manage_messages

    @discord.ui.button(label="Cancel", style=discord.ButtonStyle.secondary, emoji="✖️")
    async def cancel(self, interaction: discord.Interaction, button: discord.ui.Button[CancelView]) -> None:
        if not self.may_cancel(interaction):
            log.info("user %s may not cancel an answer for %s", interaction.user.id, self.requester_id)
            await interaction.response.send_message(ONLY_REQUESTER, ephemeral=True)
            return
        log.info("user %s cancelled an answer for %s", interaction.user.id, self.requester_id)
        self.stop()
        self._on_cancel(interaction.user)  # first: the answer stops even if Discord hiccups
        try:
            await interaction.response.edit_message(view=None)
        except discord.HTTPException as error:
            log.info("could not take the Cancel button off: %s", error)
