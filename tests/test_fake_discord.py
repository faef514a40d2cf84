"""The fake Discord against the real discord.py client, in process.

If these pass, end-to-end failures of the bot are the bot's: the fake speaks enough
of Discord (REST, gateway, webhooks, CDN) for an unmodified discord.py 2.x.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Literal

import discord
import pytest
import pytest_asyncio
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket
from PIL import Image

from tests.fake_discord import (
    MANAGE_GUILD,
    MANAGE_MESSAGES,
    MEMBER_PERMISSIONS,
    FakeDiscord,
    FakeDiscordTimeout,
    allows_no_pings,
)

pytestmark = pytest.mark.asyncio

TIMEOUT = 5.0


def png(width: int = 4, height: int = 3) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


class SmokeClient(discord.Client):
    """A minimal bot: queues what it receives, answers /ocr by deferring and following up."""

    def __init__(self, *, message_content: bool = True) -> None:
        intents = discord.Intents.default()
        intents.message_content = message_content
        # guild_ready_timeout: discord.py otherwise waits 2 s after the last GUILD_CREATE before on_ready.
        super().__init__(
            intents=intents, allowed_mentions=discord.AllowedMentions.none(), guild_ready_timeout=0.05
        )
        self.tree = app_commands.CommandTree(self)
        self.messages: asyncio.Queue[discord.Message] = asyncio.Queue()
        self.command_errors: list[BaseException] = []

        @self.tree.command(name="ocr", description="Read the text in an image")
        async def ocr(
            interaction: discord.Interaction, image: discord.Attachment, question: str = ""
        ) -> None:
            try:
                await interaction.response.defer()
                data = await image.read()
                message = await interaction.followup.send(f"working on {image.filename}", wait=True)
                await message.edit(content=f"{len(data)} bytes, {image.width}x{image.height}, q={question}")
            except BaseException as exc:  # surfaced by the test, not lost in a log
                self.command_errors.append(exc)
                raise

    async def on_message(self, message: discord.Message) -> None:
        await self.messages.put(message)

    async def next_message(self, *, from_bot: bool = False) -> discord.Message:
        """The next message received, skipping the client's own unless asked for."""
        while True:
            message = await asyncio.wait_for(self.messages.get(), TIMEOUT)
            if (message.author == self.user) == from_bot:
                return message


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(heartbeat_interval_ms=300) as server:
        yield server


async def connect(fake: FakeDiscord, client: SmokeClient) -> asyncio.Task[None]:
    """Log in and connect exactly as the bot does with DISCORD_API_BASE_URL set."""
    discord.http.Route.BASE = fake.api_base_url
    await client.login(fake.token)
    _shards, url, _limits = await client.http.get_bot_gateway()
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(url)
    task = asyncio.create_task(client.connect(reconnect=True))
    await asyncio.wait_for(client.wait_until_ready(), TIMEOUT)
    return task


@pytest_asyncio.fixture
async def client(fake: FakeDiscord) -> AsyncIterator[SmokeClient]:
    base, gateway = discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    bot = SmokeClient()
    task = await connect(fake, bot)
    try:
        yield bot
    finally:
        await bot.close()
        await asyncio.wait_for(task, TIMEOUT)
        discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = base, gateway


async def test_ready_sees_guild_and_channel(fake: FakeDiscord, client: SmokeClient) -> None:
    await fake.wait_for_client_connected()
    guild = client.get_guild(fake.guild_id)
    assert guild is not None and guild.name == "Fake Guild"
    channel = guild.get_channel(fake.general_id)
    assert isinstance(channel, discord.TextChannel) and channel.name == "general"
    assert client.user is not None and client.user.id == int(fake.bot_user["id"]) and client.user.bot
    assert guild.me is not None and channel.permissions_for(guild.me).create_public_threads
    assert fake.identifies[0]["intents"] & discord.Intents(message_content=True).value
    assert fake.identifies[0]["token"] == fake.token
    # discord.py asks for zstd-stream when it can import a zstd decoder, else zlib-stream.
    assert fake.gateway_connects[0]["compress"] in ("zlib-stream", "zstd-stream")
    assert (fake.gateway_connects[0]["v"], fake.gateway_connects[0]["encoding"]) == ("10", "json")


async def test_mention_attachment_thread_and_history(fake: FakeDiscord, client: SmokeClient) -> None:
    image = png(4, 3)
    sent = await fake.send_message(
        "alice",
        fake.general_id,
        "what is this?",
        attachments=[("cat.png", image, "image/png")],
        mention_bot=True,
    )
    message = await client.next_message()
    assert message.id == int(sent["id"])
    assert client.user in message.mentions
    assert message.content == f"<@{client.user.id}> what is this?"
    assert isinstance(message.author, discord.Member) and message.author.name == "alice"
    [attachment] = message.attachments
    assert (attachment.filename, attachment.content_type, attachment.size) == (
        "cat.png",
        "image/png",
        len(image),
    )
    assert (attachment.width, attachment.height) == (4, 3)
    assert await attachment.read() == image

    thread = await message.create_thread(name="cat question")
    assert thread.id == message.id and fake.threads[thread.id]["parent_id"] == str(fake.general_id)
    await fake.wait_for(
        lambda: client.get_channel(thread.id) is not None, description="THREAD_CREATE in cache"
    )
    reply = await thread.send("a red square", file=discord.File(io.BytesIO(image), "answer.png"))
    echoed = await client.next_message(from_bot=True)  # Discord echoes the bot's own messages
    assert echoed.id == reply.id and isinstance(echoed.channel, discord.Thread)

    [stored] = fake.bot_messages_in(thread.id)
    assert stored["content"] == "a red square" and stored["attachments"][0]["content_type"] == "image/png"
    assert fake.message_writes[-1].allowed_mentions == {"parse": []}

    history = [m async for m in thread.history(oldest_first=True)]
    assert [m.type for m in history] == [
        discord.MessageType.thread_starter_message,
        discord.MessageType.default,
    ]
    assert history[0].reference is not None and history[0].reference.message_id == message.id
    assert history[1].content == "a red square"
    starter = await message.channel.fetch_message(thread.id)
    assert starter.id == message.id and starter.thread is not None and starter.thread.id == thread.id

    # A follow-up from the user inside the thread, as a reply to the bot.
    await fake.send_message("alice", thread.id, "and now?", reply_to=reply.id)
    followup = await client.next_message()
    assert followup.channel.id == thread.id and isinstance(followup.channel, discord.Thread)
    assert followup.reference is not None and followup.reference.message_id == reply.id
    assert isinstance(followup.reference.resolved, discord.Message)
    assert followup.reference.resolved.content == "a red square"
    assert client.user in followup.mentions  # a reply pings the replied-to author by default

    answer = await followup.reply("it is red")
    stored_answer = fake.message(answer.id)
    assert stored_answer["type"] == 19 and stored_answer["mentions"] == []  # AllowedMentions.none(): no ping

    await reply.edit(content="a red square, 4x3")
    assert [e.content for e in fake.edits_of(reply.id)] == ["a red square, 4x3"]


async def test_dm_both_ways(fake: FakeDiscord, client: SmokeClient) -> None:
    dm_id = await fake.open_dm("bob")
    await fake.send_message("bob", dm_id, "hi there")
    message = await client.next_message()
    assert message.guild is None and isinstance(message.channel, discord.DMChannel)
    assert message.content == "hi there"  # DMs carry content even without mentions
    await message.channel.send("hello bob")
    assert [m["content"] for m in fake.bot_messages_in(dm_id)] == ["hello bob"]

    user = await client.fetch_user(int(fake.alice["id"]))
    dm = await user.create_dm()
    await dm.send("hello alice")
    assert fake.bot_messages_in(dm.id)[0]["content"] == "hello alice"
    assert dm.id == await fake.open_dm("alice")


async def test_heartbeats_arrive_on_time(fake: FakeDiscord, client: SmokeClient) -> None:
    beats = await fake.wait_for(lambda: fake.heartbeat_times[:3] if len(fake.heartbeat_times) >= 3 else None)
    # The first beat goes out at HELLO; the next ones every 300 ms.
    assert 0.15 < beats[2] - beats[1] < 2.0  # generous: CI machines are shared
    assert client.latency < 2.0


async def test_slash_command_defer_followup_edit(fake: FakeDiscord, client: SmokeClient) -> None:
    await client.tree.sync()
    await fake.wait_until_ready(commands=["ocr"])
    [command] = fake.commands[None]
    assert [o["type"] for o in command["options"]] == [11, 3]

    image = png(6, 5)
    record = await fake.invoke_command(
        "alice", fake.general_id, "ocr", {"question": "read it"}, {"image": ("scan.png", image, "image/png")}
    )
    await fake.wait_for(
        lambda: fake.edits_of(record.original_message_id or 0), description="the follow-up edit"
    )
    assert not client.command_errors
    assert record.response_type == 5  # deferred
    # The first follow-up after deferring fills the "thinking..." message itself, as on Discord.
    final = fake.message(record.original_message_id)
    assert final["content"] == f"{len(image)} bytes, 6x5, q=read it"
    assert final["webhook_id"] == str(fake.application_id) and final["flags"] == 0
    assert [w.kind for w in fake.message_writes] == ["followup", "edit"]
    assert all(
        w.allowed_mentions == {"parse": []} and allows_no_pings(w.allowed_mentions)
        for w in fake.message_writes
    )
    assert fake.requests_to("POST", r"/interactions/\d+/[^/]+/callback")[0].query == {"with_response": "1"}

    # The original response again, answered without deferring this time.
    @client.tree.command(name="ping", description="pong")
    async def ping(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("pong")
        await interaction.edit_original_response(content="pong!")

    await client.tree.sync()
    record = await fake.invoke_command("bob", fake.general_id, "ping")
    await fake.wait_for(lambda: fake.edits_of(record.original_message_id or 0))
    assert fake.message(record.original_message_id)["content"] == "pong!"
    assert record.response_type == 4


async def test_content_is_withheld_without_the_intent(fake: FakeDiscord) -> None:
    base, gateway = discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    client = SmokeClient(message_content=False)
    task = await connect(fake, client)
    try:
        await fake.send_message(
            "bob", fake.general_id, "chit chat", attachments=[("a.png", png(), "image/png")]
        )
        assert (await client.next_message()).content == ""
        await fake.send_message("bob", fake.general_id, "for you", mention_bot=True)
        mentioned = await client.next_message()
        assert mentioned.content.endswith("for you")
    finally:
        await client.close()
        await asyncio.wait_for(task, TIMEOUT)
        discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = base, gateway


async def test_reconnect_resumes_and_replays(fake: FakeDiscord, client: SmokeClient) -> None:
    await fake.request_reconnect()
    await fake.send_message("alice", fake.general_id, "while you were away", mention_bot=True)
    await fake.wait_for(lambda: fake.resumes, description="a RESUME")
    message = await client.next_message()
    assert message.content.endswith("while you were away")
    assert len(fake.identifies) == 1


async def test_discord_rules_and_unknown_routes(fake: FakeDiscord, client: SmokeClient) -> None:
    channel = client.get_channel(fake.general_id)
    assert isinstance(channel, discord.TextChannel)
    with pytest.raises(discord.HTTPException) as too_long:
        await channel.send("x" * 2001)
    assert too_long.value.code == 50035
    with pytest.raises(discord.HTTPException) as empty:
        await channel.send("")
    assert empty.value.code == 50006
    sent = await channel.send("ok")
    with pytest.raises(discord.HTTPException):
        await sent.create_thread(name="n" * 101)
    await sent.create_thread(name="fine")
    with pytest.raises(discord.HTTPException) as twice:
        await sent.create_thread(name="again")
    assert twice.value.code == 160004
    with pytest.raises(discord.NotFound):
        await client.http.request(discord.http.Route("GET", "/not/faked"))
    assert fake.unknown_routes == ["GET /api/v10/not/faked"]

    async with channel.typing():
        pass
    assert fake.typing_events and fake.typing_events[0].channel_id == fake.general_id

    with pytest.raises(FakeDiscordTimeout, match="waiting for: nothing"):
        await fake.wait_for(lambda: False, timeout=0.05, description="nothing")


class CancelView(discord.ui.View):
    """A "Cancel" button only the requester or a member with Manage Messages may press."""

    def __init__(self, requester_id: int) -> None:
        super().__init__(timeout=None)
        self.requester_id = requester_id
        self.presses: list[tuple[int, bool]] = []
        self.errors: list[BaseException] = []
        self.add_item(discord.ui.Button(label="Done", custom_id="done", disabled=True))

    @discord.ui.button(label="Cancel", style=discord.ButtonStyle.danger, custom_id="cancel")
    async def cancel(self, interaction: discord.Interaction, button: discord.ui.Button[CancelView]) -> None:
        self.presses.append((interaction.user.id, interaction.permissions.manage_messages))
        if interaction.user.id == self.requester_id or interaction.permissions.manage_messages:
            await interaction.response.edit_message(content="cancelled", view=None)
        else:
            await interaction.response.send_message("only the requester can cancel", ephemeral=True)

    @discord.ui.button(label="Later", custom_id="later")
    async def later(self, interaction: discord.Interaction, button: discord.ui.Button[CancelView]) -> None:
        await interaction.response.defer()  # type 6: @original is this message
        await interaction.edit_original_response(content="postponed")
        await interaction.followup.send("see you later", ephemeral=True)

    async def on_error(
        self, interaction: discord.Interaction, error: Exception, item: discord.ui.Item[CancelView]
    ) -> None:
        self.errors.append(error)


async def test_buttons_on_a_view(fake: FakeDiscord, client: SmokeClient) -> None:
    channel = client.get_channel(fake.general_id)
    assert isinstance(channel, discord.TextChannel)
    view = CancelView(requester_id=int(fake.user("alice")["id"]))
    sent = await channel.send("working on it", view=view)
    stored = fake.message(sent.id)
    assert [[b["custom_id"] for b in row["components"]] for row in stored["components"]] == [
        ["cancel", "later", "done"]
    ]
    cancel = next(b for b in fake.buttons_on(sent.id) if b["custom_id"] == "cancel")
    assert cancel == {"type": 2, "style": 4, "label": "Cancel", "custom_id": "cancel", "disabled": False}
    with pytest.raises(LookupError, match="no button with custom_id 'nope'"):
        await fake.click_button("bob", sent.id, "nope")
    with pytest.raises(ValueError, match="disabled"):
        await fake.click_button("bob", sent.id, "done")

    # Bob is neither the requester nor a moderator: an ephemeral refusal, the message stays.
    refused = await fake.click_button("bob", sent.id, "cancel")
    assert refused.payload["member"]["permissions"] == str(MEMBER_PERMISSIONS)
    await fake.wait_for(lambda: refused.responded, description="the refusal")
    assert refused.response_type == 4 and refused.original_message_id is not None
    reply = fake.message(refused.original_message_id)
    assert reply["content"] == "only the requester can cancel" and reply["flags"] == 64
    assert reply["type"] == 19 and reply["message_reference"]["message_id"] == str(sent.id)
    assert reply["interaction_metadata"]["interacted_message_id"] == str(sent.id)
    assert fake.message(sent.id)["components"] == stored["components"]

    # Type 6, then @original edits the button's message; the follow-up is a new message.
    later = await fake.click_button("bob", sent.id, "later")
    await fake.wait_for(lambda: later.followup_message_ids, description="the follow-up")
    assert later.response_type == 6 and later.original_message_id == sent.id
    assert fake.message(sent.id)["content"] == "postponed"
    assert fake.message(later.followup_message_ids[0])["flags"] == 64

    # With Manage Messages the press is honoured: type 7 edits content and removes the buttons.
    honoured = await fake.click_button(
        "bob", sent.id, "cancel", permissions=MEMBER_PERMISSIONS | MANAGE_MESSAGES
    )
    await fake.wait_for(lambda: honoured.responded, description="the cancellation")
    assert honoured.response_type == 7 and honoured.original_message_id == sent.id
    assert fake.message(sent.id)["content"] == "cancelled"
    assert fake.message(sent.id)["components"] == [] and fake.buttons_on(sent.id) == []
    assert fake.message_writes[-1].kind == "interaction_update"
    assert fake.edits_of(sent.id)[-1].message["components"] == []
    assert view.presses == [(int(fake.user("bob")["id"]), False), (int(fake.user("bob")["id"]), True)]
    assert not view.errors
    with pytest.raises(LookupError):
        await fake.click_button("alice", sent.id, "cancel")


async def test_command_groups_channel_options_and_default_member_permissions(
    fake: FakeDiscord, client: SmokeClient
) -> None:
    seen: list[tuple[str, int, bool, bool]] = []
    group = app_commands.Group(
        name="admin",
        description="d",
        default_permissions=discord.Permissions(manage_guild=True),
        guild_only=True,
    )
    sub = app_commands.Group(name="channels", description="d", parent=group)

    @sub.command(name="add", description="d")
    async def add(interaction: discord.Interaction, channel: discord.TextChannel) -> None:
        perms = interaction.permissions
        seen.append(("add", channel.id, perms.manage_guild, perms.manage_messages))
        await interaction.response.send_message(f"added {channel.name}", ephemeral=True)

    @group.command(name="pick", description="d")
    async def pick(
        interaction: discord.Interaction,
        use: Literal["a", "b"],
        text: app_commands.Range[str, 1, 5] | None = None,
    ) -> None:
        seen.append((f"pick {use} {text}", 0, interaction.permissions.manage_guild, False))
        await interaction.response.send_message("ok", ephemeral=True)

    client.tree.add_command(group)
    await client.tree.sync()
    [stored] = [c for c in fake.commands[None] if c["name"] == "admin"]
    assert stored["default_member_permissions"] == str(MANAGE_GUILD) and stored["dm_permission"] is False

    channel = int((await fake.add_text_channel("extra"))["id"])
    record = await fake.invoke_command("alice", fake.general_id, "admin channels add", {"channel": channel})
    await fake.wait_for(lambda: record.responded)
    assert record.payload["data"]["options"][0]["options"][0]["options"][0] == {
        "name": "channel",
        "type": 7,
        "value": str(channel),
    }
    assert fake.message(record.original_message_id or 0)["flags"] & 64
    assert seen == [("add", channel, True, True)]

    # bob is a plain member: Discord does not offer him the group, unless the server says so.
    with pytest.raises(PermissionError):
        await fake.invoke_command("bob", fake.general_id, "admin pick", {"use": "a"})
    fake.allow_command("admin", "bob")
    record = await fake.invoke_command("bob", fake.general_id, "admin pick", {"use": "b", "text": "hi"})
    await fake.wait_for(lambda: record.responded)
    assert seen[-1] == ("pick b hi", 0, False, False)
    assert int(record.payload["member"]["permissions"]) == MEMBER_PERMISSIONS

    moderator = await fake.add_role("Moderator", MEMBER_PERMISSIONS | MANAGE_MESSAGES | MANAGE_GUILD)
    carol = await fake.add_user("carol", roles=[moderator])
    record = await fake.invoke_command(carol, fake.general_id, "admin channels add", {"channel": channel})
    await fake.wait_for(lambda: record.responded)
    assert seen[-1] == ("add", channel, True, True)

    with pytest.raises(ValueError, match="one of"):
        await fake.invoke_command("alice", fake.general_id, "admin pick", {"use": "c"})
    with pytest.raises(ValueError, match="length"):
        await fake.invoke_command("alice", fake.general_id, "admin pick", {"use": "a", "text": "too long"})
    with pytest.raises(ValueError, match="a group"):
        await fake.invoke_command("alice", fake.general_id, "admin channels")
    with pytest.raises(LookupError, match="not available in DMs"):
        await fake.invoke_command("bob", await fake.open_dm("bob"), "admin pick", {"use": "a"})
