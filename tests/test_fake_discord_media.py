"""The fake Discord's message commands, modals, unfurls, stickers and media hosts, against the
real discord.py client in process: what discord.py makes of the payloads is what the bot sees."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import discord
import pytest
import pytest_asyncio
from discord import app_commands

from bot.media_urls import MediaHosts
from tests.fake_discord import FakeDiscord
from tests.test_fake_discord import TIMEOUT, connect, png

pytestmark = pytest.mark.asyncio


class MenuClient(discord.Client):
    """A message command that shows a modal, and a record of what arrived."""

    def __init__(self) -> None:
        intents = discord.Intents.default()
        intents.message_content = True
        super().__init__(intents=intents, guild_ready_timeout=0.05)
        self.tree = app_commands.CommandTree(self)
        self.targets: asyncio.Queue[discord.Message] = asyncio.Queue()
        self.answers: asyncio.Queue[str] = asyncio.Queue()
        self.edits: asyncio.Queue[discord.RawMessageUpdateEvent] = asyncio.Queue()

        class Question(discord.ui.Modal, title="Ask"):
            question: discord.ui.TextInput[Question] = discord.ui.TextInput(
                label="Question", custom_id="question", min_length=1, max_length=10
            )

            async def on_submit(inner, interaction: discord.Interaction) -> None:
                await interaction.response.send_message(f"got {inner.question.value}")
                await self.answers.put(inner.question.value)

        async def ask(interaction: discord.Interaction, message: discord.Message) -> None:
            await self.targets.put(message)
            await interaction.response.send_modal(Question())

        self.tree.add_command(app_commands.ContextMenu(name="Ask about this…", callback=ask))

    async def setup_hook(self) -> None:
        await self.tree.sync()

    async def on_raw_message_edit(self, event: discord.RawMessageUpdateEvent) -> None:
        await self.edits.put(event)


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(heartbeat_interval_ms=300) as server:
        yield server


@pytest_asyncio.fixture
async def client(fake: FakeDiscord) -> AsyncIterator[MenuClient]:
    base, gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    bot = MenuClient()
    task = await connect(fake, bot)  # type: ignore[arg-type]
    try:
        yield bot
    finally:
        await bot.close()
        await asyncio.wait_for(task, TIMEOUT)
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = base, gateway


async def test_a_message_command_and_its_modal(fake: FakeDiscord, client: MenuClient) -> None:
    await fake.wait_until_ready(commands=["Ask about this…"])
    (command,) = fake.commands[None]
    assert (command["type"], command["description"], command["options"]) == (3, "", [])
    wave = fake.add_sticker("Wave", png(), format_type=4)
    embed = fake.proxied_image("https://example.com/a.png", png(6, 5))
    target = await fake.send_message(fake.alice, fake.general_id, "look", embeds=[embed], stickers=[wave])
    shown = await fake.invoke_message_command(fake.bob, fake.general_id, "Ask about this…", int(target["id"]))
    message = await asyncio.wait_for(client.targets.get(), TIMEOUT)
    assert message.id == int(target["id"]) and message.content == "look"
    assert message.embeds[0].thumbnail.width == 6 and message.embeds[0].thumbnail.proxy_url
    assert message.stickers[0].format is discord.StickerFormatType.gif
    await fake.wait_for(lambda: shown.modal, TIMEOUT, description="the modal")
    with pytest.raises(ValueError):
        await fake.submit_modal(shown, {"question": ""})  # Discord's client enforces min_length
    for _ in range(5):  # discord.py listens for the submit once its callback has returned
        submitted = await fake.submit_modal(shown, {"question": "why?"})
        try:
            assert await asyncio.wait_for(client.answers.get(), 1) == "why?"
            break
        except asyncio.TimeoutError:
            continue
    await fake.wait_for(lambda: submitted.responded, TIMEOUT, description="the modal's answer")
    assert fake.message(submitted.original_message_id)["content"] == "got why?"  # type: ignore[arg-type]


async def test_an_unfurl_is_a_message_update_and_the_media_hosts_are_recorded(
    fake: FakeDiscord, client: MenuClient
) -> None:
    sent = await fake.send_message(fake.alice, fake.general_id, "https://example.com/a.png")
    await fake.unfurl(int(sent["id"]), [fake.proxied_image("https://example.com/a.png", png())])
    event = await asyncio.wait_for(client.edits.get(), TIMEOUT)
    assert event.message_id == int(sent["id"]) and event.data["embeds"][0]["type"] == "image"
    proxy_url = event.data["embeds"][0]["thumbnail"]["proxy_url"]
    sticker = fake.add_sticker("Wave", png(), format_type=1)
    item = discord.StickerItem(data=sticker, state=client._connection)  # type: ignore[arg-type]
    hosts = MediaHosts(fake.api_base_url)
    async with aiohttp.ClientSession() as http:
        for url in (proxy_url, hosts.built(item.url), fake.elsewhere("x.png", png())):
            async with http.get(url) as response:
                assert (response.status, await response.read()) == (200, png())
    assert [r.path.split("/")[1] for r in fake.http_requests if not r.path.startswith("/api/")][-3:] == [
        "external",
        "stickers",
        "elsewhere",
    ]
    assert len(fake.requests_for("/elsewhere/", host=fake.other_host_url.removeprefix("http://"))) == 1
