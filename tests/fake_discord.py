"""A fake Discord (REST API, gateway websocket and attachment CDN) on 127.0.0.1.

End-to-end tests run the real, unmodified discord.py client against this server, so
the bot's whole Discord surface is exercised: login, gateway handshake and
heartbeats, message events, threads, DMs, slash commands and their webhook
follow-ups, attachment downloads. Nothing reaches the network.

The client is pointed here by two assignments, which the bot does itself when
``DISCORD_API_BASE_URL`` is set (and the smoke test does by hand)::

    discord.http.Route.BASE = fake.api_base_url        # REST, webhooks, interactions
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)

The fake is deliberately strict where real Discord is strict and where bots commonly
go wrong: it checks the bot token, rejects messages over 2000 characters and empty
messages, thread names over 100 characters, a second thread on one message, edits
of other users' messages, interaction callbacks later than three seconds and
double acknowledgements. It also withholds message content from a session that did
not ask for the MESSAGE_CONTENT intent, exactly as Discord does, so a missing
intent fails a test instead of production.

Tests never sleep: every request and every state change wakes
:meth:`FakeDiscord.wait_for`, which re-checks its predicate.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import random
import re
import secrets
import socket
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

from aiohttp import WSMsgType, web

__all__ = [
    "AttachmentSpec",
    "FakeDiscord",
    "FakeDiscordTimeout",
    "HttpRequest",
    "InteractionRecord",
    "MessageEdit",
    "MessageWrite",
    "RecordedRequest",
    "TypingEvent",
    "UploadedFile",
    "allows_no_pings",
]

log = logging.getLogger("fake_discord")

JSON = dict[str, Any]
#: A user as the simulation methods accept it: a username ("alice"), an id, or a user dict.
UserLike = str | int | Mapping[str, Any]
#: An attachment a simulated user uploads: (filename, bytes, content type).
AttachmentSpec = tuple[str, bytes, str]
T = TypeVar("T")

API_PREFIX = "/api/v10"
DISCORD_EPOCH_MS = 1_420_070_400_000
#: Every permission bit Discord defines today and some to spare; unknown bits are ignored by clients.
ALL_PERMISSIONS = str((1 << 53) - 1)
MAX_CONTENT = 2000
MAX_THREAD_NAME = 100
MAX_FILES = 10
UPLOAD_LIMIT = 10 * 1024 * 1024  # a guild without boosts

# Gateway opcodes.
OP_DISPATCH = 0
OP_HEARTBEAT = 1
OP_IDENTIFY = 2
OP_PRESENCE = 3
OP_RESUME = 6
OP_RECONNECT = 7
OP_REQUEST_MEMBERS = 8
OP_INVALID_SESSION = 9
OP_HELLO = 10
OP_HEARTBEAT_ACK = 11

# Gateway intents the fake honours when deciding who receives an event.
INTENT_GUILDS = 1 << 0
INTENT_GUILD_MEMBERS = 1 << 1
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_MESSAGE_CONTENT = 1 << 15

# Channel types.
GUILD_TEXT = 0
DM = 1
PUBLIC_THREAD = 11
PRIVATE_THREAD = 12
THREAD_TYPES = (10, PUBLIC_THREAD, PRIVATE_THREAD)

# Message types.
MSG_DEFAULT = 0
MSG_REPLY = 19
MSG_CHAT_INPUT_COMMAND = 20
MSG_THREAD_STARTER = 21

# Message flags.
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7
FLAG_COMPONENTS_V2 = 1 << 15

# Interaction callback types.
CB_PONG = 1
CB_CHANNEL_MESSAGE = 4
CB_DEFERRED_CHANNEL_MESSAGE = 5
CB_DEFERRED_UPDATE_MESSAGE = 6
CB_UPDATE_MESSAGE = 7

# Interaction types.
INTERACTION_MESSAGE_COMPONENT = 3
INTERACTION_MODAL_SUBMIT = 5

# Application command types, the modal callback, text inputs and sticker formats.
COMMAND_MESSAGE = 3
CB_MODAL = 9
COMPONENT_TEXT_INPUT = 4
COMPONENT_LABEL = 18
STICKER_EXTENSIONS = {1: "png", 2: "png", 3: "json", 4: "gif"}  # PNG, APNG, LOTTIE, GIF

# Message component types and button styles (legacy components: action rows of buttons and selects).
COMPONENT_ACTION_ROW = 1
COMPONENT_BUTTON = 2
SELECT_TYPES = (3, 5, 6, 7, 8)
BUTTON_LINK = 5
BUTTON_PREMIUM = 6
MAX_ROWS = 5
MAX_ROW_ITEMS = 5
MAX_CUSTOM_ID = 100
MAX_BUTTON_LABEL = 80

# Permission bits for member permissions in interactions.
ADMINISTRATOR = 1 << 3
MANAGE_GUILD = 1 << 5
MANAGE_MESSAGES = 1 << 13
#: What a plain member of a new guild may do (@everyone's defaults): read, write, react, attach,
#: embed, use external emojis and application commands, threads, voice; no Manage Messages.
MEMBER_PERMISSIONS = (
    (1 << 0)  # CREATE_INSTANT_INVITE
    | (1 << 6)  # ADD_REACTIONS
    | (1 << 9)  # STREAM
    | (1 << 10)  # VIEW_CHANNEL
    | (1 << 11)  # SEND_MESSAGES
    | (1 << 14)  # EMBED_LINKS
    | (1 << 15)  # ATTACH_FILES
    | (1 << 16)  # READ_MESSAGE_HISTORY
    | (1 << 18)  # USE_EXTERNAL_EMOJIS
    | (1 << 20)  # CONNECT
    | (1 << 21)  # SPEAK
    | (1 << 25)  # USE_VAD
    | (1 << 26)  # CHANGE_NICKNAME
    | (1 << 31)  # USE_APPLICATION_COMMANDS
    | (1 << 35)  # CREATE_PUBLIC_THREADS
    | (1 << 36)  # CREATE_PRIVATE_THREADS
    | (1 << 38)  # SEND_MESSAGES_IN_THREADS
)

# Application command option types, for inferring a type from a Python value.
OPT_SUB_COMMAND = 1
OPT_SUB_COMMAND_GROUP = 2
OPT_STRING = 3
OPT_INTEGER = 4
OPT_BOOLEAN = 5
OPT_USER = 6
OPT_CHANNEL = 7
OPT_NUMBER = 10
OPT_ATTACHMENT = 11

_MENTION_RE = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION_RE = re.compile(r"<@&(\d+)>")


def _json_response(body: Any, status: int = 200) -> web.Response:
    """A JSON response typed exactly ``application/json``.

    discord.py only decodes a body whose Content-Type equals ``application/json``;
    aiohttp's ``json_response`` appends ``; charset=utf-8`` and discord.py would hand
    the bot a string.
    """
    return web.Response(
        body=json.dumps(body).encode(), status=status, headers={"Content-Type": "application/json"}
    )


class FakeDiscordTimeout(AssertionError):
    """A wait on the fake ran out of time; the message says what was awaited and what happened.

    It is an ``AssertionError`` because in a test a wait that never comes true is a
    failed expectation, and pytest then shows the message as the failure.
    """


class ApiError(Exception):
    """Raised inside a route handler to answer with Discord's JSON error body."""

    def __init__(
        self, status: int, code: int, message: str, errors: JSON | None = None, extra: JSON | None = None
    ) -> None:
        super().__init__(f"{status} {code} {message}")
        self.status = status
        self.code = code
        self.message = message
        self.errors = errors
        self.extra = extra or {}

    def response(self) -> web.Response:
        body: JSON = {"message": self.message, "code": self.code, **self.extra}
        if self.errors is not None:
            body["errors"] = self.errors
        response = _json_response(body, status=self.status)
        if self.status == 429:
            # What Discord's edge adds; discord.py treats a 429 without `Via` as a Cloudflare ban.
            response.headers["Via"] = "1.1 google"
            response.headers["Retry-After"] = str(self.extra.get("retry_after", 1))
            response.headers["X-RateLimit-Scope"] = "user"
        return response


def _form_error(field: str, code: str, message: str) -> ApiError:
    """Discord's "Invalid Form Body" (50035) for one field, as discord.py would show it."""
    return ApiError(
        400, 50035, "Invalid Form Body", {field: {"_errors": [{"code": code, "message": message}]}}
    )


@dataclasses.dataclass
class UploadedFile:
    """One file part of a multipart request (``files[n]``)."""

    field: str
    filename: str
    content_type: str
    data: bytes


@dataclasses.dataclass
class RecordedRequest:
    """One REST request as the fake received it.

    ``path`` is relative to the API base (``/channels/1/messages``); ``json`` is the JSON
    body, or for multipart requests the parsed ``payload_json`` part.
    """

    method: str
    path: str
    query: dict[str, str]
    json: Any
    files: list[UploadedFile]
    at: float
    status: int | None = None

    def __str__(self) -> str:
        query = "?" + "&".join(f"{k}={v}" for k, v in self.query.items()) if self.query else ""
        return f"{self.method} {self.path}{query} -> {self.status}"


# Where the middleware leaves the parsed request for the handlers (a typed key where aiohttp has them).
_RECORD: Any = web.RequestKey("record", RecordedRequest) if hasattr(web, "RequestKey") else "record"


@dataclasses.dataclass
class HttpRequest:
    """Any HTTP request the fake received, on either port (API, CDN, media, "another host")."""

    method: str
    host: str  # "127.0.0.1:PORT"
    path: str
    at: float


@dataclasses.dataclass
class MessageWrite:
    """A message the bot created or edited, by any route, with the mentions it allowed.

    ``kind`` is ``create``, ``edit``, ``interaction_response``, ``interaction_update`` (callback
    type 7: a component interaction edits the component's message) or ``followup``.
    ``allowed_mentions`` is ``None`` when the request carried none, which on real
    Discord means every mention in the content pings.
    """

    kind: str
    channel_id: int
    message_id: int
    content: str | None
    allowed_mentions: Any
    at: float


@dataclasses.dataclass
class MessageEdit:
    """A message as it looked right after one edit; ``at`` is ``time.monotonic()``."""

    at: float
    message: JSON
    allowed_mentions: Any

    @property
    def content(self) -> str:
        return str(self.message.get("content", ""))


@dataclasses.dataclass
class TypingEvent:
    """A typing indicator the bot triggered."""

    channel_id: int
    user_id: int
    at: float


@dataclasses.dataclass
class InteractionRecord:
    """A slash-command invocation or button press and everything the bot did in answer to it.

    For a button press (:meth:`FakeDiscord.click_button`) ``command_name`` is ``""``,
    ``custom_id`` the button's and ``component_message_id`` the message it is on; after a
    callback of type 6 or 7 ``original_message_id`` (``@original``) is that message.
    """

    id: int
    token: str
    channel_id: int
    user_id: int
    command_name: str
    payload: JSON
    created_at: float
    response_type: int | None = None
    responded_at: float | None = None
    original_message_id: int | None = None
    followup_message_ids: list[int] = dataclasses.field(default_factory=list)
    loading: bool = False
    custom_id: str | None = None
    component_message_id: int | None = None
    modal: JSON | None = None  # the modal a callback of type 9 showed (its data)

    @property
    def responded(self) -> bool:
        return self.response_type is not None


def allows_no_pings(allowed_mentions: Any) -> bool:
    """Whether an ``allowed_mentions`` object (as sent) can ping nobody.

    ``AllowedMentions.none()`` serialises to ``{"parse": []}``; a reply adds
    ``"replied_user": false``. A missing object (``None``) lets Discord parse every
    mention, so it does not qualify.
    """
    if not isinstance(allowed_mentions, Mapping):
        return False
    return (
        not allowed_mentions.get("parse")
        and not allowed_mentions.get("users")
        and not allowed_mentions.get("roles")
        and not allowed_mentions.get("replied_user", False)
    )


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc).isoformat()


def _snowflake_time(snowflake: int) -> float:
    return ((snowflake >> 22) + DISCORD_EPOCH_MS) / 1000


def _image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height if Pillow can read the header; real Discord sets them for images only."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency of the bot
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return int(image.width), int(image.height)
    except Exception:
        return None


class _SnowflakeFactory:
    """Realistic, strictly increasing snowflakes: the creation time is readable from the id."""

    def __init__(self) -> None:
        self._last = 0

    def __call__(self) -> int:
        candidate = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        self._last = max(candidate, self._last + 1)
        return self._last


class _Compressor:
    """Per-connection transport compression, as the query string asked for.

    Discord compresses the whole connection as one stream: one context per
    connection, each payload flushed so that the client can decode it at once.
    discord.py asks for ``zstd-stream`` when it can import a zstd decoder, else
    ``zlib-stream``.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._compress: Callable[[bytes], bytes]
        if kind == "zlib-stream":
            zobj = zlib.compressobj()
            self._compress = lambda data: zobj.compress(data) + zobj.flush(zlib.Z_SYNC_FLUSH)
        elif kind == "zstd-stream":
            self._compress = self._zstd()
        else:
            raise ValueError(f"unsupported gateway compression {kind!r}")

    @staticmethod
    def _zstd() -> Callable[[bytes], bytes]:
        try:
            import zstandard  # type: ignore[import-not-found]
        except ImportError:
            pass
        else:
            zobj = zstandard.ZstdCompressor().compressobj()
            return lambda data: zobj.compress(data) + zobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        from compression import zstd  # type: ignore[import-not-found]  # Python 3.14+

        zc = zstd.ZstdCompressor()
        return lambda data: zc.compress(data, mode=zstd.ZstdCompressor.FLUSH_BLOCK)

    def __call__(self, data: bytes) -> bytes:
        return self._compress(data)


class _Connection:
    """One gateway websocket; serialises sends so the compression stream stays in order."""

    def __init__(self, ws: web.WebSocketResponse, compressor: _Compressor | None) -> None:
        self.ws = ws
        self.compressor = compressor
        self.lock = asyncio.Lock()
        self.session: _Session | None = None

    @property
    def alive(self) -> bool:
        return not self.ws.closed

    async def send(self, payload: JSON) -> bool:
        """Send one gateway payload; False when the socket is gone (the session may resume)."""
        data = json.dumps(payload, separators=(",", ":")).encode()
        async with self.lock:
            if self.ws.closed:
                return False
            try:
                if self.compressor is None:
                    await self.ws.send_str(data.decode())
                else:
                    await self.ws.send_bytes(self.compressor(data))
            except (ConnectionError, RuntimeError) as exc:
                log.debug("gateway send failed: %r", exc)
                return False
        return True


class _Session:
    """A gateway session: outlives its connection so that RESUME can replay missed events."""

    def __init__(self, session_id: str, intents: int, shard: list[int] | None) -> None:
        self.session_id = session_id
        self.intents = intents
        self.shard = shard
        self.seq = 0
        self.buffer: collections.deque[JSON] = collections.deque(maxlen=2000)
        self.connection: _Connection | None = None

    @property
    def live(self) -> bool:
        return self.connection is not None and self.connection.alive

    async def dispatch(self, event: str, data: JSON) -> None:
        self.seq += 1
        frame = {"op": OP_DISPATCH, "t": event, "s": self.seq, "d": data}
        self.buffer.append(frame)
        if self.connection is not None:
            await self.connection.send(frame)


class FakeDiscord:
    """A fake Discord server for one bot, with a small world of users, a guild and channels.

    Use as ``async with FakeDiscord(heartbeat_interval_ms=500) as fake:``. Point the
    bot at :attr:`api_base_url` with :attr:`token`; the gateway URL is what
    ``GET /gateway/bot`` returns (also :attr:`gateway_url`).

    World: application :attr:`application_id`; the bot :attr:`bot_user` ("SeeBot");
    guild :attr:`guild_id` with text channel "general" (:attr:`general_id`); members
    "alice" (the guild owner), "bob" and the bot "OtherBot". More with
    :meth:`add_user` and :meth:`add_text_channel`.
    """

    def __init__(
        self,
        *,
        heartbeat_interval_ms: int = 41250,
        token: str = "fake-bot-token",
        interaction_ack_timeout: float | None = 3.0,
        thread_starter_messages: bool = True,
        request_log_size: int = 10_000,
    ) -> None:
        """Build the world; nothing listens until :meth:`start`.

        ``interaction_ack_timeout``: seconds within which an interaction must be
        acknowledged, as on Discord (``None`` to disable, e.g. under a debugger).
        ``thread_starter_messages``: put a THREAD_STARTER_MESSAGE (type 21) at the top of
        a thread made from a message, as Discord does; bots reading thread history meet it.
        """
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.token = token
        self.interaction_ack_timeout = interaction_ack_timeout
        self.thread_starter_messages = thread_starter_messages

        self._snowflake = _SnowflakeFactory()
        self._changed_event = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._connections: set[_Connection] = set()
        self._sessions: dict[str, _Session] = {}

        # What tests read.
        self.requests: collections.deque[RecordedRequest] = collections.deque(maxlen=request_log_size)
        self._failures: list[list[Any]] = []  # see fail_next
        self._random_failures: tuple[float, tuple[int, ...], re.Pattern[str], float] | None = None
        self._random = random.Random(0)  # see fail_at_random
        self.injected_failures: list[tuple[str, int]] = []  # (path, status) of each random failure
        self.unknown_routes: list[str] = []
        self.heartbeat_times: list[float] = []
        self.gateway_connects: list[dict[str, str]] = []  # query of each websocket (v, encoding, compress)
        self.identifies: list[JSON] = []
        self.presence_updates: list[JSON] = []  # gateway op 3 payloads, in order
        self.resumes: list[JSON] = []
        self.typing_events: list[TypingEvent] = []
        self.message_writes: list[MessageWrite] = []
        self.interactions: dict[int, InteractionRecord] = {}
        self.commands: dict[int | None, list[JSON]] = {}  # None: global; else guild id
        # Server Settings > Integrations: (command name, user id) -> allowed, over default_member_permissions.
        self.command_overrides: dict[tuple[str, int], bool] = {}

        # The world.
        self.application_id = self._snowflake()
        self._users: dict[int, JSON] = {}
        self._members: dict[int, JSON] = {}
        self._roles: list[JSON] = []
        self._channels: dict[int, JSON] = {}  # guild text channels
        self._threads: dict[int, JSON] = {}
        self._dms: dict[int, JSON] = {}
        self._dm_by_user: dict[int, int] = {}
        self._messages: dict[int, JSON] = {}
        self._channel_messages: dict[int, list[int]] = {}
        self._edits: dict[int, list[MessageEdit]] = {}
        self._cdn_files: dict[int, tuple[bytes, str, str]] = {}  # attachment id -> data, type, filename
        self._cdn_overrides: dict[str, tuple[int, bytes | None, float]] = {}  # set_cdn_response
        self._media_files: dict[str, tuple[bytes, str]] = {}  # media host path -> data, type
        self.http_requests: collections.deque[HttpRequest] = collections.deque(maxlen=request_log_size)
        self._other_port: int | None = None
        self._interactions_by_token: dict[str, InteractionRecord] = {}

        self.bot_user = self._new_user("SeeBot", bot=True)
        self.alice = self._new_user("alice")
        self.bob = self._new_user("bob")
        self.other_bot = self._new_user("OtherBot", bot=True)

        self.guild_id = self._snowflake()
        self._guild_created = time.time()
        self._roles.append(
            {
                "id": str(self.guild_id),
                "name": "@everyone",
                "permissions": str(MEMBER_PERMISSIONS),
                "position": 0,
                "color": 0,
                "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
                "hoist": False,
                "managed": False,
                "mentionable": False,
                "icon": None,
                "unicode_emoji": None,
                "flags": 0,
            }
        )
        self.bot_role_id = self._snowflake()
        self._roles.append(
            {
                **self._roles[0],
                "id": str(self.bot_role_id),
                "name": "SeeBot",
                "permissions": ALL_PERMISSIONS,
                "position": 1,
                "managed": True,
                "tags": {"bot_id": self.bot_user["id"]},
            }
        )
        for user in (self.bot_user, self.alice, self.bob, self.other_bot):
            self._add_member(user, roles=[self.bot_role_id] if user is self.bot_user else [])
        self.general_id = int(self._new_text_channel("general")["id"])

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        self._add_routes(app)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=2.0)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # "a host a user chose"
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(("127.0.0.1", 0))
        self._other_port = other.getsockname()[1]
        await web.SockSite(self._runner, other).start()
        log.info("fake Discord listening on %s", self.base_url)

    async def close(self) -> None:
        """Close every gateway connection (1001, going away) and stop listening."""
        await asyncio.gather(
            *(
                conn.ws.close(code=1001, message=b"fake Discord shutting down")
                for conn in list(self._connections)
            ),
            return_exceptions=True,
        )
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeDiscord is not started")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base_url(self) -> str:
        """What ``DISCORD_API_BASE_URL`` / ``discord.http.Route.BASE`` should be."""
        return f"{self.base_url}{API_PREFIX}"

    @property
    def gateway_url(self) -> str:
        """The websocket URL ``GET /gateway/bot`` hands out; discord.py appends its query."""
        return f"ws://127.0.0.1:{self.port}/gateway"

    # ------------------------------------------------------------------ world building

    def _new_user(self, username: str, *, bot: bool = False) -> JSON:
        user: JSON = {
            "id": str(self._snowflake()),
            "username": username,
            "global_name": None if bot else username.capitalize(),
            "discriminator": "0",
            "avatar": None,
            "public_flags": 0,
            "flags": 0,
            "system": False,
        }
        if bot:
            user["bot"] = True
        self._users[int(user["id"])] = user
        return user

    def _add_member(self, user: Mapping[str, Any], *, roles: Sequence[int] = ()) -> None:
        self._members[int(user["id"])] = {
            "roles": [str(r) for r in roles],
            "nick": None,
            "avatar": None,
            "banner": None,
            "joined_at": _iso(time.time()),
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "pending": False,
            "flags": 0,
            "communication_disabled_until": None,
        }

    def _new_text_channel(self, name: str) -> JSON:
        channel: JSON = {
            "id": str(self._snowflake()),
            "type": GUILD_TEXT,
            "guild_id": str(self.guild_id),
            "name": name,
            "position": len(self._channels),
            "parent_id": None,
            "topic": None,
            "nsfw": False,
            "rate_limit_per_user": 0,
            "last_message_id": None,
            "default_auto_archive_duration": 1440,
            "permission_overwrites": [],
            "flags": 0,
        }
        self._channels[int(channel["id"])] = channel
        self._channel_messages[int(channel["id"])] = []
        return channel

    async def add_user(
        self, username: str, *, bot: bool = False, member: bool = True, roles: Sequence[int] = ()
    ) -> JSON:
        """Create a user (a guild member with ``roles`` unless ``member=False``) and announce the join."""
        user = self._new_user(username, bot=bot)
        if member:
            self._add_member(user, roles=roles)
            await self._dispatch_all(
                "GUILD_MEMBER_ADD",
                {**self._member_payload(int(user["id"])), "guild_id": str(self.guild_id)},
                intent=INTENT_GUILD_MEMBERS,
            )
        self._changed()
        return user

    async def add_role(self, name: str, permissions: int) -> int:
        """A guild role with these permission bits (e.g. a "Moderator" with Manage Messages),
        announced with GUILD_ROLE_CREATE; give it with ``add_user(..., roles=[id])``. Returns its id."""
        role_id = self._snowflake()
        self._roles.append(
            {
                **self._roles[0],
                "id": str(role_id),
                "name": name,
                "permissions": str(permissions),
                "position": len(self._roles),
            }
        )
        role = copy.deepcopy(self._roles[-1])
        await self._dispatch_all(
            "GUILD_ROLE_CREATE", {"guild_id": str(self.guild_id), "role": role}, intent=INTENT_GUILDS
        )
        self._changed()
        return role_id

    def member_permissions(self, user: UserLike) -> int:
        """A member's guild-wide permissions as Discord computes them (no channel overwrites here):
        the owner and administrators have all; else @everyone's and their roles' bits together."""
        user_id = int(self._resolve_user(user)["id"])
        if user_id == int(self.alice["id"]):
            return int(ALL_PERMISSIONS)
        roles = {str(self.guild_id), *self._members[user_id]["roles"]}
        bits = 0
        for role in self._roles:
            if role["id"] in roles:
                bits |= int(role["permissions"])
        return int(ALL_PERMISSIONS) if bits & ADMINISTRATOR else bits

    def allow_command(self, name: str, user: UserLike, allowed: bool = True) -> None:
        """What an admin does in Server Settings > Integrations: let ``user`` use (or not) the
        command ``name`` whatever its ``default_member_permissions`` say."""
        self.command_overrides[(name, int(self._resolve_user(user)["id"]))] = allowed

    async def add_text_channel(self, name: str) -> JSON:
        """Create a guild text channel and dispatch CHANNEL_CREATE."""
        channel = self._new_text_channel(name)
        await self._dispatch_all("CHANNEL_CREATE", copy.deepcopy(channel), intent=INTENT_GUILDS)
        self._changed()
        return copy.deepcopy(channel)

    async def open_dm(self, user: UserLike) -> int:
        """The id of the DM channel between ``user`` and the bot, creating it if needed."""
        return int(self._get_or_create_dm(int(self._resolve_user(user)["id"]))["id"])

    def _get_or_create_dm(self, user_id: int) -> JSON:
        existing = self._dm_by_user.get(user_id)
        if existing is not None:
            return self._dms[existing]
        channel: JSON = {
            "id": str(self._snowflake()),
            "type": DM,
            "last_message_id": None,
            "recipients": [copy.deepcopy(self._users[user_id])],
            "flags": 0,
        }
        self._dms[int(channel["id"])] = channel
        self._dm_by_user[user_id] = int(channel["id"])
        self._channel_messages[int(channel["id"])] = []
        self._changed()
        return channel

    def user(self, who: UserLike) -> JSON:
        """A copy of a user payload, looked up by username, id or user dict."""
        return copy.deepcopy(self._resolve_user(who))

    def _resolve_user(self, who: UserLike) -> JSON:
        if isinstance(who, Mapping):
            who = int(who["id"])
        if isinstance(who, int):
            if who in self._users:
                return self._users[who]
        else:
            for user in self._users.values():
                if user["username"] == who:
                    return user
        raise KeyError(f"no such user: {who!r}")

    # ------------------------------------------------------------------ payload builders

    def _member_payload(self, user_id: int, *, with_user: bool = True, permissions: bool = False) -> JSON:
        member = copy.deepcopy(self._members[user_id])
        if with_user:
            member["user"] = copy.deepcopy(self._users[user_id])
        if permissions:
            member["permissions"] = str(self.member_permissions(user_id))
        return member

    def _guild_payload(self, *, full: bool) -> JSON:
        guild: JSON = {
            "id": str(self.guild_id),
            "name": "Fake Guild",
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": self.alice["id"],
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "roles": copy.deepcopy(self._roles),
            "emojis": [],
            "stickers": [],
            "features": [],
            "mfa_level": 0,
            "application_id": None,
            "system_channel_id": str(self.general_id),
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "safety_alerts_channel_id": None,
            "vanity_url_code": None,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "preferred_locale": "en-US",
            "nsfw_level": 0,
            "premium_progress_bar_enabled": False,
            "max_members": 500000,
        }
        if full:
            guild.update(
                {
                    "joined_at": _iso(self._guild_created),
                    "large": False,
                    "unavailable": False,
                    "member_count": len(self._members),
                    "members": [self._member_payload(uid) for uid in self._members],
                    "channels": [copy.deepcopy(c) for c in self._channels.values()],
                    "threads": [self._thread_payload(t) for t in self._threads.values() if not t["archived"]],
                    "presences": [],
                    "voice_states": [],
                    "stage_instances": [],
                    "guild_scheduled_events": [],
                    "soundboard_sounds": [],
                }
            )
        return guild

    def _thread_payload(self, thread: JSON, *, with_member: bool = True) -> JSON:
        """The thread channel object; ``thread`` is the internal record."""
        payload: JSON = {
            "id": thread["id"],
            "guild_id": str(self.guild_id),
            "parent_id": thread["parent_id"],
            "owner_id": thread["owner_id"],
            "type": thread["type"],
            "name": thread["name"],
            "last_message_id": thread["last_message_id"],
            "message_count": thread["message_count"],
            "total_message_sent": thread["total_message_sent"],
            "member_count": len(thread["members"]),
            "rate_limit_per_user": thread["rate_limit_per_user"],
            "flags": 0,
            "thread_metadata": {
                "archived": thread["archived"],
                "auto_archive_duration": thread["auto_archive_duration"],
                "archive_timestamp": _iso(thread["created"]),
                "locked": False,
                "invitable": True,
                "create_timestamp": _iso(thread["created"]),
            },
        }
        if with_member and self.bot_user["id"] in thread["members"]:
            payload["member"] = {
                "id": thread["id"],
                "user_id": self.bot_user["id"],
                "join_timestamp": _iso(thread["created"]),
                "flags": 1,
            }
        return payload

    def _channel_payload(self, channel_id: int) -> JSON:
        if channel_id in self._channels:
            return copy.deepcopy(self._channels[channel_id])
        if channel_id in self._threads:
            return self._thread_payload(self._threads[channel_id])
        if channel_id in self._dms:
            return copy.deepcopy(self._dms[channel_id])
        raise ApiError(404, 10003, "Unknown Channel")

    def _is_guild_channel(self, channel_id: int) -> bool:
        return channel_id in self._channels or channel_id in self._threads

    def _attachment(self, channel_id: int, filename: str, data: bytes, content_type: str | None) -> JSON:
        """Store bytes on the CDN and describe them as Discord does."""
        attachment_id = self._snowflake()
        content_type = content_type or "application/octet-stream"
        self._cdn_files[attachment_id] = (data, content_type, filename)
        url = f"{self.base_url}/attachments/{channel_id}/{attachment_id}/{quote(filename)}"
        attachment: JSON = {
            "id": str(attachment_id),
            "filename": filename,
            "size": len(data),
            "url": url,
            "proxy_url": url,
            "content_type": content_type,
        }
        size = _image_size(data)
        if size is not None:
            attachment["width"], attachment["height"] = size
        return attachment

    def _mentions_in(self, content: str) -> list[JSON]:
        seen: list[JSON] = []
        for match in _MENTION_RE.finditer(content):
            user = self._users.get(int(match.group(1)))
            if user is not None and user not in seen:
                seen.append(user)
        return [copy.deepcopy(u) for u in seen]

    def _render(self, message: JSON, *, nested: bool = True) -> JSON:
        """The message as Discord sends it: member data, the replied-to message, the thread."""
        out = copy.deepcopy(message)
        guild = "guild_id" in out
        author_id = int(out["author"]["id"])
        if guild and author_id in self._members and "webhook_id" not in out:
            out["member"] = self._member_payload(author_id, with_user=False)
        if guild:
            for mention in out["mentions"]:
                if int(mention["id"]) in self._members:
                    mention["member"] = self._member_payload(int(mention["id"]), with_user=False)
        ref = out.get("message_reference")
        if nested and ref is not None and out["type"] in (MSG_REPLY, MSG_THREAD_STARTER):
            referenced = self._messages.get(int(ref["message_id"]))
            out["referenced_message"] = None if referenced is None else self._render(referenced, nested=False)
        if guild and int(out["id"]) in self._threads:
            out["thread"] = self._thread_payload(self._threads[int(out["id"])])
        return out

    def _redact_for(self, session: _Session, message: JSON) -> JSON:
        """What a session without the MESSAGE_CONTENT intent sees of a message."""
        if session.intents & INTENT_MESSAGE_CONTENT or "guild_id" not in message:
            return message
        bot_id = self.bot_user["id"]
        if message["author"]["id"] == bot_id or any(m["id"] == bot_id for m in message.get("mentions", [])):
            return message
        redacted = {**message, "content": "", "embeds": [], "attachments": [], "components": []}
        redacted.pop("poll", None)
        if isinstance(message.get("referenced_message"), dict):
            redacted["referenced_message"] = self._redact_for(session, message["referenced_message"])
        return redacted

    # ------------------------------------------------------------------ state changes and waiting

    def _changed(self) -> None:
        """Wake every :meth:`wait_for`; called after each request and each state change."""
        event, self._changed_event = self._changed_event, asyncio.Event()
        event.set()

    async def wait_for(
        self, predicate: Callable[[], T | None], timeout: float = 10.0, *, description: str | None = None
    ) -> T:
        """Return the first truthy value of ``predicate()``, re-checked on every change.

        Raises :class:`FakeDiscordTimeout` after ``timeout`` seconds with what was
        awaited and the recent requests, so a failing test says what the bot did do.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = self._changed_event
            result = predicate()
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise FakeDiscordTimeout(
                    self._timeout_report(description or getattr(predicate, "__name__", "?"), timeout)
                )
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except asyncio.TimeoutError:  # not the builtin on Python 3.10
                pass

    def _timeout_report(self, what: str, timeout: float) -> str:
        recent = list(self.requests)[-25:]
        lines = [f"timed out after {timeout:g}s waiting for: {what}"]
        lines.append(f"live gateway sessions: {sum(s.live for s in self._sessions.values())}")
        lines.append(f"heartbeats received: {len(self.heartbeat_times)}")
        if self.unknown_routes:
            lines.append("unknown routes: " + ", ".join(self.unknown_routes[-10:]))
        lines.append(f"last {len(recent)} requests:" if recent else "no requests received")
        for req in recent:
            body = json.dumps(req.json)[:200] if req.json is not None else ""
            lines.append(f"  {req} {body}")
        return "\n".join(lines)

    def _client_connected(self) -> bool:
        return any(s.live for s in self._sessions.values())

    async def wait_for_client_connected(self, timeout: float = 15.0) -> None:
        """Until a client has identified and received READY and GUILD_CREATE."""
        await self.wait_for(
            self._client_connected, timeout, description="a client to IDENTIFY and receive READY"
        )

    async def wait_until_ready(self, timeout: float = 15.0, *, commands: Iterable[str] | None = ()) -> None:
        """Until a client is connected and has registered its application commands.

        ``commands``: names that must be registered (global or in the guild); the
        default ``()`` asks for at least one command, ``None`` for none at all.
        """
        wanted = None if commands is None else set(commands)

        def ready() -> bool:
            if not self._client_connected():
                return False
            if wanted is None:
                return True
            names = {c["name"] for cmds in self.commands.values() for c in cmds}
            return bool(names) and wanted <= names

        what = "a connected client" + (
            "" if wanted is None else f" with commands {sorted(wanted) or 'synced'}"
        )
        await self.wait_for(ready, timeout, description=what)

    async def wait_for_bot_message(
        self, channel_id: int, predicate: Callable[[JSON], bool] | None = None, timeout: float = 10.0
    ) -> JSON:
        """The first (oldest) bot message in a channel that satisfies ``predicate``."""

        def find() -> JSON | None:
            for message in self.bot_messages_in(channel_id):
                if predicate is None or predicate(message):
                    return message
            return None

        return await self.wait_for(find, timeout, description=f"a bot message in channel {channel_id}")

    # ------------------------------------------------------------------ query helpers

    def messages_in(self, channel_id: int) -> list[JSON]:
        """Messages in a channel or thread, oldest first, as they are now (after edits).

        Ephemeral interaction responses are included (with flag 64) although other users
        would not see them.
        """
        return [self._render(self._messages[mid]) for mid in self._channel_messages.get(channel_id, [])]

    @property
    def bot_presence(self) -> JSON:
        """The bot's presence as people see it: its last update, else what it IDENTIFYed with."""
        if self.presence_updates:
            return self.presence_updates[-1]
        presence = dict((self.identifies[-1].get("presence") or {}) if self.identifies else {})
        if "activities" not in presence:  # discord.py IDENTIFYs with the legacy "game" field
            game = presence.pop("game", None)
            presence["activities"] = [game] if game else []
        return presence

    def bot_messages_in(self, channel_id: int) -> list[JSON]:
        """The bot's messages in a channel, oldest first (thread starter markers excluded)."""
        return [
            m
            for m in self.messages_in(channel_id)
            if m["author"]["id"] == self.bot_user["id"] and m["type"] != MSG_THREAD_STARTER
        ]

    def message(self, message_id: int) -> JSON:
        """One message as it is now."""
        return self._render(self._messages[message_id])

    def edits_of(self, message_id: int) -> list[MessageEdit]:
        """Every edit of a message in order; empty if never edited."""
        return list(self._edits.get(message_id, []))

    def buttons_on(self, message_id: int) -> list[JSON]:
        """The buttons on a message as it is now (copies, rows flattened, in order).

        Each is the bot's button dict: ``custom_id``, ``label``, ``style``, ``disabled``...
        ``[b["custom_id"] for b in fake.buttons_on(mid)]`` is what :meth:`click_button` accepts.
        """
        return [
            copy.deepcopy(c)
            for c in _walk_components(self._messages[message_id].get("components") or [])
            if c.get("type") == COMPONENT_BUTTON
        ]

    @property
    def threads(self) -> dict[int, JSON]:
        """Thread channel payloads by id (a copy)."""
        return {tid: self._thread_payload(t) for tid, t in self._threads.items()}

    @property
    def channels(self) -> dict[int, JSON]:
        """Guild text channels by id (a copy)."""
        return copy.deepcopy(self._channels)

    def requests_to(self, method: str, path_pattern: str) -> list[RecordedRequest]:
        """Recorded requests whose method matches and whose path matches a regex fully."""
        regex = re.compile(path_pattern)
        return [r for r in self.requests if r.method == method and regex.fullmatch(r.path)]

    # ------------------------------------------------------------------ gateway

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        # timeout: how long a close waits for the client's answer; a stopped bot must not stall teardown.
        ws = web.WebSocketResponse(max_msg_size=0, timeout=2.0)
        await ws.prepare(request)
        self.gateway_connects.append(dict(request.query))
        compression = request.query.get("compress")
        try:
            compressor = _Compressor(compression) if compression else None
        except Exception as exc:
            log.error("gateway: %s", exc)
            await ws.close(code=4000, message=b"unsupported compression")
            return ws
        if request.query.get("encoding", "json") != "json":
            await ws.close(code=4002, message=b"only encoding=json is supported")
            return ws
        conn = _Connection(ws, compressor)
        self._connections.add(conn)
        try:
            await conn.send(
                {"op": OP_HELLO, "d": {"heartbeat_interval": self.heartbeat_interval_ms, "_trace": ["fake"]}}
            )
            async for msg in ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    try:
                        payload = json.loads(msg.data)
                    except ValueError:
                        await ws.close(code=4002, message=b"decode error")
                        break
                    await self._on_gateway_payload(conn, payload)
                elif msg.type == WSMsgType.ERROR:
                    log.debug("gateway error: %r", ws.exception())
        finally:
            self._connections.discard(conn)
            session = conn.session
            if session is not None and session.connection is conn:
                session.connection = None
                # A clean close (1000/1001) ends the session on Discord; others may resume.
                if ws.close_code in (1000, 1001):
                    self._sessions.pop(session.session_id, None)
            self._changed()
        return ws

    async def _on_gateway_payload(self, conn: _Connection, payload: JSON) -> None:
        op = payload.get("op")
        data = payload.get("d")
        if op == OP_HEARTBEAT:
            self.heartbeat_times.append(time.monotonic())
            await conn.send({"op": OP_HEARTBEAT_ACK})
            self._changed()
        elif op == OP_IDENTIFY:
            await self._identify(conn, data or {})
        elif op == OP_RESUME:
            await self._resume(conn, data or {})
        elif op == OP_REQUEST_MEMBERS:
            await self._request_members(conn, data or {})
        elif op == OP_PRESENCE:
            self.presence_updates.append(copy.deepcopy(data or {}))
            self._changed()
        else:
            log.info("gateway: ignoring op %r", op)

    async def _identify(self, conn: _Connection, data: JSON) -> None:
        if data.get("token") != self.token:
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        if conn.session is not None:
            await conn.ws.close(code=4005, message=b"Already authenticated.")
            return
        self.identifies.append(copy.deepcopy(data))
        session = _Session(secrets.token_hex(16), int(data.get("intents", 0)), data.get("shard"))
        session.connection = conn
        conn.session = session
        ready: JSON = {
            "v": 10,
            "user": {**copy.deepcopy(self.bot_user), "verified": True, "mfa_enabled": False, "email": None},
            "guilds": [{"id": str(self.guild_id), "unavailable": True}],
            "session_id": session.session_id,
            "session_type": "normal",
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.application_id), "flags": 1 << 19},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "user_settings": {},
            "geo_ordered_rtc_regions": [],
            "_trace": ["fake"],
        }
        if session.shard is not None:
            ready["shard"] = session.shard
        await session.dispatch("READY", ready)
        await session.dispatch("GUILD_CREATE", self._guild_payload(full=True))
        self._sessions[session.session_id] = session
        self._changed()

    async def _resume(self, conn: _Connection, data: JSON) -> None:
        session = self._sessions.get(str(data.get("session_id")))
        if data.get("token") != self.token:
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        if session is None:
            await conn.send({"op": OP_INVALID_SESSION, "d": False})
            return
        self.resumes.append(copy.deepcopy(data))
        old = session.connection
        session.connection = conn
        conn.session = session
        if old is not None and old is not conn:
            old.session = None
            await old.ws.close(code=4000, message=b"session resumed elsewhere")
        since = int(data.get("seq") or 0)
        for frame in list(session.buffer):
            if frame["s"] > since:
                await conn.send(frame)
        await session.dispatch("RESUMED", {"_trace": ["fake"]})
        self._changed()

    async def _request_members(self, conn: _Connection, data: JSON) -> None:
        if conn.session is None:
            return
        query = str(data.get("query") or "").lower()
        user_ids = {int(u) for u in data.get("user_ids") or []}
        members = [
            self._member_payload(uid)
            for uid, user in self._users.items()
            if uid in self._members
            and (uid in user_ids if user_ids else user["username"].lower().startswith(query))
        ]
        limit = int(data.get("limit") or 0)
        if limit:
            members = members[:limit]
        chunk: JSON = {
            "guild_id": str(self.guild_id),
            "members": members,
            "chunk_index": 0,
            "chunk_count": 1,
            "not_found": [],
        }
        if "nonce" in data:
            chunk["nonce"] = data["nonce"]
        await conn.session.dispatch("GUILD_MEMBERS_CHUNK", chunk)

    async def _dispatch_all(
        self,
        event: str,
        data: JSON,
        *,
        intent: int | None = None,
        transform: Callable[[_Session, JSON], JSON] | None = None,
    ) -> None:
        """Send one event to every session (buffered for those currently disconnected)."""
        for session in list(self._sessions.values()):
            if intent is not None and not session.intents & intent:
                continue
            await session.dispatch(event, transform(session, data) if transform else data)

    async def _dispatch_message(self, event: str, message: JSON) -> None:
        """MESSAGE_CREATE/UPDATE as the intents of each session allow (ephemeral ones to nobody)."""
        if message.get("flags", 0) & FLAG_EPHEMERAL:
            return
        intent = INTENT_GUILD_MESSAGES if "guild_id" in message else INTENT_DIRECT_MESSAGES
        await self._dispatch_all(event, self._render(message), intent=intent, transform=self._redact_for)

    async def request_reconnect(self) -> None:
        """Send op 7 RECONNECT to every live connection; clients should come back with RESUME."""
        for session in self._sessions.values():
            if session.connection is not None:
                await session.connection.send({"op": OP_RECONNECT, "d": None})

    # ------------------------------------------------------------------ simulated users

    async def send_message(
        self,
        author: UserLike,
        channel_id: int,
        content: str = "",
        *,
        attachments: Sequence[AttachmentSpec] = (),
        mention_bot: bool = False,
        reply_to: int | None = None,
        ping_reply: bool = True,
        embeds: Sequence[JSON] = (),
        stickers: Sequence[JSON] = (),
    ) -> JSON:
        """A user posts a message; it is stored and dispatched as MESSAGE_CREATE.

        ``mention_bot`` puts ``<@BOT_ID>`` at the start of the content (any ``<@id>`` in
        the content becomes a mention). ``reply_to`` makes it a reply to that message;
        like Discord's client, the reply pings (mentions) the replied-to author unless
        ``ping_reply=False``, so a reply to the bot mentions the bot. ``embeds`` are embed
        objects (see :meth:`image_embed`; an unfurl comes later: :meth:`unfurl`); ``stickers``
        sticker items (:meth:`add_sticker`). Returns the message as Discord would send it.
        """
        user = self._resolve_user(author)
        self._check_can_post(user, channel_id)
        if reply_to is not None and reply_to not in self._messages:
            raise KeyError(f"no such message to reply to: {reply_to}")
        bot_mention = f"<@{self.bot_user['id']}>"
        if mention_bot and bot_mention not in content:
            content = f"{bot_mention} {content}" if content else bot_mention
        message = self._new_message(channel_id, user, content)
        message["attachments"] = [self._attachment(channel_id, fn, data, ct) for fn, data, ct in attachments]
        message["embeds"] = copy.deepcopy(list(embeds))
        if stickers:
            message["sticker_items"] = copy.deepcopy(list(stickers))
        if reply_to is not None:
            self._set_reply(message, reply_to, ping=ping_reply)
        self._store_message(message)
        await self._dispatch_message("MESSAGE_CREATE", message)
        self._changed()
        return self._render(message)

    async def edit_message(self, message_id: int, content: str) -> JSON:
        """The author of a (user) message edits it; dispatches MESSAGE_UPDATE."""
        if message_id not in self._messages:
            raise KeyError(f"no such message: {message_id}")
        message = self._messages[message_id]
        message["content"] = content
        message["mentions"] = self._mentions_in(content)
        message["edited_timestamp"] = _iso(time.time())
        self._record_edit(message, None)
        await self._dispatch_message("MESSAGE_UPDATE", message)
        self._changed()
        return self._render(message)

    async def delete_message(self, message_id: int) -> None:
        """The author of a message deletes it; dispatches MESSAGE_DELETE."""
        if message_id not in self._messages:
            raise KeyError(f"no such message: {message_id}")
        await self._delete(self._messages[message_id])

    # ------------------------------------------------------------------ deletions and random faults

    async def delete_thread(self, thread_id: int) -> None:
        """A moderator deletes a thread: its messages go with it, later calls to it get 404
        Unknown Channel (10003), and THREAD_DELETE carries what Discord documents (id,
        guild_id, parent_id, type). The message it was made from stays in the parent."""
        thread = self._threads.pop(thread_id, None)
        if thread is None:
            raise KeyError(f"no such thread: {thread_id}")
        for message_id in self._channel_messages.pop(thread_id, []):
            self._messages.pop(message_id, None)  # no MESSAGE_DELETE for these, as on Discord
        event: JSON = {
            "id": thread["id"],
            "guild_id": str(self.guild_id),
            "parent_id": thread["parent_id"],
            "type": thread["type"],
        }
        await self._dispatch_all("THREAD_DELETE", event, intent=INTENT_GUILDS)
        self._changed()

    def fail_at_random(
        self,
        probability: float,
        *,
        statuses: Sequence[int] = (429, 502),
        path_pattern: str = r"^/(channels|webhooks|interactions)/",
        retry_after: float = 0.2,
        seed: int = 0,
    ) -> None:
        """From now on, answer each request whose path matches `path_pattern` with one of
        `statuses` (429: a rate limit with `retry_after`; 5xx: an outage) with `probability`,
        the request left undone; ``probability=0`` stops it. Seeded, so a run can be repeated."""
        self._random_failures = (probability, tuple(statuses), re.compile(path_pattern), retry_after)
        self._random = random.Random(seed)

    def _raise_random_failure(self, path: str) -> None:
        if self._random_failures is None:
            return
        probability, statuses, pattern, retry_after = self._random_failures
        if probability <= 0 or not pattern.search(path) or self._random.random() >= probability:
            return
        status = self._random.choice(statuses)
        self.injected_failures.append((path, status))
        if status == 429:
            raise ApiError(
                429, 0, "You are being rate limited.", extra={"retry_after": retry_after, "global": False}
            )
        raise ApiError(status, 0, f"{status}: injected failure")

    def _check_can_post(self, user: JSON, channel_id: int) -> None:
        if channel_id in self._dms:
            recipients = {r["id"] for r in self._dms[channel_id]["recipients"]}
            if user["id"] not in recipients and user["id"] != self.bot_user["id"]:
                raise ValueError(f"{user['username']} is not in DM channel {channel_id}")
        elif not self._is_guild_channel(channel_id):
            raise KeyError(f"no such channel: {channel_id}")

    async def invoke_command(
        self,
        user: UserLike,
        channel_id: int,
        name: str,
        options: Mapping[str, Any] | None = None,
        attachments: Mapping[str, AttachmentSpec] | None = None,
        *,
        locale: str = "en-US",
        permissions: int | None = None,
    ) -> InteractionRecord:
        """A user runs a slash command the bot registered; dispatches INTERACTION_CREATE.

        ``name`` may name a subcommand: ``"seebot channels add"`` (command, group,
        subcommand), sent as nested options of types 2 and 1, as Discord does.
        ``options``: name -> value (str, int, float, bool, a user for user options, a
        channel id for channel options, which land in ``resolved.channels``);
        ``attachments``: option name -> (filename, bytes, content type). Types come from
        the registered command's definition; choices, lengths and ranges are checked as
        Discord's client does. In a guild the invoker is a ``member`` whose
        ``permissions`` are ``permissions`` if given, else :meth:`member_permissions`; a
        command with ``default_member_permissions`` the member lacks is not offered to
        them (``PermissionError``) unless :meth:`allow_command` let them; a command with
        ``dm_permission`` false does not exist in DMs. Raises ``LookupError`` for an
        unregistered command and ``ValueError`` for unknown or missing required options,
        which are mistakes in the test, not in the bot. Returns the record (id, token,
        later the bot's response) kept in :attr:`interactions`.
        """
        invoker = self._resolve_user(user)
        self._check_can_post(invoker, channel_id)
        in_guild = self._is_guild_channel(channel_id)
        path = name.split()
        command, scope = self._find_command(path[0], in_guild)
        if not in_guild and command.get("dm_permission") is False:
            raise LookupError(f"/{path[0]} is not available in DMs (dm_permission false)")
        granted = self.member_permissions(invoker) if permissions is None else permissions
        if in_guild:
            self._check_may_use(command, invoker, granted)
        chain, leaf_options = self._subcommand_chain(command, path)
        definitions = {o["name"]: o for o in leaf_options}
        given = dict(options or {})
        given_files = dict(attachments or {})
        unknown = (set(given) | set(given_files)) - set(definitions)
        if unknown:
            raise ValueError(f"/{name} has no options {sorted(unknown)}; it has {sorted(definitions)}")
        missing = [
            n for n, d in definitions.items() if d.get("required") and n not in given and n not in given_files
        ]
        if missing:
            raise ValueError(f"/{name} requires options {missing}")

        resolved: JSON = {}
        option_payloads: list[JSON] = []
        for option_name in definitions:  # the order Discord uses: the command's own
            if option_name in given_files:
                filename, data, content_type = given_files[option_name]
                attachment = {**self._attachment(channel_id, filename, data, content_type), "ephemeral": True}
                resolved.setdefault("attachments", {})[attachment["id"]] = attachment
                option_payloads.append(
                    {"name": option_name, "type": OPT_ATTACHMENT, "value": attachment["id"]}
                )
            elif option_name in given:
                option_payloads.append(
                    self._option_payload(definitions[option_name], given[option_name], resolved)
                )
        for level in reversed(chain):  # wrap in the subcommand, then its group
            option_payloads = [{"name": level["name"], "type": level["type"], "options": option_payloads}]

        data: JSON = {"id": command["id"], "name": command["name"], "type": command.get("type", 1)}
        if option_payloads:
            data["options"] = option_payloads
        if resolved:
            data["resolved"] = resolved
        if scope is not None:
            data["guild_id"] = str(scope)

        interaction_id = self._snowflake()
        token = "aW50ZXJhY3Rpb24" + secrets.token_urlsafe(48)
        channel = self._channel_payload(channel_id)
        payload: JSON = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": 2,
            "data": data,
            "channel_id": str(channel_id),
            "channel": {**channel, "permissions": str(granted) if in_guild else ALL_PERMISSIONS},
            "token": token,
            "version": 1,
            "app_permissions": ALL_PERMISSIONS,
            "locale": locale,
            "entitlements": [],
            "attachment_size_limit": UPLOAD_LIMIT,
        }
        if in_guild:
            payload.update(
                guild_id=str(self.guild_id),
                guild={"id": str(self.guild_id), "locale": "en-US", "features": []},
                guild_locale="en-US",
                member={**self._member_payload(int(invoker["id"])), "permissions": str(granted)},
                authorizing_integration_owners={"0": str(self.guild_id)},
                context=0,
            )
        else:
            payload.update(
                user=copy.deepcopy(invoker),
                authorizing_integration_owners={"0": str(self.guild_id)},
                context=1,
            )
        record = InteractionRecord(
            id=interaction_id,
            token=token,
            channel_id=channel_id,
            user_id=int(invoker["id"]),
            command_name=name,
            payload=payload,
            created_at=time.monotonic(),
        )
        return await self._deliver_interaction(record)

    async def click_button(
        self,
        user: UserLike,
        message_id: int,
        custom_id: str,
        *,
        permissions: int | None = None,
        locale: str = "en-US",
    ) -> InteractionRecord:
        """A user presses a button on one of the bot's messages; dispatches INTERACTION_CREATE.

        The interaction is a MESSAGE_COMPONENT one (type 3) with ``data`` ``{custom_id,
        component_type: 2}`` and the message as it is now. In a guild the presser is a
        ``member`` whose ``permissions`` (what ``interaction.permissions`` reads) are
        ``permissions`` if given, else every permission for the guild owner ("alice") and
        :data:`MEMBER_PERMISSIONS` (no Manage Messages) for anyone else; in a DM it is a
        ``user`` and ``permissions`` is ignored. Raises ``LookupError`` if the message has no
        button with that ``custom_id`` and ``ValueError`` if the button is disabled or a link,
        the message is not the bot's, or the user cannot see it. Returns the record kept in
        :attr:`interactions`: the bot's callback (4, 5, 6 or 7) lands in ``response_type``.
        """
        presser = self._resolve_user(user)
        message = self._messages.get(message_id)
        if message is None:
            raise KeyError(f"no such message: {message_id}")
        channel_id = int(message["channel_id"])
        self._check_can_post(presser, channel_id)
        if message["author"]["id"] != self.bot_user["id"]:
            raise ValueError(f"message {message_id} is not the bot's; its buttons would not reach it")
        buttons = [
            c for c in _walk_components(message.get("components") or []) if c.get("type") == COMPONENT_BUTTON
        ]
        button = next((b for b in buttons if b.get("custom_id") == custom_id), None)
        if button is None:
            have = [(b.get("custom_id"), b.get("label")) for b in buttons]
            raise LookupError(
                f"message {message_id} has no button with custom_id {custom_id!r} (custom_id, label: {have})"
            )
        if button.get("disabled"):
            raise ValueError(f"button {custom_id!r} on message {message_id} is disabled")
        if button.get("style") in (BUTTON_LINK, BUTTON_PREMIUM):
            raise ValueError(f"button {custom_id!r} on message {message_id} sends no interaction")
        if message.get("flags", 0) & FLAG_EPHEMERAL:
            owner = (message.get("interaction_metadata") or {}).get("user", {}).get("id")
            if owner != presser["id"]:
                raise ValueError(f"message {message_id} is ephemeral: only its owner {owner} sees it")
        in_guild = self._is_guild_channel(channel_id)
        if in_guild and int(presser["id"]) not in self._members:
            raise ValueError(f"{presser['username']} is not a member of the guild")
        if permissions is None:
            permissions = int(ALL_PERMISSIONS) if presser["id"] == self.alice["id"] else MEMBER_PERMISSIONS
        granted = str(permissions) if in_guild else ALL_PERMISSIONS

        data: JSON = {"custom_id": custom_id, "component_type": COMPONENT_BUTTON}
        if "id" in button:
            data["id"] = button["id"]
        interaction_id = self._snowflake()
        token = "aW50ZXJhY3Rpb24" + secrets.token_urlsafe(48)
        payload: JSON = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": INTERACTION_MESSAGE_COMPONENT,
            "data": data,
            "message": self._render(message),
            "channel_id": str(channel_id),
            "channel": {**self._channel_payload(channel_id), "permissions": granted},
            "token": token,
            "version": 1,
            "app_permissions": ALL_PERMISSIONS,
            "locale": locale,
            "entitlements": [],
            "attachment_size_limit": UPLOAD_LIMIT,
        }
        if in_guild:
            member = self._member_payload(int(presser["id"]))
            member["permissions"] = granted
            payload.update(
                guild_id=str(self.guild_id),
                guild={"id": str(self.guild_id), "locale": "en-US", "features": []},
                guild_locale="en-US",
                member=member,
                authorizing_integration_owners={"0": str(self.guild_id)},
                context=0,
            )
        else:
            payload.update(
                user=copy.deepcopy(presser),
                authorizing_integration_owners={"0": str(self.guild_id)},
                context=1,
            )
        record = InteractionRecord(
            id=interaction_id,
            token=token,
            channel_id=channel_id,
            user_id=int(presser["id"]),
            command_name="",
            payload=payload,
            created_at=time.monotonic(),
            custom_id=custom_id,
            component_message_id=message_id,
        )
        return await self._deliver_interaction(record)

    async def _deliver_interaction(self, record: InteractionRecord) -> InteractionRecord:
        """Keep the interaction (its token answers it) and send it as INTERACTION_CREATE."""
        self.interactions[record.id] = record
        self._interactions_by_token[record.token] = record
        await self._dispatch_all("INTERACTION_CREATE", copy.deepcopy(record.payload))
        self._changed()
        return record

    def _find_command(self, name: str, in_guild: bool) -> tuple[JSON, int | None]:
        scopes: list[int | None] = [self.guild_id, None] if in_guild else [None]
        for scope in scopes:
            for command in self.commands.get(scope, []):
                if command["name"] == name and command.get("type", 1) == 1:
                    return command, scope
        registered = {str(scope): [c["name"] for c in cmds] for scope, cmds in self.commands.items()}
        raise LookupError(f"the bot has not registered /{name} (registered: {registered or 'nothing'})")

    def _check_may_use(self, command: JSON, invoker: JSON, granted: int) -> None:
        """Discord offers a command to members who hold all its default_member_permissions
        (administrators always), unless the server's Integrations settings say otherwise."""
        override = self.command_overrides.get((command["name"], int(invoker["id"])))
        default = command.get("default_member_permissions")  # None: everyone; "0": administrators only
        required = int(default or 0)
        if override is not None:
            allowed = override
        elif granted & ADMINISTRATOR or default is None:
            allowed = True
        else:
            allowed = default != "0" and granted & required == required
        if not allowed:
            raise PermissionError(
                f"Discord does not offer /{command['name']} to {invoker['username']}: it needs "
                f"permissions {required} (see allow_command)"
            )

    def _subcommand_chain(self, command: JSON, path: Sequence[str]) -> tuple[list[JSON], list[JSON]]:
        """The group/subcommand definitions ``path[1:]`` names, and the leaf's own options."""
        chain: list[JSON] = []
        options = command.get("options") or []
        for part in path[1:]:
            subcommands = [o for o in options if o["type"] in (OPT_SUB_COMMAND, OPT_SUB_COMMAND_GROUP)]
            level = next((o for o in subcommands if o["name"] == part), None)
            if level is None:
                have = [o["name"] for o in subcommands]
                raise LookupError(f"/{' '.join(path)}: no subcommand {part!r} (there are {have})")
            chain.append(level)
            options = level.get("options") or []
        if any(o["type"] in (OPT_SUB_COMMAND, OPT_SUB_COMMAND_GROUP) for o in options):
            raise ValueError(f"/{' '.join(path)} is a group: name one of its subcommands")
        return chain, options

    def _check_option_value(self, definition: JSON, kind: int, value: Any) -> None:
        """What Discord's client refuses to send: a value not among the choices, out of range."""
        name = definition["name"]
        choices = definition.get("choices")
        if choices and value not in [c["value"] for c in choices]:
            raise ValueError(f"option {name!r} must be one of {[c['value'] for c in choices]}, got {value!r}")
        if kind == OPT_STRING:
            if not isinstance(value, str):
                raise ValueError(f"option {name!r} takes a string, got {value!r}")
            if not definition.get("min_length", 0) <= len(value) <= definition.get("max_length", 6000):
                raise ValueError(f"option {name!r}: {len(value)} characters is out of its length range")
        if kind in (OPT_INTEGER, OPT_NUMBER):
            low, high = definition.get("min_value"), definition.get("max_value")
            if (low is not None and value < low) or (high is not None and value > high):
                raise ValueError(f"option {name!r}: {value} is out of its range [{low}, {high}]")

    def _option_payload(self, definition: JSON, value: Any, resolved: JSON) -> JSON:
        kind = definition.get("type")
        if kind is None:
            if isinstance(value, bool):
                kind = OPT_BOOLEAN
            elif isinstance(value, int):
                kind = OPT_INTEGER
            elif isinstance(value, float):
                kind = OPT_NUMBER
            else:
                kind = OPT_STRING
        if kind == OPT_USER:
            user = self._resolve_user(value)
            resolved.setdefault("users", {})[user["id"]] = copy.deepcopy(user)
            if int(user["id"]) in self._members:
                resolved.setdefault("members", {})[user["id"]] = self._member_payload(
                    int(user["id"]), with_user=False, permissions=True
                )
            value = user["id"]
        elif kind == OPT_CHANNEL:
            channel_id = int(value)
            if not self._is_guild_channel(channel_id):
                raise ValueError(f"option {definition['name']!r}: no channel {channel_id} in the guild")
            channel = self._channel_payload(channel_id)
            allowed_types = definition.get("channel_types")
            if allowed_types and channel["type"] not in allowed_types:
                raise ValueError(f"option {definition['name']!r} takes channels of types {allowed_types}")
            partial: JSON = {
                "id": str(channel_id),
                "name": channel["name"],
                "type": channel["type"],
                "permissions": ALL_PERMISSIONS,
            }
            if channel["type"] in THREAD_TYPES:
                partial.update(parent_id=channel["parent_id"], thread_metadata=channel["thread_metadata"])
            resolved.setdefault("channels", {})[str(channel_id)] = partial
            value = str(channel_id)
        else:
            self._check_option_value(definition, kind, value)
        return {"name": definition["name"], "type": kind, "value": value}

    # ------------------------------------------------------------------ messages (shared)

    def _new_message(
        self, channel_id: int, author: JSON, content: str, *, msg_type: int = MSG_DEFAULT
    ) -> JSON:
        message_id = self._snowflake()
        message: JSON = {
            "id": str(message_id),
            "channel_id": str(channel_id),
            "author": copy.deepcopy(author),
            "content": content,
            "timestamp": _iso(_snowflake_time(message_id)),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": self._mentions_in(content),
            "mention_roles": [m.group(1) for m in _ROLE_MENTION_RE.finditer(content)],
            "attachments": [],
            "embeds": [],
            "components": [],
            "pinned": False,
            "type": msg_type,
            "flags": 0,
        }
        if self._is_guild_channel(channel_id):
            message["guild_id"] = str(self.guild_id)
        return message

    def _set_reply(
        self, message: JSON, reply_to: int, *, ping: bool, fail_if_not_exists: bool = True
    ) -> None:
        referenced = self._messages.get(reply_to)
        if referenced is None:
            if fail_if_not_exists:
                raise _form_error("message_reference", "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message")
            return
        message["type"] = MSG_REPLY
        message["message_reference"] = {
            "type": 0,
            "message_id": referenced["id"],
            "channel_id": referenced["channel_id"],
            **({"guild_id": referenced["guild_id"]} if "guild_id" in referenced else {}),
        }
        if ping and referenced["author"]["id"] not in {m["id"] for m in message["mentions"]}:
            message["mentions"].append(copy.deepcopy(referenced["author"]))

    def _store_message(self, message: JSON) -> None:
        message_id = int(message["id"])
        channel_id = int(message["channel_id"])
        self._messages[message_id] = message
        self._channel_messages.setdefault(channel_id, []).append(message_id)
        if message.get("flags", 0) & FLAG_EPHEMERAL:
            return
        if channel_id in self._channels:
            self._channels[channel_id]["last_message_id"] = message["id"]
        elif channel_id in self._dms:
            self._dms[channel_id]["last_message_id"] = message["id"]
        elif channel_id in self._threads and message["type"] != MSG_THREAD_STARTER:
            thread = self._threads[channel_id]
            thread["last_message_id"] = message["id"]
            thread["message_count"] += 1
            thread["total_message_sent"] += 1

    def _require_message(self, message_id: int, channel_id: int | None = None) -> JSON:
        message = self._messages.get(message_id)
        if message is None or (channel_id is not None and int(message["channel_id"]) != channel_id):
            raise ApiError(404, 10008, "Unknown Message")
        return message

    def _record_edit(self, message: JSON, allowed_mentions: Any) -> None:
        self._edits.setdefault(int(message["id"]), []).append(
            MessageEdit(at=time.monotonic(), message=self._render(message), allowed_mentions=allowed_mentions)
        )

    def _record_write(self, kind: str, message: JSON, body: JSON) -> None:
        self.message_writes.append(
            MessageWrite(
                kind=kind,
                channel_id=int(message["channel_id"]),
                message_id=int(message["id"]),
                content=message.get("content"),
                allowed_mentions=copy.deepcopy(body.get("allowed_mentions")),
                at=time.monotonic(),
            )
        )

    async def _delete(self, message: JSON) -> None:
        message_id = int(message["id"])
        channel_id = int(message["channel_id"])
        self._messages.pop(message_id, None)
        ids = self._channel_messages.get(channel_id, [])
        if message_id in ids:
            ids.remove(message_id)
        event: JSON = {"id": message["id"], "channel_id": message["channel_id"]}
        if "guild_id" in message:
            event["guild_id"] = message["guild_id"]
        if not message.get("flags", 0) & FLAG_EPHEMERAL:
            intent = INTENT_GUILD_MESSAGES if "guild_id" in message else INTENT_DIRECT_MESSAGES
            await self._dispatch_all("MESSAGE_DELETE", event, intent=intent)
        self._changed()

    def _apply_body(
        self, message: JSON, body: JSON, files: Sequence[UploadedFile], *, creating: bool
    ) -> None:
        """Apply a create/edit body (content, embeds, attachments, flags...) with Discord's checks."""
        if "content" in body or creating:
            content = body.get("content") or ""
            if len(content) > MAX_CONTENT:
                raise _form_error(
                    "content", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_CONTENT} or fewer in length."
                )
            message["content"] = content
            message["mentions"] = self._mentions_in(content)
            message["mention_roles"] = [m.group(1) for m in _ROLE_MENTION_RE.finditer(content)]
        if body.get("components") is not None:  # checked before anything changes
            _check_components(body["components"], int(body.get("flags") or message.get("flags", 0)))
        for key in ("embeds", "components", "poll", "sticker_ids"):
            if body.get(key) is not None:
                message[key] = copy.deepcopy(body[key])
        if body.get("nonce") is not None:
            message["nonce"] = body["nonce"]
        if body.get("flags") is not None:
            message["flags"] = (message.get("flags", 0) & FLAG_EPHEMERAL) | int(body["flags"])
        uploads = {f.field: f for f in files}
        channel_id = int(message["channel_id"])
        if "attachments" in body and body["attachments"] is not None:
            kept: list[JSON] = []
            existing = {a["id"]: a for a in message.get("attachments", [])}
            for entry in body["attachments"]:
                upload = uploads.get(f"files[{entry.get('id')}]")
                if upload is not None:
                    attachment = self._attachment(
                        channel_id, entry.get("filename") or upload.filename, upload.data, _guess_type(upload)
                    )
                    if entry.get("description"):
                        attachment["description"] = entry["description"]
                    kept.append(attachment)
                elif str(entry.get("id")) in existing:
                    kept.append(existing[str(entry["id"])])
            message["attachments"] = kept
        elif files:
            message["attachments"] = message.get("attachments", []) + [
                self._attachment(channel_id, f.filename, f.data, _guess_type(f)) for f in files
            ]
        if len(message["attachments"]) > MAX_FILES:
            raise _form_error(
                "attachments", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_FILES} or fewer in length."
            )
        if not (
            message["content"]
            or message.get("embeds")
            or message.get("attachments")
            or message.get("components")
            or message.get("poll")
            or message.get("sticker_ids")
            or message.get("flags", 0) & FLAG_LOADING
        ):
            raise ApiError(400, 50006, "Cannot send an empty message")

    async def _bot_creates_message(
        self,
        channel_id: int,
        body: JSON,
        files: Sequence[UploadedFile],
        *,
        kind: str,
        msg_type: int = MSG_DEFAULT,
        extra: JSON | None = None,
    ) -> JSON:
        message = self._new_message(channel_id, self.bot_user, "", msg_type=msg_type)
        if extra:
            message.update(copy.deepcopy(extra))
        self._apply_body(message, body, files, creating=True)
        reference = body.get("message_reference")
        if isinstance(reference, Mapping) and reference.get("message_id") is not None:
            # Discord pings the replied-to author when allowed_mentions is absent, or says so.
            allowed = body.get("allowed_mentions")
            self._set_reply(
                message,
                int(reference["message_id"]),
                ping=allowed is None or bool(allowed.get("replied_user", False)),
                fail_if_not_exists=reference.get("fail_if_not_exists", True),
            )
        self._store_message(message)
        self._record_write(kind, message, body)
        await self._dispatch_message("MESSAGE_CREATE", message)
        return message

    async def _bot_edits_message(
        self, message: JSON, body: JSON, files: Sequence[UploadedFile], *, kind: str
    ) -> JSON:
        self._apply_body(message, body, files, creating=False)
        if not message.get("flags", 0) & FLAG_LOADING:
            message["edited_timestamp"] = _iso(time.time())
        self._record_edit(message, copy.deepcopy(body.get("allowed_mentions")))
        self._record_write(kind, message, body)
        await self._dispatch_message("MESSAGE_UPDATE", message)
        return message

    # ------------------------------------------------------------------ threads

    def set_cdn_response(
        self, filename: str, *, status: int = 200, body: bytes | None = None, delay: float = 0.0
    ) -> None:
        """From now on, CDN downloads of attachments named ``filename`` fail, lie or hang.

        They answer ``status`` with ``body`` (default: the bytes sent, so the attachment's
        declared ``size`` can differ from what is served) after ``delay`` seconds (a large
        delay: a download that never finishes; the wait ends when the client gives up).
        For tests of downloads that fail (404), are slow, or are larger than declared.
        """
        self._cdn_overrides[filename] = (status, body, delay)

    async def create_thread(self, user: UserLike, parent_id: int, message_id: int, name: str) -> int:
        """A user (not the bot) starts a public thread from a message; returns its id."""
        payload = await self._create_thread(
            parent_id,
            thread_id=message_id,
            name=name,
            thread_type=11,
            auto_archive=1440,
            slowmode=0,
            owner=self._resolve_user(user),
        )
        self._changed()
        return int(payload["id"])

    async def _create_thread(
        self,
        parent_id: int,
        *,
        thread_id: int,
        name: Any,
        thread_type: int,
        auto_archive: Any,
        slowmode: Any,
        owner: JSON | None = None,
    ) -> JSON:
        if parent_id not in self._channels:
            if parent_id in self._threads:
                raise ApiError(400, 50024, "Cannot execute action on this channel type")
            raise ApiError(404, 10003, "Unknown Channel")
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_THREAD_NAME:
            raise _form_error(
                "name", "BASE_TYPE_BAD_LENGTH", f"Must be between 1 and {MAX_THREAD_NAME} in length."
            )
        thread: JSON = {
            "id": str(thread_id),
            "parent_id": str(parent_id),
            "owner_id": (owner or self.bot_user)["id"],
            "type": thread_type,
            "name": name,
            "last_message_id": None,
            "message_count": 0,
            "total_message_sent": 0,
            "rate_limit_per_user": int(slowmode or 0),
            "archived": False,
            "auto_archive_duration": int(auto_archive or 1440),
            "created": time.time(),
            "members": [(owner or self.bot_user)["id"]],
        }
        self._threads[thread_id] = thread
        self._channel_messages.setdefault(thread_id, [])
        if self.thread_starter_messages and thread_id in self._messages:
            # Discord's type-21 marker: no content, embeds or attachments of its own, only a
            # reference to the message in the parent channel. Its author here is that message's
            # author (Discord's choice is not documented); it is not dispatched as MESSAGE_CREATE.
            origin_author = self._messages[thread_id]["author"]
            starter = self._new_message(thread_id, origin_author, "", msg_type=MSG_THREAD_STARTER)
            starter["message_reference"] = {
                "type": 0,
                "message_id": str(thread_id),
                "channel_id": str(parent_id),
                "guild_id": str(self.guild_id),
            }
            self._store_message(starter)
        payload = self._thread_payload(thread)
        await self._dispatch_all("THREAD_CREATE", {**payload, "newly_created": True}, intent=INTENT_GUILDS)
        return payload

    # ------------------------------------------------------------------ HTTP plumbing

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        self.http_requests.append(HttpRequest(request.method, request.host, request.path, time.monotonic()))
        if not request.path.startswith(API_PREFIX + "/"):
            return await handler(request)
        path = request.path[len(API_PREFIX) :]
        record = RecordedRequest(
            method=request.method,
            path=path,
            query=dict(request.query),
            json=None,
            files=[],
            at=time.monotonic(),
        )
        self.requests.append(record)
        try:
            await self._read_body(request, record)
            request[_RECORD] = record
            self._raise_injected_failure(request.method, path, record.json)
            self._raise_random_failure(path)
            public = path.startswith(("/webhooks/", "/interactions/")) or path == "/gateway"
            if not public and request.headers.get("Authorization") != f"Bot {self.token}":
                raise ApiError(401, 0, "401: Unauthorized")
            response: web.StreamResponse = await handler(request)
        except ApiError as exc:
            response = exc.response()
        except web.HTTPException:
            raise
        except Exception as exc:  # a bug in the fake: make it loud in the test output
            log.exception("fake Discord failed on %s %s", request.method, path)
            # 503, not 500: discord.py retries 500/502/504 with sleeps, which would only hide this.
            response = _json_response({"message": f"fake Discord error: {exc!r}", "code": 0}, status=503)
        if response.status < 400:
            _rate_limit_headers(request, response)
        record.status = response.status
        self._changed()
        return response

    def fail_next(
        self,
        method: str,
        path_pattern: str,
        status: int,
        *,
        count: int = 1,
        retry_after: float = 0.2,
        code: int = 0,
        body_matches: Callable[[Any], bool] | None = None,
    ) -> None:
        """Answer the next `count` requests matching `method` and `path_pattern` (a regex over the
        path after /api/v10) with `status` and Discord error `code`: 429 is a rate limit with
        `retry_after`, 5xx an outage, 401 with code 50027 an expired interaction token.
        `body_matches`, given the request's JSON body (or None), narrows it to some requests,
        e.g. the edit that carries the end of an answer."""
        self._failures.append(
            [method.upper(), re.compile(path_pattern), status, count, retry_after, code, body_matches]
        )

    def stop_failing(self) -> None:
        """Forget the failures `fail_next` asked for that have not happened yet."""
        self._failures.clear()

    def _raise_injected_failure(self, method: str, path: str, body: Any = None) -> None:
        for failure in self._failures:
            wanted_method, pattern, status, count, retry_after, code, body_matches = failure
            if body_matches is not None and not body_matches(body):
                continue
            if count > 0 and method == wanted_method and pattern.search(path):
                failure[3] -= 1
                if status == 429:
                    raise ApiError(
                        429,
                        0,
                        "You are being rate limited.",
                        extra={"retry_after": retry_after, "global": False},
                    )
                raise ApiError(status, code, f"{status}: injected failure")

    async def _read_body(self, request: web.Request, record: RecordedRequest) -> None:
        if not request.body_exists:
            return
        if request.content_length is not None and request.content_length > UPLOAD_LIMIT + 1024 * 1024:
            raise ApiError(413, 40005, "Request entity too large")
        if request.content_type == "application/json":
            record.json = await request.json()
        elif request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            while True:
                part = await reader.next()
                if part is None:
                    break
                if part.name == "payload_json":
                    record.json = json.loads(await part.text())  # type: ignore[union-attr]
                else:
                    data = bytes(await part.read(decode=True))  # type: ignore[union-attr]
                    record.files.append(
                        UploadedFile(
                            field=str(part.name),
                            filename=getattr(part, "filename", None) or str(part.name),
                            content_type=part.headers.get("Content-Type", "application/octet-stream"),
                            data=data,
                        )
                    )
            if sum(len(f.data) for f in record.files) > UPLOAD_LIMIT:
                raise ApiError(413, 40005, "Request entity too large")

    @staticmethod
    def _body(request: web.Request) -> JSON:
        body = request[_RECORD].json
        return body if isinstance(body, dict) else {}

    @staticmethod
    def _files(request: web.Request) -> list[UploadedFile]:
        return list(request[_RECORD].files)

    @staticmethod
    def _id(request: web.Request, name: str) -> int:
        try:
            return int(request.match_info[name])
        except ValueError:
            raise ApiError(
                400, 50035, "Invalid Form Body", {name: {"_errors": [{"code": "NUMBER_TYPE_COERCE"}]}}
            ) from None

    def _add_routes(self, app: web.Application) -> None:
        p = API_PREFIX
        r = app.router
        r.add_get("/gateway", self._gateway)
        r.add_get("/gateway/", self._gateway)
        r.add_get("/attachments/{channel_id}/{attachment_id}/{filename}", self._cdn)
        for media_path in ("/external/{tail:.*}", "/stickers/{tail:.*}", "/elsewhere/{tail:.*}"):
            r.add_get(media_path, self._media)
        r.add_get(p + "/gateway", self._get_gateway)
        r.add_get(p + "/gateway/bot", self._get_gateway_bot)
        r.add_get(p + "/users/@me", self._get_me)
        r.add_get(p + "/users/{user_id}", self._get_user)
        r.add_post(p + "/users/@me/channels", self._create_dm)
        r.add_get(p + "/oauth2/applications/@me", self._get_application)
        r.add_get(p + "/applications/@me", self._get_application)
        for scope in ("/applications/{app_id}/commands", "/applications/{app_id}/guilds/{guild_id}/commands"):
            r.add_get(p + scope, self._get_commands)
            r.add_put(p + scope, self._put_commands)
            r.add_post(p + scope, self._post_command)
            r.add_delete(p + scope + "/{command_id}", self._delete_command)
        r.add_get(p + "/guilds/{guild_id}", self._get_guild)
        r.add_get(p + "/guilds/{guild_id}/channels", self._get_guild_channels)
        r.add_get(p + "/guilds/{guild_id}/members/{user_id}", self._get_member)
        r.add_get(p + "/guilds/{guild_id}/threads/active", self._get_active_threads)
        r.add_get(p + "/channels/{channel_id}", self._get_channel)
        r.add_get(p + "/channels/{channel_id}/messages", self._get_messages)
        r.add_post(p + "/channels/{channel_id}/messages", self._post_message)
        r.add_get(p + "/channels/{channel_id}/messages/{message_id}", self._get_message)
        r.add_patch(p + "/channels/{channel_id}/messages/{message_id}", self._patch_message)
        r.add_delete(p + "/channels/{channel_id}/messages/{message_id}", self._delete_message)
        r.add_put(
            p + "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me", self._add_reaction
        )
        r.add_delete(
            p + "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me", self._remove_reaction
        )
        r.add_post(p + "/channels/{channel_id}/typing", self._typing)
        r.add_post(p + "/channels/{channel_id}/messages/{message_id}/threads", self._thread_from_message)
        r.add_post(p + "/channels/{channel_id}/threads", self._thread_without_message)
        r.add_put(p + "/channels/{channel_id}/thread-members/@me", self._join_thread)
        r.add_delete(p + "/channels/{channel_id}/thread-members/@me", self._leave_thread)
        r.add_post(p + "/interactions/{interaction_id}/{token}/callback", self._interaction_callback)
        r.add_post(p + "/webhooks/{app_id}/{token}", self._followup)
        r.add_get(p + "/webhooks/{app_id}/{token}/messages/{message_id}", self._get_webhook_message)
        r.add_patch(p + "/webhooks/{app_id}/{token}/messages/{message_id}", self._patch_webhook_message)
        r.add_delete(p + "/webhooks/{app_id}/{token}/messages/{message_id}", self._delete_webhook_message)
        r.add_route("*", "/{tail:.*}", self._unknown)

    async def _unknown(self, request: web.Request) -> web.Response:
        route = f"{request.method} {request.path}"
        self.unknown_routes.append(route)
        log.warning("fake Discord has no route for %s", route)
        return _json_response({"message": f"404: Not Found ({route} is not faked)", "code": 0}, status=404)

    # ------------------------------------------------------------------ REST: identity

    async def _get_gateway(self, request: web.Request) -> web.Response:
        return _json_response({"url": self.gateway_url})

    async def _get_gateway_bot(self, request: web.Request) -> web.Response:
        return _json_response(
            {
                "url": self.gateway_url,
                "shards": 1,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 0,
                    "max_concurrency": 1,
                },
            }
        )

    async def _get_me(self, request: web.Request) -> web.Response:
        return _json_response({**self.bot_user, "verified": True, "mfa_enabled": False, "email": None})

    async def _get_user(self, request: web.Request) -> web.Response:
        user = self._users.get(self._id(request, "user_id"))
        if user is None:
            raise ApiError(404, 10013, "Unknown User")
        return _json_response(user)

    async def _get_application(self, request: web.Request) -> web.Response:
        return _json_response(
            {
                "id": str(self.application_id),
                "name": "SeeBot",
                "icon": None,
                "description": "",
                "rpc_origins": [],
                "bot_public": True,
                "bot_require_code_grant": False,
                "bot": copy.deepcopy(self.bot_user),
                "owner": copy.deepcopy(self.alice),
                "team": None,
                "verify_key": "00" * 32,
                "flags": 1 << 19,
                "interactions_endpoint_url": None,
                "redirect_uris": [],
                "approximate_guild_count": 1,
            }
        )

    # ------------------------------------------------------------------ REST: commands

    def _command_scope(self, request: web.Request) -> int | None:
        if self._id(request, "app_id") != self.application_id:
            raise ApiError(404, 10002, "Unknown Application")
        if "guild_id" in request.match_info:
            guild_id = self._id(request, "guild_id")
            if guild_id != self.guild_id:
                raise ApiError(404, 10004, "Unknown Guild")
            return guild_id
        return None

    def _register(self, scope: int | None, command: JSON, previous: Sequence[JSON]) -> JSON:
        """Store one command definition; an existing name keeps its id, as on Discord."""
        old = next((c for c in previous if c["name"] == command.get("name")), None)
        stored = {
            "type": 1,
            "description": "",
            "options": [],
            "default_member_permissions": None,
            "nsfw": False,
            **copy.deepcopy(command),
            "id": old["id"] if old else str(self._snowflake()),
            "application_id": str(self.application_id),
            "version": str(self._snowflake()),
        }
        if stored["default_member_permissions"] is not None:  # a bit set as a string, as Discord returns it
            stored["default_member_permissions"] = str(int(stored["default_member_permissions"]))
        if scope is not None:
            stored["guild_id"] = str(scope)
        return stored

    async def _get_commands(self, request: web.Request) -> web.Response:
        return _json_response(self.commands.get(self._command_scope(request), []))

    async def _put_commands(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        body = request[_RECORD].json
        if not isinstance(body, list):
            raise ApiError(400, 50035, "Invalid Form Body")
        previous = self.commands.get(scope, [])
        self.commands[scope] = [self._register(scope, c, previous) for c in body]
        self._changed()
        return _json_response(self.commands[scope])

    async def _post_command(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        previous = self.commands.get(scope, [])
        stored = self._register(scope, self._body(request), previous)
        self.commands[scope] = [c for c in previous if c["name"] != stored["name"]] + [stored]
        self._changed()
        return _json_response(stored, status=201)

    async def _delete_command(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        command_id = request.match_info["command_id"]
        self.commands[scope] = [c for c in self.commands.get(scope, []) if c["id"] != command_id]
        return web.Response(status=204)

    # ------------------------------------------------------------------ REST: guild, channels, DMs

    def _check_guild(self, request: web.Request) -> None:
        if self._id(request, "guild_id") != self.guild_id:
            raise ApiError(404, 10004, "Unknown Guild")

    async def _get_guild(self, request: web.Request) -> web.Response:
        self._check_guild(request)
        return _json_response(self._guild_payload(full=False))

    async def _get_guild_channels(self, request: web.Request) -> web.Response:
        self._check_guild(request)
        return _json_response(list(self.channels.values()))

    async def _get_member(self, request: web.Request) -> web.Response:
        self._check_guild(request)
        user_id = self._id(request, "user_id")
        if user_id not in self._members:
            raise ApiError(404, 10007, "Unknown Member")
        return _json_response(self._member_payload(user_id))

    async def _get_active_threads(self, request: web.Request) -> web.Response:
        self._check_guild(request)
        threads = [
            self._thread_payload(t, with_member=False) for t in self._threads.values() if not t["archived"]
        ]
        members = [
            {"id": t["id"], "user_id": self.bot_user["id"], "join_timestamp": _iso(t["created"]), "flags": 1}
            for t in self._threads.values()
            if not t["archived"] and self.bot_user["id"] in t["members"]
        ]
        return _json_response({"threads": threads, "members": members})

    async def _get_channel(self, request: web.Request) -> web.Response:
        return _json_response(self._channel_payload(self._id(request, "channel_id")))

    async def _create_dm(self, request: web.Request) -> web.Response:
        recipient = self._body(request).get("recipient_id")
        try:
            user_id = int(recipient)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise _form_error("recipient_id", "NUMBER_TYPE_COERCE", "Value is not snowflake.") from None
        if user_id not in self._users:
            raise ApiError(404, 10013, "Unknown User")
        return _json_response(copy.deepcopy(self._get_or_create_dm(user_id)))

    # ------------------------------------------------------------------ REST: messages

    def _require_channel(self, request: web.Request) -> int:
        channel_id = self._id(request, "channel_id")
        self._channel_payload(channel_id)  # raises Unknown Channel
        return channel_id

    async def _get_messages(self, request: web.Request) -> web.Response:
        channel_id = self._require_channel(request)
        query = request.query
        try:
            limit = int(query.get("limit", 50))
        except ValueError:
            raise _form_error("limit", "NUMBER_TYPE_COERCE", "Value is not int.") from None
        if not 1 <= limit <= 100:
            raise _form_error("limit", "NUMBER_TYPE_MAX", "int value should be between 1 and 100.")
        ids = sorted(
            mid
            for mid in self._channel_messages.get(channel_id, [])
            if not self._messages[mid].get("flags", 0) & FLAG_EPHEMERAL
        )
        if "before" in query:
            chosen = [m for m in ids if m < int(query["before"])][-limit:]
        elif "after" in query:
            chosen = [m for m in ids if m > int(query["after"])][:limit]
        elif "around" in query:
            around = int(query["around"])
            first_newer = next((i for i, m in enumerate(ids) if m >= around), len(ids))
            start = max(0, first_newer - limit // 2)
            chosen = ids[start : start + limit]
        else:
            chosen = ids[-limit:]
        return _json_response([self._render(self._messages[m]) for m in reversed(chosen)])

    async def _get_message(self, request: web.Request) -> web.Response:
        channel_id = self._require_channel(request)
        message = self._require_message(self._id(request, "message_id"), channel_id)
        if message.get("flags", 0) & FLAG_EPHEMERAL:
            raise ApiError(404, 10008, "Unknown Message")
        return _json_response(self._render(message))

    async def _post_message(self, request: web.Request) -> web.Response:
        channel_id = self._require_channel(request)
        if channel_id in self._threads and self._threads[channel_id]["archived"]:
            self._threads[channel_id]["archived"] = False
        message = await self._bot_creates_message(
            channel_id, self._body(request), self._files(request), kind="create"
        )
        return _json_response(self._render(message))

    async def _patch_message(self, request: web.Request) -> web.Response:
        channel_id = self._require_channel(request)
        message = self._require_message(self._id(request, "message_id"), channel_id)
        body = self._body(request)
        if message["author"]["id"] != self.bot_user["id"] and set(body) - {"flags"}:
            raise ApiError(403, 50005, "Cannot edit a message authored by another user")
        await self._bot_edits_message(message, body, self._files(request), kind="edit")
        return _json_response(self._render(message))

    async def _delete_message(self, request: web.Request) -> web.Response:
        channel_id = self._require_channel(request)
        await self._delete(self._require_message(self._id(request, "message_id"), channel_id))
        return web.Response(status=204)

    async def _add_reaction(self, request: web.Request) -> web.Response:
        channel_id = self._require_channel(request)
        message = self._require_message(self._id(request, "message_id"), channel_id)
        emoji = request.match_info["emoji"]
        name, _, emoji_id = emoji.partition(":")
        reactions = message.setdefault("reactions", [])
        for reaction in reactions:
            if reaction["emoji"]["name"] == name:
                if not reaction["me"]:
                    reaction["me"] = True
                    reaction["count"] += 1
                break
        else:
            reactions.append(
                {
                    "count": 1,
                    "count_details": {"burst": 0, "normal": 1},
                    "me": True,
                    "me_burst": False,
                    "burst_colors": [],
                    "emoji": {"id": emoji_id or None, "name": name},
                }
            )
        return web.Response(status=204)

    async def _remove_reaction(self, request: web.Request) -> web.Response:
        channel_id = self._require_channel(request)
        message = self._require_message(self._id(request, "message_id"), channel_id)
        name = request.match_info["emoji"].partition(":")[0]
        for reaction in list(message.get("reactions", [])):
            if reaction["emoji"]["name"] == name and reaction["me"]:
                reaction["me"] = False
                reaction["count"] -= 1
                if reaction["count"] == 0:
                    message["reactions"].remove(reaction)
        return web.Response(status=204)

    async def _typing(self, request: web.Request) -> web.Response:
        channel_id = self._require_channel(request)
        self.typing_events.append(TypingEvent(channel_id, int(self.bot_user["id"]), time.monotonic()))
        return web.Response(status=204)

    # ------------------------------------------------------------------ REST: threads

    async def _thread_from_message(self, request: web.Request) -> web.Response:
        channel_id = self._require_channel(request)
        message_id = self._id(request, "message_id")
        self._require_message(message_id, channel_id)
        if message_id in self._threads:
            raise ApiError(400, 160004, "A thread has already been created for this message")
        body = self._body(request)
        payload = await self._create_thread(
            channel_id,
            thread_id=message_id,
            name=body.get("name"),
            thread_type=PUBLIC_THREAD,
            auto_archive=body.get("auto_archive_duration"),
            slowmode=body.get("rate_limit_per_user"),
        )
        return _json_response(payload, status=201)

    async def _thread_without_message(self, request: web.Request) -> web.Response:
        channel_id = self._require_channel(request)
        body = self._body(request)
        thread_type = int(body.get("type") or PRIVATE_THREAD)
        if thread_type not in (PUBLIC_THREAD, PRIVATE_THREAD):
            raise _form_error("type", "BASE_TYPE_CHOICES", "Value must be one of {11, 12}.")
        payload = await self._create_thread(
            channel_id,
            thread_id=self._snowflake(),
            name=body.get("name"),
            thread_type=thread_type,
            auto_archive=body.get("auto_archive_duration"),
            slowmode=body.get("rate_limit_per_user"),
        )
        return _json_response(payload, status=201)

    async def _join_thread(self, request: web.Request) -> web.Response:
        thread = self._threads.get(self._id(request, "channel_id"))
        if thread is None:
            raise ApiError(404, 10003, "Unknown Channel")
        if self.bot_user["id"] not in thread["members"]:
            thread["members"].append(self.bot_user["id"])
        return web.Response(status=204)

    async def _leave_thread(self, request: web.Request) -> web.Response:
        thread = self._threads.get(self._id(request, "channel_id"))
        if thread is None:
            raise ApiError(404, 10003, "Unknown Channel")
        if self.bot_user["id"] in thread["members"]:
            thread["members"].remove(self.bot_user["id"])
        return web.Response(status=204)

    # ------------------------------------------------------------------ REST: interactions and webhooks

    def _interaction_message_extra(self, record: InteractionRecord) -> JSON:
        user = copy.deepcopy(self._users[record.user_id])
        if record.component_message_id is not None:
            return {
                "webhook_id": str(self.application_id),
                "application_id": str(self.application_id),
                "interaction_metadata": {
                    "id": str(record.id),
                    "type": INTERACTION_MESSAGE_COMPONENT,
                    "user": user,
                    "authorizing_integration_owners": record.payload.get(
                        "authorizing_integration_owners", {}
                    ),
                    "interacted_message_id": str(record.component_message_id),
                },
            }
        return {
            "webhook_id": str(self.application_id),
            "application_id": str(self.application_id),
            "interaction_metadata": {
                "id": str(record.id),
                "type": 2,
                "name": record.command_name,
                "command_type": record.payload.get("data", {}).get("type", 1),
                "user": user,
                "authorizing_integration_owners": record.payload.get("authorizing_integration_owners", {}),
            },
            "interaction": {"id": str(record.id), "type": 2, "name": record.command_name, "user": user},
        }

    async def _interaction_callback(self, request: web.Request) -> web.Response:
        record = self.interactions.get(self._id(request, "interaction_id"))
        if record is None or record.token != request.match_info["token"]:
            raise ApiError(404, 10062, "Unknown interaction")
        if record.responded:
            raise ApiError(400, 40060, "Interaction has already been acknowledged.")
        late = time.monotonic() - record.created_at
        if self.interaction_ack_timeout is not None and late > self.interaction_ack_timeout:
            log.warning("interaction %s acknowledged after %.2fs: Unknown interaction", record.id, late)
            raise ApiError(404, 10062, "Unknown interaction")
        body = self._body(request)
        callback_type = body.get("type")
        data = body.get("data") or {}
        ephemeral = int(data.get("flags") or 0) & FLAG_EPHEMERAL
        message: JSON | None = None
        # The response to a button press is a reply to the button's message (without a ping).
        component = record.component_message_id is not None
        msg_type = MSG_REPLY if component else MSG_CHAT_INPUT_COMMAND
        extra = self._interaction_message_extra(record)
        if component:
            extra["message_reference"] = {
                "type": 0,
                "message_id": str(record.component_message_id),
                "channel_id": str(record.channel_id),
                **({"guild_id": record.payload["guild_id"]} if "guild_id" in record.payload else {}),
            }
        if callback_type in (CB_DEFERRED_UPDATE_MESSAGE, CB_UPDATE_MESSAGE) and not component:
            raise _form_error(
                "type",
                "BASE_TYPE_CHOICES",
                f"Interaction callback type {callback_type} is only valid for component interactions.",
            )
        if callback_type == CB_CHANNEL_MESSAGE:
            message = await self._bot_creates_message(
                record.channel_id,
                {**data, "flags": int(data.get("flags") or 0)},
                self._files(request),
                kind="interaction_response",
                msg_type=msg_type,
                extra={**extra, "flags": ephemeral},
            )
        elif callback_type == CB_DEFERRED_CHANNEL_MESSAGE:
            message = self._new_message(record.channel_id, self.bot_user, "", msg_type=msg_type)
            message.update(extra)
            message["flags"] = FLAG_LOADING | ephemeral
            self._store_message(message)
            await self._dispatch_message("MESSAGE_CREATE", message)
            record.loading = True
        elif callback_type == CB_UPDATE_MESSAGE:
            target = self._require_message(int(record.component_message_id or 0))
            message = await self._bot_edits_message(
                target, data, self._files(request), kind="interaction_update"
            )
            ephemeral = target.get("flags", 0) & FLAG_EPHEMERAL
        elif callback_type == CB_MODAL:
            if record.payload["type"] == INTERACTION_MODAL_SUBMIT:
                raise ApiError(400, 40060, "Interaction has already been acknowledged.")
            _check_modal(data)
            record.modal = copy.deepcopy(data)
        elif callback_type not in (CB_PONG, CB_DEFERRED_UPDATE_MESSAGE, 8, 12):
            raise _form_error(
                "type", "BASE_TYPE_CHOICES", f"Unknown interaction callback type {callback_type!r}."
            )
        record.response_type = int(callback_type)
        record.responded_at = time.monotonic()
        if message is not None:
            record.original_message_id = int(message["id"])
        elif callback_type == CB_DEFERRED_UPDATE_MESSAGE:
            record.original_message_id = record.component_message_id  # @original: the button's message
        self._changed()
        if "with_response" not in request.query or request.query["with_response"].lower() in ("0", "false"):
            return web.Response(status=204)
        # discord.py >= 2.5 always asks with_response=1 and reads this InteractionCallbackResponse.
        interaction: JSON = {
            "id": str(record.id),
            "type": record.payload["type"],
            "response_message_loading": callback_type == CB_DEFERRED_CHANNEL_MESSAGE,
            "response_message_ephemeral": bool(ephemeral),
        }
        resource: JSON = {"type": callback_type}
        if message is not None:
            interaction["response_message_id"] = message["id"]
            resource["message"] = self._render(message)
        return _json_response({"interaction": interaction, "resource": resource})

    def _interaction_for_webhook(self, request: web.Request) -> InteractionRecord:
        if self._id(request, "app_id") != self.application_id:
            raise ApiError(404, 10015, "Unknown Webhook")
        record = self._interactions_by_token.get(request.match_info["token"])
        if record is None:
            raise ApiError(401, 50027, "Invalid Webhook Token")
        return record

    def _webhook_message(self, request: web.Request, record: InteractionRecord) -> JSON:
        target = request.match_info["message_id"]
        if target == "@original":
            if record.original_message_id is None:
                raise ApiError(404, 10008, "Unknown Message")
            message_id = record.original_message_id
        else:
            message_id = self._id(request, "message_id")
            if message_id != record.original_message_id and message_id not in record.followup_message_ids:
                raise ApiError(404, 10008, "Unknown Message")
        return self._require_message(message_id)

    async def _followup(self, request: web.Request) -> web.Response:
        record = self._interaction_for_webhook(request)
        if not record.responded:
            raise ApiError(404, 10015, "Unknown Webhook")
        body = self._body(request)
        files = self._files(request)
        if record.loading and record.original_message_id is not None:
            # The first follow-up after a deferral fills the "thinking..." message itself.
            message = self._require_message(record.original_message_id)
            message["flags"] = message.get("flags", 0) & FLAG_EPHEMERAL
            self._apply_body(message, body, files, creating=True)
            self._record_write("followup", message, body)
            record.loading = False
            await self._dispatch_message("MESSAGE_UPDATE", message)
        else:
            flags = int(body.get("flags") or 0)
            message = await self._bot_creates_message(
                record.channel_id,
                {**body, "flags": flags},
                files,
                kind="followup",
                extra={**self._interaction_message_extra(record), "flags": flags & FLAG_EPHEMERAL},
            )
            record.followup_message_ids.append(int(message["id"]))
        self._changed()
        if request.query.get("wait", "").lower() in ("1", "true"):
            return _json_response(self._render(message))
        return web.Response(status=204)

    async def _get_webhook_message(self, request: web.Request) -> web.Response:
        record = self._interaction_for_webhook(request)
        return _json_response(self._render(self._webhook_message(request, record)))

    async def _patch_webhook_message(self, request: web.Request) -> web.Response:
        record = self._interaction_for_webhook(request)
        message = self._webhook_message(request, record)
        if record.loading and int(message["id"]) == record.original_message_id:
            # Editing the deferred response replaces the "thinking..." state.
            message["flags"] = message.get("flags", 0) & FLAG_EPHEMERAL
            record.loading = False
        await self._bot_edits_message(message, self._body(request), self._files(request), kind="edit")
        return _json_response(self._render(message))

    async def _delete_webhook_message(self, request: web.Request) -> web.Response:
        record = self._interaction_for_webhook(request)
        message = self._webhook_message(request, record)
        await self._delete(message)
        if int(message["id"]) == record.original_message_id:
            record.loading = False  # the next follow-up is a message of its own (and may be ephemeral)
        return web.Response(status=204)

    # ------------------------------------------------------------------ CDN

    async def _cdn(self, request: web.Request) -> web.Response:
        try:
            stored = self._cdn_files.get(int(request.match_info["attachment_id"]))
        except ValueError:
            stored = None
        if stored is None or stored[2] != request.match_info["filename"]:
            return web.Response(status=404, text="Not Found")
        data, content_type, filename = stored
        if filename in self._cdn_overrides:
            status, body, delay = self._cdn_overrides[filename]
            if delay:
                await asyncio.sleep(delay)  # cancelled when the client disconnects
            if status != 200:
                return web.Response(status=status, text="Not Found" if status == 404 else "Error")
            data = data if body is None else body
        return web.Response(body=data, content_type=content_type.split(";")[0])

    # ------------------------------------------------------------------ media, message commands, modals

    @property
    def other_host_url(self) -> str:
        """A second origin the fake listens on: a host a user chose (not Discord's)."""
        if self._other_port is None:
            raise RuntimeError("FakeDiscord is not started")
        return f"http://127.0.0.1:{self._other_port}"

    def requests_for(self, path_prefix: str, *, host: str | None = None) -> list[HttpRequest]:
        """Every request (any port, unless ``host``) whose path starts with ``path_prefix``."""
        return [
            r
            for r in self.http_requests
            if r.path.startswith(path_prefix) and (host is None or r.host == host)
        ]

    def _serve(self, url: str, data: bytes, content_type: str) -> str:
        parsed = re.match(r"http://(127\.0\.0\.1:\d+)(/.*)", url)
        if parsed is None:
            raise ValueError(f"the fake serves only its own origins, not {url}")
        self._media_files[parsed.group(1) + parsed.group(2)] = (data, content_type)
        return url

    def elsewhere(self, name: str, data: bytes, content_type: str = "image/png") -> str:
        """Serve ``data`` on :attr:`other_host_url` (every request for it is recorded)."""
        return self._serve(f"{self.other_host_url}/elsewhere/{quote(name)}", data, content_type)

    @staticmethod
    def image_embed(
        url: str, proxy_url: str | None, data: bytes | None = None, *, field: str = "thumbnail",
        content_type: str = "image/png",
    ) -> JSON:
        """An embed as Discord makes it: a pasted image link unfurls into ``type: image`` with a
        ``thumbnail`` (``field="image"``: a rich embed's large image) whose ``proxy_url`` is
        Discord's media proxy."""
        media: JSON = {"url": url, "flags": 0}
        if proxy_url is not None:
            media["proxy_url"] = proxy_url
        size = _image_size(data) if data is not None else None
        if size is not None:
            media["width"], media["height"] = size
            media["content_type"] = content_type
        embed: JSON = {"type": "image" if field == "thumbnail" else "rich", "url": url, field: media}
        return embed

    def proxied_image(self, url: str, data: bytes, content_type: str = "image/png", **kw: Any) -> JSON:
        """The embed Discord makes for a link to an image at ``url``, its bytes on the media proxy."""
        scheme, _, rest = url.partition("://")
        proxy = f"{self.base_url}/external/{secrets.token_urlsafe(8)}/{scheme}/{rest}"
        self._serve(proxy, data, content_type)
        return self.image_embed(url, proxy, data, content_type=content_type, **kw)

    async def unfurl(self, message_id: int, embeds: Sequence[JSON]) -> JSON:
        """Discord's unfurl of a message's links: its embeds set, then MESSAGE_UPDATE (a full
        message object, without ``edited_timestamp`` changing)."""
        message = self._messages[message_id]
        message["embeds"] = copy.deepcopy(list(embeds))
        await self._dispatch_message("MESSAGE_UPDATE", message)
        self._changed()
        return self._render(message)

    def add_sticker(self, name: str, data: bytes, format_type: int = 1) -> JSON:
        """A sticker (format 1 PNG, 2 APNG, 3 LOTTIE, 4 GIF) served where discord.py looks for it
        (``/stickers/{id}.{ext}`` on the media host); returns the message's sticker item."""
        sticker_id = self._snowflake()
        extension = STICKER_EXTENSIONS[format_type]
        content_type = {"png": "image/png", "gif": "image/gif"}.get(extension, "application/json")
        self._serve(f"{self.base_url}/stickers/{sticker_id}.{extension}", data, content_type)
        return {"id": str(sticker_id), "name": name, "format_type": format_type}

    async def _media(self, request: web.Request) -> web.Response:
        stored = self._media_files.get(request.host + request.path)
        if stored is None:
            return web.Response(status=404, text="Not Found")
        data, content_type = stored
        return web.Response(body=data, content_type=content_type)

    async def invoke_message_command(
        self, user: UserLike, channel_id: int, name: str, target_message_id: int, *, locale: str = "en-US"
    ) -> InteractionRecord:
        """A user picks a message command (Apps, on a message's context menu): INTERACTION_CREATE
        of type 2 whose ``data`` has ``type`` 3, ``target_id`` and the message in ``resolved``."""
        invoker = self._resolve_user(user)
        self._check_can_post(invoker, channel_id)
        in_guild = self._is_guild_channel(channel_id)
        scopes: list[int | None] = [self.guild_id, None] if in_guild else [None]
        command, scope = next(
            (
                (c, sc)
                for sc in scopes
                for c in self.commands.get(sc, [])
                if c["name"] == name and c.get("type") == COMMAND_MESSAGE
            ),
            (None, None),
        )
        if command is None:
            raise LookupError(f"the bot has not registered the message command {name!r}")
        target = self._require_message(target_message_id, channel_id)
        data: JSON = {
            "id": command["id"],
            "name": command["name"],
            "type": COMMAND_MESSAGE,
            "target_id": target["id"],
            "resolved": {"messages": {target["id"]: self._render(target)}},
        }
        if scope is not None:
            data["guild_id"] = str(scope)
        return await self._new_interaction(invoker, channel_id, 2, data, name, locale)

    async def submit_modal(
        self, shown: InteractionRecord, values: Mapping[str, str], *, locale: str = "en-US"
    ) -> InteractionRecord:
        """The user fills in and submits the modal the bot showed for ``shown`` (callback type 9):
        INTERACTION_CREATE of type 5 with the modal's ``custom_id`` and each text input's value
        (by custom_id), in the component layout the bot sent. Raises ``ValueError`` for a value
        Discord's client would not let through (length, required)."""
        if shown.modal is None:
            raise ValueError(f"interaction {shown.id} showed no modal")
        rows: list[JSON] = []
        for component in shown.modal["components"]:
            inner = _modal_input(component)
            value = values.get(inner["custom_id"], inner.get("value") or "")
            if not int(inner.get("min_length", 0)) <= len(value) <= int(inner.get("max_length", 4000)):
                raise ValueError(f"{inner['custom_id']}: {len(value)} characters is outside its limits")
            if inner.get("required", True) and not value:
                raise ValueError(f"{inner['custom_id']} is required")
            submitted = {"type": COMPONENT_TEXT_INPUT, "custom_id": inner["custom_id"], "value": value}
            if component["type"] == COMPONENT_ACTION_ROW:
                rows.append({"type": COMPONENT_ACTION_ROW, "components": [submitted]})
            else:
                rows.append({"type": COMPONENT_LABEL, "component": submitted})
        data = {"custom_id": shown.modal["custom_id"], "components": rows}
        invoker = self._users[shown.user_id]
        record = await self._new_interaction(
            invoker, shown.channel_id, INTERACTION_MODAL_SUBMIT, data, shown.command_name, locale
        )
        return record

    async def _new_interaction(
        self, invoker: JSON, channel_id: int, kind: int, data: JSON, name: str, locale: str
    ) -> InteractionRecord:
        in_guild = self._is_guild_channel(channel_id)
        interaction_id = self._snowflake()
        token = "aW50ZXJhY3Rpb24" + secrets.token_urlsafe(48)
        payload: JSON = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": kind,
            "data": data,
            "channel_id": str(channel_id),
            "channel": {**self._channel_payload(channel_id), "permissions": ALL_PERMISSIONS},
            "token": token,
            "version": 1,
            "app_permissions": ALL_PERMISSIONS,
            "locale": locale,
            "entitlements": [],
            "attachment_size_limit": UPLOAD_LIMIT,
            "authorizing_integration_owners": {"0": str(self.guild_id)},
        }
        if in_guild:
            payload.update(
                guild_id=str(self.guild_id),
                guild={"id": str(self.guild_id), "locale": "en-US", "features": []},
                guild_locale="en-US",
                member=self._member_payload(int(invoker["id"]), permissions=True),
                context=0,
            )
        else:
            payload.update(user=copy.deepcopy(invoker), context=1)
        record = InteractionRecord(
            id=interaction_id,
            token=token,
            channel_id=channel_id,
            user_id=int(invoker["id"]),
            command_name=name,
            payload=payload,
            created_at=time.monotonic(),
        )
        return await self._deliver_interaction(record)

    def attachment_data(self, attachment: Mapping[str, Any]) -> bytes:
        """The bytes of an attachment (one the bot uploaded, too) as the CDN serves them."""
        return self._cdn_files[int(attachment["id"])][0]


def _rate_limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """What Discord puts on every API response: the route's bucket and what is left of it.

    Without them discord.py assumes one request at a time per route with no known reset; a
    request cancelled while it refreshes that guess then holds the next request on the route
    for its 30-second fallback. The fake never limits (see ``fail_next`` for 429s), so it
    always says 4 of 5 are left, for a second.
    """
    if response.prepared:  # a websocket or a streamed body: its headers are gone
        return
    route = request.match_info.route.resource
    template = route.canonical if route is not None else request.path
    response.headers["X-RateLimit-Limit"] = "5"
    response.headers["X-RateLimit-Remaining"] = "4"
    response.headers["X-RateLimit-Reset"] = f"{time.time() + 1:.3f}"
    response.headers["X-RateLimit-Reset-After"] = "1.000"
    bucket = hashlib.sha1(f"{request.method} {template}".encode()).hexdigest()[:16]
    response.headers["X-RateLimit-Bucket"] = bucket


def _guess_type(upload: UploadedFile) -> str:
    """discord.py uploads every file as application/octet-stream; Discord sniffs the type."""
    if upload.content_type and upload.content_type != "application/octet-stream":
        return upload.content_type
    data = upload.data
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "application/octet-stream"
    return "text/plain; charset=utf-8"


def _modal_input(component: Any) -> Any:
    """The text input of a modal's top-level component: in an action row (1) or a label (18)."""
    if not isinstance(component, dict):
        return None
    if component.get("type") == COMPONENT_ACTION_ROW:
        return (component.get("components") or [None])[0]
    return component.get("component")


def _check_modal(data: Any) -> None:
    """Discord's checks on a modal: a custom_id, a title of 1-45 characters, 1-5 components,
    each a text input (in an action row or a label) with a custom_id and a label."""
    if not isinstance(data, dict) or not data.get("custom_id"):
        raise _form_error("data.custom_id", "BASE_TYPE_REQUIRED", "This field is required")
    if not 1 <= len(str(data.get("title") or "")) <= 45:
        raise _form_error("data.title", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 45 in length.")
    components = data.get("components")
    if not isinstance(components, list) or not 1 <= len(components) <= 5:
        raise _form_error("data.components", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 5 in length.")
    for component in components:
        inner = _modal_input(component)
        text_input = isinstance(inner, dict) and inner.get("type") == COMPONENT_TEXT_INPUT
        if not text_input or not inner.get("custom_id"):
            raise _form_error("data.components", "UNION_TYPE_CHOICES", "Only text inputs are faked.")
        if component.get("type") == 1 and not inner.get("label"):
            raise _form_error("data.components", "BASE_TYPE_REQUIRED", "A text input needs a label.")


def _walk_components(components: Iterable[Any]) -> Iterable[JSON]:
    """Every component dict, depth first: rows, their children, v2 containers and accessories."""
    for component in components:
        if not isinstance(component, dict):
            continue
        yield component
        yield from _walk_components(component.get("components") or [])
        accessory = component.get("accessory")
        if isinstance(accessory, dict):
            yield from _walk_components([accessory])


def _component_error(path: Sequence[str | int], code: str, message: str) -> ApiError:
    """Invalid Form Body (50035) for one nested field, e.g. ``components.0.components.1.custom_id``."""
    errors: JSON = {"_errors": [{"code": code, "message": message}]}
    for key in reversed(path):
        errors = {str(key): errors}
    return ApiError(400, 50035, "Invalid Form Body", errors)


def _check_components(components: Any, flags: int) -> None:
    """Discord's checks on legacy components: up to 5 action rows of up to 5 buttons or 1 select.

    Buttons need a style, a ``custom_id`` of 1-100 characters (link buttons a ``url``
    instead) and a label of at most 80; custom ids are unique in a message. Layout
    components (flag IS_COMPONENTS_V2) are only checked for unique custom ids.
    """
    if not isinstance(components, list):
        raise _component_error(
            ["components"], "LIST_TYPE_CONVERT", "Only iterables may be used in a ListType"
        )
    if not flags & FLAG_COMPONENTS_V2:
        if len(components) > MAX_ROWS:
            raise _component_error(
                ["components"], "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_ROWS} or fewer in length."
            )
        for r, row in enumerate(components):
            if not isinstance(row, dict) or row.get("type") != COMPONENT_ACTION_ROW:
                raise _component_error(
                    ["components", r, "type"],
                    "UNION_TYPE_CHOICES",
                    'Value of field "type" must be one of (1,).',
                )
            items = row.get("components")
            if not isinstance(items, list) or not 1 <= len(items) <= MAX_ROW_ITEMS:
                raise _component_error(
                    ["components", r, "components"],
                    "BASE_TYPE_BAD_LENGTH",
                    f"Must be between 1 and {MAX_ROW_ITEMS} in length.",
                )
            for i, item in enumerate(items):
                where = ["components", r, "components", i]
                kind = item.get("type") if isinstance(item, dict) else None
                if kind in SELECT_TYPES and len(items) != 1:
                    raise _component_error(
                        where,
                        "COMPONENT_LAYOUT_WIDTH_EXCEEDED",
                        "The specified component exceeds the maximum width",
                    )
                if kind not in SELECT_TYPES and kind != COMPONENT_BUTTON:
                    raise _component_error(
                        [*where, "type"], "UNION_TYPE_CHOICES", f'Value of field "type" is invalid: {kind!r}.'
                    )
                if kind != COMPONENT_BUTTON:
                    continue
                style = item.get("style")
                if style not in range(1, 7):
                    raise _component_error(
                        [*where, "style"], "BASE_TYPE_CHOICES", "Value must be one of {1..6}."
                    )
                if style == BUTTON_LINK and (not item.get("url") or item.get("custom_id")):
                    raise _component_error(
                        where, "BUTTON_COMPONENT_INVALID", "A link button needs a url and no custom_id."
                    )
                if style not in (BUTTON_LINK, BUTTON_PREMIUM) and not item.get("custom_id"):
                    raise _component_error(
                        [*where, "custom_id"], "BASE_TYPE_REQUIRED", "This field is required"
                    )
                if len(str(item.get("label") or "")) > MAX_BUTTON_LABEL:
                    raise _component_error(
                        [*where, "label"],
                        "BASE_TYPE_MAX_LENGTH",
                        f"Must be {MAX_BUTTON_LABEL} or fewer in length.",
                    )
    seen: set[str] = set()
    for component in _walk_components(components):
        custom_id = component.get("custom_id")
        if custom_id is None:
            continue
        if not 1 <= len(str(custom_id)) <= MAX_CUSTOM_ID:
            raise _component_error(
                ["components"],
                "BASE_TYPE_BAD_LENGTH",
                f"custom_id must be between 1 and {MAX_CUSTOM_ID} in length.",
            )
        if custom_id in seen:
            raise _component_error(
                ["components"], "COMPONENT_CUSTOM_ID_DUPLICATED", "Component custom id cannot be duplicated"
            )
        seen.add(custom_id)
