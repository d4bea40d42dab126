"""The database core: one SQLite connection (aiosqlite, WAL), a write lock, transactions and migrations.

SQLite is the source of truth: a restarted bot rebuilds everything from here. One connection serves every task;
each write transaction holds the lock, so statements from concurrent tasks never interleave inside another
task's transaction. Rows are read by column name (`sqlite3.Row`).

Migrations are the numbered files `migrations/V<n>__<what>.sql` (as in RoboDanny), applied in order inside one
transaction each; `PRAGMA user_version` records the last one applied, so a database written by older code is
upgraded in place when it is opened, and a database from newer code is refused rather than misread.

Space: a new database is created with `auto_vacuum=INCREMENTAL`, so the retention cleanup (`services/retention.py`)
can hand freed pages back to the disk a few at a time (`incremental_vacuum`). A database created before that
keeps reusing its free pages but never shrinks until one full `VACUUM` converts it (`vacuum()`).
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import aiosqlite

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_MIGRATION_NAME = re.compile(r"^V(?P<version>\d+)__(?P<name>\w+)\.sql$")

Row = sqlite3.Row

#: `PRAGMA auto_vacuum` values
AUTO_VACUUM_MODES = {0: "none", 1: "full", 2: "incremental"}


def as_dict(row: Row, *, without: tuple[str, ...] = ()) -> dict[str, Any]:
    """A row as {column: value}, leaving out the columns in `without`."""
    return {key: value for key, value in zip(row.keys(), row, strict=True) if key not in without}


@dataclass(frozen=True)
class Space:
    """The database file's pages: all of them, and those free (reused by new rows, or handed back to the disk)."""

    page_size: int
    pages: int
    free_pages: int

    @property
    def file_bytes(self) -> int:
        return self.page_size * self.pages

    @property
    def used_bytes(self) -> int:
        return self.page_size * (self.pages - self.free_pages)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(folder: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations in `folder`, in order; their versions must run 1, 2, 3, … without gaps."""
    found = []
    for path in folder.iterdir():
        match = _MIGRATION_NAME.match(path.name)
        if match:
            found.append(Migration(int(match["version"]), match["name"], path.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations in {folder} must be numbered 1..n without gaps: {[m.version for m in found]}")
    return found


MIGRATIONS = load_migrations()
SCHEMA_VERSION = len(MIGRATIONS)


class Database:
    """The connection. Writes go through `transaction()`; reads through `fetch_one` / `fetch_all`."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str | Path) -> Self:
        """Open (creating if needed) and migrate the database at `path` (":memory:" for a private one)."""
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(str(path), isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            # auto_vacuum first: it takes effect only before the first page is written (WAL mode writes one)
            for pragma in ("auto_vacuum=INCREMENTAL", "journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON",
                           "busy_timeout=5000"):
                await conn.execute(f"PRAGMA {pragma}")
            database = cls(conn)
            await database._migrate()
        except BaseException:
            await conn.close()
            raise
        return database

    async def close(self) -> None:
        await self._conn.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction (`BEGIN IMMEDIATE` … `COMMIT`, rolled back on any error) under the write lock."""
        async with self._write_lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")

    async def fetch_one(self, sql: str, args: Iterable[Any] = ()) -> Row | None:
        async with self._conn.execute(sql, tuple(args)) as cur:
            row: Row | None = await cur.fetchone()
        return row

    async def fetch_all(self, sql: str, args: Iterable[Any] = ()) -> list[Row]:
        async with self._conn.execute(sql, tuple(args)) as cur:
            rows = await cur.fetchall()
        return list(rows)

    async def scalar(self, sql: str, args: Iterable[Any] = ()) -> Any:
        """The first column of the first row (None when there is no row)."""
        row = await self.fetch_one(sql, args)
        return row[0] if row is not None else None

    async def schema_version(self) -> int:
        return int(await self.scalar("PRAGMA user_version") or 0)

    async def journal_mode(self) -> str:
        return str(await self.scalar("PRAGMA journal_mode") or "")

    async def auto_vacuum(self) -> str:
        """"incremental" for a database this code created; "none" for an older one, which needs `vacuum()` once."""
        return AUTO_VACUUM_MODES.get(int(await self.scalar("PRAGMA auto_vacuum") or 0), "none")

    async def space(self) -> Space:
        return Space(page_size=int(await self.scalar("PRAGMA page_size")),
                     pages=int(await self.scalar("PRAGMA page_count")),
                     free_pages=int(await self.scalar("PRAGMA freelist_count")))

    async def incremental_vacuum(self, pages: int) -> int:
        """Hand up to `pages` free pages back to the disk (an incremental database; one short write); returns how
        many are still free. The file shrinks at the next WAL checkpoint (`checkpoint()`)."""
        async with self._write_lock:
            # executescript steps the pragma to completion (a cursor's execute frees one page per step)
            await self._conn.executescript(f"PRAGMA incremental_vacuum({int(pages)});")
        return int(await self.scalar("PRAGMA freelist_count"))

    async def vacuum(self) -> None:
        """Rewrite the whole database as an incremental one (`VACUUM`): once, for a database created before
        incremental vacuum. It holds the connection while it copies the live data, and needs that much free disk."""
        async with self._write_lock:
            await self._conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            await self._conn.execute("VACUUM")

    async def checkpoint(self) -> None:
        """Copy the WAL into the database file and empty it: the file then has its vacuumed size."""
        async with self._write_lock:
            await self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    async def _migrate(self) -> None:
        version = await self.schema_version()
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"database schema v{version} is newer than this code (v{SCHEMA_VERSION})")
        for migration in MIGRATIONS[version:]:
            # executescript parses the file as SQLite does (comments, several statements); BEGIN … COMMIT makes
            # the migration and its version number one atomic step
            try:
                await self._conn.executescript(f"BEGIN IMMEDIATE;\n{migration.sql}\n;"
                                               f"PRAGMA user_version = {migration.version};\nCOMMIT;")
            except BaseException:
                if self._conn.in_transaction:
                    await self._conn.execute("ROLLBACK")
                raise
