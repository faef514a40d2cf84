"""What the bot remembers across restarts, in SQLite: per-server settings and daily counts.

Every call runs on one thread of its own (the standard library's `sqlite3` blocks), so the
event loop never waits on the disk and writes never race. The database is `seebot.db` in
`DATA_DIR`, in WAL mode, with a `schema_version` table and numbered migrations.

A database that cannot be used (locked, corrupt, a folder the bot may not write) never stops
the bot: `open` logs one clear line and carries on with an in-memory database, so the
environment's defaults apply and daily counts hold until the next restart; setting changes
then raise `NotSaved`, so the admin is told instead of losing them silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

DATABASE_NAME = "seebot.db"
PROMPT_USES = ("ocr", "describe", "compare")

# Migration N brings the schema from version N - 1 to N; append, never edit.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE server_settings (
        guild_id INTEGER NOT NULL,
        name TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (guild_id, name)
    );
    CREATE TABLE server_channels (
        guild_id INTEGER NOT NULL,
        channel_id INTEGER NOT NULL,
        PRIMARY KEY (guild_id, channel_id)
    );
    CREATE TABLE daily_questions (
        guild_id INTEGER NOT NULL,
        user_id INTEGER NOT NULL,
        day TEXT NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (guild_id, user_id, day)
    );
    """,
)


class NotSaved(Exception):
    """A setting change could not be written; the message says why, for the admin."""


@dataclass(frozen=True)
class ServerRecord:
    """What one server changed from the defaults (absent: the environment's value)."""

    channels: frozenset[int] = frozenset()
    prompts: dict[str, str] = field(default_factory=dict)
    daily_quota: int | None = None


class Storage:
    def __init__(self, data_dir: Path, *, busy_timeout: float = 1.0) -> None:
        self.path = data_dir / DATABASE_NAME
        self._busy_timeout = busy_timeout
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="storage")
        self._db: sqlite3.Connection | None = None
        self._closed = False
        # None while the file is in use; else why it is not (settings cannot be saved).
        self.problem: str | None = None

    @property
    def persistent(self) -> bool:
        return self.problem is None

    async def _run(self, job: Callable[[], T]) -> T:
        if self._closed:  # shutting down: a late question is let through, a change not saved
            raise sqlite3.OperationalError("the database is closed")
        return await asyncio.get_running_loop().run_in_executor(self._thread, job)

    async def open(self) -> None:
        """Open (creating DATA_DIR and the schema) or fall back to memory; never raises."""
        try:
            await self._run(self._open_file)
        except (OSError, sqlite3.Error, ValueError) as error:
            self.problem = f"cannot use the database {self.path} ({error})"
            log.error(
                "%s: using the environment's defaults; server settings cannot be changed and daily "
                "question counts last until a restart",
                self.problem,
            )
            await self._run(self._open_memory)

    def _open_file(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":  # e.g. a network file system: slower, still correct
                log.warning("%s: WAL mode is not available here, journal mode %s", self.path, mode)
            db.execute("PRAGMA synchronous=NORMAL")  # with WAL: no fsync per commit, still consistent
            _migrate(db)
        except BaseException:
            db.close()
            raise
        self._db = db
        log.info("settings and daily counts in %s", self.path)

    def _open_memory(self) -> None:
        db = sqlite3.connect(":memory:", isolation_level=None)
        _migrate(db)
        self._db = db

    async def close(self) -> None:
        """Close the database and its thread; later calls do nothing."""
        if self._closed:
            return

        def close_db() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(close_db)
        self._closed = True
        self._thread.shutdown(wait=True)

    @property
    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.OperationalError("the database is not open")
        return self._db

    # --- server settings -----------------------------------------------------------------

    async def load_servers(self) -> dict[int, ServerRecord]:
        """Every server's changes; empty (the defaults) if they cannot be read."""
        try:
            return await self._run(self._load_servers)
        except sqlite3.Error as error:
            log.error("cannot read server settings from %s (%s): using the defaults", self.path, error)
            return {}

    def _load_servers(self) -> dict[int, ServerRecord]:
        db = self._connection
        channels: dict[int, set[int]] = {}
        for guild_id, channel_id in db.execute("SELECT guild_id, channel_id FROM server_channels"):
            channels.setdefault(guild_id, set()).add(channel_id)
        values: dict[int, dict[str, str]] = {}
        for guild_id, name, value in db.execute("SELECT guild_id, name, value FROM server_settings"):
            values.setdefault(guild_id, {})[name] = value
        servers = {}
        for guild_id in channels.keys() | values.keys():
            named = values.get(guild_id, {})
            quota = named.get("daily_quota")
            servers[guild_id] = ServerRecord(
                channels=frozenset(channels.get(guild_id, ())),
                prompts={use: named[f"prompt_{use}"] for use in PROMPT_USES if f"prompt_{use}" in named},
                daily_quota=int(quota) if quota is not None else None,
            )
        return servers

    async def save_value(self, guild_id: int, name: str, value: str | None) -> None:
        """Set (or with None, forget) one named setting of a server, or raise `NotSaved`."""

        def save(db: sqlite3.Connection) -> None:
            if value is None:
                db.execute("DELETE FROM server_settings WHERE guild_id = ? AND name = ?", (guild_id, name))
            else:
                db.execute(
                    "INSERT INTO server_settings (guild_id, name, value) VALUES (?, ?, ?) "
                    "ON CONFLICT (guild_id, name) DO UPDATE SET value = excluded.value",
                    (guild_id, name, value),
                )

        await self._write(save)

    async def save_channels(self, guild_id: int, channels: frozenset[int]) -> None:
        """Replace a server's channel list, or raise `NotSaved`."""

        def save(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM server_channels WHERE guild_id = ?", (guild_id,))
            db.executemany(
                "INSERT INTO server_channels (guild_id, channel_id) VALUES (?, ?)",
                [(guild_id, channel_id) for channel_id in sorted(channels)],
            )

        await self._write(save)

    async def _write(self, change: Callable[[sqlite3.Connection], None]) -> None:
        if self.problem is not None:
            raise NotSaved(self.problem)

        def transaction() -> None:
            db = self._connection
            with _transaction(db):
                change(db)

        try:
            await self._run(transaction)
        except sqlite3.Error as error:
            log.error("a setting change could not be saved in %s: %s", self.path, error)
            raise NotSaved(f"the database {self.path} could not be written ({error})") from error

    # --- daily question counts ---------------------------------------------------------------

    async def take_question(self, guild_id: int, user_id: int, day: str, limit: int) -> tuple[bool, int]:
        """Count one question for `day` unless `limit` were passed: (taken, count after).

        Counts of earlier days are deleted as they go out of use.
        """

        def take() -> tuple[bool, int]:
            db = self._connection
            with _transaction(db):
                db.execute("DELETE FROM daily_questions WHERE day < ?", (day,))
                row = db.execute(
                    "SELECT count FROM daily_questions WHERE guild_id = ? AND user_id = ? AND day = ?",
                    (guild_id, user_id, day),
                ).fetchone()
                used = row[0] if row else 0
                if used >= limit:
                    return False, used
                db.execute(
                    "INSERT INTO daily_questions (guild_id, user_id, day, count) VALUES (?, ?, ?, 1) "
                    "ON CONFLICT (guild_id, user_id, day) DO UPDATE SET count = count + 1",
                    (guild_id, user_id, day),
                )
                return True, used + 1

        return await self._run(take)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) on a connection in autocommit mode."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _migrate(db: sqlite3.Connection) -> None:
    """Bring the schema to the latest version; refuse a database made by a newer SeeBot."""
    with _transaction(db):
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = db.execute("SELECT version FROM schema_version").fetchone()
        version = row[0] if row else 0
        if row is None:
            db.execute("INSERT INTO schema_version (version) VALUES (0)")
        if version > len(MIGRATIONS):
            raise ValueError(f"schema version {version} is newer than this SeeBot knows ({len(MIGRATIONS)})")
        for number in range(version + 1, len(MIGRATIONS) + 1):
            for statement in MIGRATIONS[number - 1].split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("UPDATE schema_version SET version = ?", (number,))
            log.info("database schema migrated to version %d", number)
