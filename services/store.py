"""The job store: SQLite (aiosqlite, WAL) holding jobs, their events, input blobs and per-guild settings.

SQLite is the source of truth: every state change and backend log line is a row, so a restarted bot
rebuilds everything from here. One connection serves every task; each write transaction holds a lock, so
statements from concurrent tasks never interleave inside another task's transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any, Self

import aiosqlite
from pydantic import BaseModel, ConfigDict


class JobStatus(StrEnum):
    QUEUED = "queued"
    SUBMITTED = "submitted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    BLOCKED = "blocked"


TERMINAL: frozenset[JobStatus] = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.BLOCKED})

#: Legal transitions. A terminal job never changes again (a retry is a new job with `parent_job_id`).
#: `submitted/running → queued` is the re-queue after a backend lost the request (attempts is bumped).
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.SUBMITTED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.BLOCKED}),
    JobStatus.SUBMITTED: frozenset({JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED,
                                    JobStatus.CANCELLED, JobStatus.BLOCKED, JobStatus.QUEUED}),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED,
                                  JobStatus.BLOCKED, JobStatus.QUEUED}),
    **{s: frozenset() for s in TERMINAL},
}


class IllegalTransition(RuntimeError):
    def __init__(self, job_id: int, current: JobStatus, wanted: JobStatus) -> None:
        super().__init__(f"job {job_id}: illegal transition {current} → {wanted}")
        self.job_id = job_id
        self.current = current
        self.wanted = wanted


class JobNotFound(LookupError):
    pass


class Job(BaseModel):
    """One row of `jobs`. `input` is the fal request body (blob references in place of image URLs)."""

    model_config = ConfigDict(frozen=True)

    id: int
    guild_id: int | None
    channel_id: int | None
    user_id: int
    status: JobStatus
    status_message_id: int | None
    parent_job_id: int | None
    backend: str
    backend_request_id: str | None
    status_url: str | None
    response_url: str | None
    cancel_url: str | None
    input: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    attempts: int
    created_at: float
    updated_at: float
    submitted_at: float | None
    started_at: float | None
    finished_at: float | None
    result_message_id: int | None = None
    age_restricted: bool = False

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class JobEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    job_id: int
    kind: str
    message: str
    data: dict[str, Any] | None
    created_at: float


class StoredBlob(BaseModel):
    model_config = ConfigDict(frozen=True)

    sha256: str
    content_type: str
    data: bytes


_MIGRATIONS: tuple[str, ...] = (
    # 1: the initial schema
    """
    CREATE TABLE jobs (
        id                  INTEGER PRIMARY KEY AUTOINCREMENT,
        guild_id            INTEGER,
        channel_id          INTEGER,
        user_id             INTEGER NOT NULL,
        status              TEXT NOT NULL CHECK (status IN
                              ('queued','submitted','running','succeeded','failed','cancelled','blocked')),
        status_message_id   INTEGER,
        parent_job_id       INTEGER REFERENCES jobs(id),
        backend             TEXT NOT NULL,
        backend_request_id  TEXT,
        status_url          TEXT,
        response_url        TEXT,
        cancel_url          TEXT,
        input_json          TEXT NOT NULL,
        result_json         TEXT,
        error               TEXT,
        attempts            INTEGER NOT NULL DEFAULT 0,
        created_at          REAL NOT NULL,
        updated_at          REAL NOT NULL,
        submitted_at        REAL,
        started_at          REAL,
        finished_at         REAL
    );
    CREATE INDEX jobs_status ON jobs(status);
    CREATE INDEX jobs_user ON jobs(user_id, created_at);
    CREATE INDEX jobs_guild ON jobs(guild_id, created_at);

    CREATE TABLE job_events (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id      INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        kind        TEXT NOT NULL,
        message     TEXT NOT NULL,
        data_json   TEXT,
        created_at  REAL NOT NULL
    );
    CREATE INDEX job_events_job ON job_events(job_id, id);

    CREATE TABLE blobs (
        sha256        TEXT PRIMARY KEY,
        content_type  TEXT NOT NULL,
        size          INTEGER NOT NULL,
        data          BLOB NOT NULL,
        created_at    REAL NOT NULL
    );

    CREATE TABLE job_blobs (
        job_id  INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        role    TEXT NOT NULL,
        sha256  TEXT NOT NULL REFERENCES blobs(sha256),
        PRIMARY KEY (job_id, role)
    );

    CREATE TABLE guild_settings (
        guild_id    INTEGER NOT NULL,
        key         TEXT NOT NULL,
        value_json  TEXT NOT NULL,
        updated_at  REAL NOT NULL,
        PRIMARY KEY (guild_id, key)
    );
    """,
    # 2: where a job's result was posted (so a restart posts it once, never twice)
    """
    ALTER TABLE jobs ADD COLUMN result_message_id INTEGER;
    """,
    # 3: moderation: where a job ran (age-restricted or not), bans, the moderation log
    """
    ALTER TABLE jobs ADD COLUMN age_restricted INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX jobs_guild_user ON jobs(guild_id, user_id, created_at);
    CREATE TABLE bans (
        guild_id    INTEGER NOT NULL,
        user_id     INTEGER NOT NULL,
        by_user_id  INTEGER,
        reason      TEXT,
        created_at  REAL NOT NULL,
        PRIMARY KEY (guild_id, user_id)
    );
    CREATE TABLE moderation_log (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        guild_id    INTEGER NOT NULL,
        job_id      INTEGER REFERENCES jobs(id),
        user_id     INTEGER,
        actor_id    INTEGER,
        action      TEXT NOT NULL,
        detail      TEXT NOT NULL DEFAULT '',
        created_at  REAL NOT NULL
    );
    CREATE INDEX moderation_log_guild ON moderation_log(guild_id, id);
    """,
    # 4: web mask painter sessions (one per link; single use)
    """
    CREATE TABLE painter_sessions (
        id              TEXT PRIMARY KEY,
        user_id         INTEGER NOT NULL,
        guild_id        INTEGER,
        channel_id      INTEGER,
        image_sha256    TEXT NOT NULL REFERENCES blobs(sha256),
        requester_json  TEXT NOT NULL,
        params_json     TEXT NOT NULL,
        created_at      REAL NOT NULL,
        expires_at      REAL NOT NULL,
        browser_key     TEXT,
        used_at         REAL,
        job_id          INTEGER REFERENCES jobs(id)
    );
    """,
    # 5: drafts waiting for the user to confirm their mask (never run until confirmed)
    """
    CREATE TABLE drafts (
        id              TEXT PRIMARY KEY,
        user_id         INTEGER NOT NULL,
        image_sha256    TEXT NOT NULL REFERENCES blobs(sha256),
        mask_sha256     TEXT NOT NULL REFERENCES blobs(sha256),
        requester_json  TEXT NOT NULL,
        params_json     TEXT NOT NULL,
        created_at      REAL NOT NULL
    );
    """,
)

SCHEMA_VERSION = len(_MIGRATIONS)

_JOB_COLUMNS = (
    "id, guild_id, channel_id, user_id, status, status_message_id, parent_job_id, backend, backend_request_id, "
    "status_url, response_url, cancel_url, input_json, result_json, error, attempts, created_at, updated_at, "
    "submitted_at, started_at, finished_at, result_message_id, age_restricted"
)

#: Columns `transition()` may set alongside the status.
_TRANSITION_FIELDS = frozenset({
    "backend_request_id", "status_url", "response_url", "cancel_url", "result", "error", "status_message_id",
})


def _job_from_row(row: Sequence[Any]) -> Job:
    return Job(
        id=row[0], guild_id=row[1], channel_id=row[2], user_id=row[3], status=JobStatus(row[4]),
        status_message_id=row[5], parent_job_id=row[6], backend=row[7], backend_request_id=row[8],
        status_url=row[9], response_url=row[10], cancel_url=row[11], input=json.loads(row[12]),
        result=json.loads(row[13]) if row[13] is not None else None, error=row[14], attempts=row[15],
        created_at=row[16], updated_at=row[17], submitted_at=row[18], started_at=row[19], finished_at=row[20],
        result_message_id=row[21], age_restricted=bool(row[22]),
    )


class JobStore:
    """Async access to the bot's SQLite database. Use `async with await JobStore.open(path)` or `close()`."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str | Path) -> Self:
        """Open (creating if needed) and migrate the database at `path` (":memory:" for a private one)."""
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(str(path), isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA foreign_keys=ON")
            await db.execute("PRAGMA busy_timeout=5000")
            store = cls(db)
            await store._migrate()
        except BaseException:
            await db.close()
            raise
        return store

    async def close(self) -> None:
        await self._db.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._write_lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
            await self._db.execute("COMMIT")

    async def _migrate(self) -> None:
        async with self._db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"database schema v{version} is newer than this code (v{SCHEMA_VERSION})")
        for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
            async with self._transaction() as db:
                for statement in _split_sql(script):
                    await db.execute(statement)
                await db.execute(f"PRAGMA user_version = {number}")

    async def schema_version(self) -> int:
        async with self._db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def journal_mode(self) -> str:
        async with self._db.execute("PRAGMA journal_mode") as cur:
            row = await cur.fetchone()
        return str(row[0]) if row else ""

    # --- jobs ---------------------------------------------------------------------------------------

    async def create_job(self, *, user_id: int, input: dict[str, Any], backend: str, guild_id: int | None = None,
                         channel_id: int | None = None, parent_job_id: int | None = None,
                         blobs: dict[str, tuple[bytes, str]] | None = None,
                         blob_refs: dict[str, str] | None = None, age_restricted: bool = False) -> Job:
        """Insert a `queued` job, its input blobs and its first event.

        `blobs` maps a role ("image", "mask") to new (bytes, content type); `blob_refs` maps a role to the
        sha256 of a blob already stored (a reroll shares its parent's inputs without copying them).
        """
        now = time.time()
        async with self._transaction() as db:
            cur = await db.execute(
                "INSERT INTO jobs (guild_id, channel_id, user_id, status, parent_job_id, backend, input_json, "
                "created_at, updated_at, age_restricted) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                (guild_id, channel_id, user_id, parent_job_id, backend, json.dumps(input), now, now,
                 int(age_restricted)))
            job_id = cur.lastrowid
            assert job_id is not None
            for role, (data, content_type) in (blobs or {}).items():
                sha = await self._put_blob(db, data, content_type, now)
                await db.execute("INSERT INTO job_blobs (job_id, role, sha256) VALUES (?, ?, ?)",
                                 (job_id, role, sha))
            for role, sha in (blob_refs or {}).items():
                await db.execute("INSERT INTO job_blobs (job_id, role, sha256) VALUES (?, ?, ?)",
                                 (job_id, role, sha))
            await self._insert_event(db, job_id, "state", "queued", None, now)
        return await self.get_job(job_id)

    async def get_job(self, job_id: int) -> Job:
        async with self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)) as cur:
            row = await cur.fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id}")
        return _job_from_row(row)

    async def jobs_with_status(self, statuses: Iterable[JobStatus]) -> list[Job]:
        wanted = [JobStatus(s).value for s in statuses]
        marks = ",".join("?" * len(wanted))
        async with self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status IN ({marks}) ORDER BY id", wanted) as cur:
            rows = await cur.fetchall()
        return [_job_from_row(r) for r in rows]

    async def jobs_for_user(self, user_id: int, *, guild_id: int | None = None, limit: int = 10) -> list[Job]:
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE user_id = ?"
        args: list[Any] = [user_id]
        if guild_id is not None:
            sql += " AND guild_id = ?"
            args.append(guild_id)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        async with self._db.execute(sql, args) as cur:
            rows = await cur.fetchall()
        return [_job_from_row(r) for r in rows]

    async def transition(self, job_id: int, new_status: JobStatus, *, message: str | None = None,
                         data: dict[str, Any] | None = None, blobs: dict[str, StoredBlob] | None = None,
                         **fields: Any) -> Job:
        """Move a job to `new_status`, refusing illegal transitions, and record the change as an event.

        `fields` may set the backend request id and URLs, `result`, `error` or `status_message_id` in the
        same transaction, and `blobs` attaches blobs (a result's images) in it too. Re-queueing (`→ queued`)
        counts an attempt and clears the backend request.
        """
        unknown = set(fields) - _TRANSITION_FIELDS
        if unknown:
            raise TypeError(f"transition() got unexpected fields {sorted(unknown)}")
        new_status = JobStatus(new_status)
        now = time.time()
        async with self._transaction() as db:
            async with db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)) as cur:
                row = await cur.fetchone()
            if row is None:
                raise JobNotFound(f"no job {job_id}")
            current = JobStatus(row[0])
            if new_status not in TRANSITIONS[current]:
                raise IllegalTransition(job_id, current, new_status)

            sets: dict[str, Any] = {"status": new_status.value, "updated_at": now}
            for key, value in fields.items():
                if key == "result":
                    sets["result_json"] = json.dumps(value) if value is not None else None
                else:
                    sets[key] = value
            if new_status is JobStatus.SUBMITTED:
                sets["submitted_at"] = now
                sets["attempts_inc"] = 1
            elif new_status is JobStatus.RUNNING:
                sets["started_at"] = now
            elif new_status is JobStatus.QUEUED:
                for key in ("backend_request_id", "status_url", "response_url", "cancel_url"):
                    sets.setdefault(key, None)
            elif new_status in TERMINAL:
                sets["finished_at"] = now
            inc = sets.pop("attempts_inc", 0)
            assignments = ", ".join(f"{k} = ?" for k in sets) + ", attempts = attempts + ?"
            await db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*sets.values(), inc, job_id))
            await self._insert_event(db, job_id, "state", message or new_status.value,
                                     {"from": current.value, "to": new_status.value, **(data or {})}, now)
            for role, blob in (blobs or {}).items():
                sha = await self._put_blob(db, blob.data, blob.content_type, now, sha=blob.sha256)
                await db.execute("INSERT OR REPLACE INTO job_blobs (job_id, role, sha256) VALUES (?, ?, ?)",
                                 (job_id, role, sha))
        return await self.get_job(job_id)

    async def add_job_blobs(self, job_id: int, blobs: dict[str, tuple[bytes, str]]) -> None:
        """Attach more blobs to a job (its output images), replacing any with the same role."""
        now = time.time()
        async with self._transaction() as db:
            for role, (data, content_type) in blobs.items():
                sha = await self._put_blob(db, data, content_type, now)
                await db.execute("INSERT OR REPLACE INTO job_blobs (job_id, role, sha256) VALUES (?, ?, ?)",
                                 (job_id, role, sha))

    async def set_result_message(self, job_id: int, message_id: int) -> None:
        async with self._transaction() as db:
            await db.execute("UPDATE jobs SET result_message_id = ?, updated_at = ? WHERE id = ?",
                             (message_id, time.time(), job_id))
            await self._insert_event(db, job_id, "posted", f"result posted as message {message_id}", None,
                                     time.time())

    async def unposted_results(self) -> list[Job]:
        """Succeeded jobs whose result never reached their channel (the bot stopped in between)."""
        async with self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status = 'succeeded' AND result_message_id IS NULL "
                "AND channel_id IS NOT NULL ORDER BY id") as cur:
            rows = await cur.fetchall()
        return [_job_from_row(r) for r in rows]

    async def set_status_message(self, job_id: int, message_id: int | None) -> None:
        async with self._transaction() as db:
            await db.execute("UPDATE jobs SET status_message_id = ?, updated_at = ? WHERE id = ?",
                             (message_id, time.time(), job_id))

    # --- events -------------------------------------------------------------------------------------

    async def add_event(self, job_id: int, kind: str, message: str, data: dict[str, Any] | None = None) -> int:
        """Append an event (a backend log line, a queue position, a note) to a job's history."""
        async with self._transaction() as db:
            return await self._insert_event(db, job_id, kind, message, data, time.time())

    async def add_events(self, job_id: int, events: Sequence[tuple[str, str, dict[str, Any] | None]]) -> None:
        """Append several events in one transaction (a poll's batch of new log lines)."""
        if not events:
            return
        now = time.time()
        async with self._transaction() as db:
            await db.executemany(
                "INSERT INTO job_events (job_id, kind, message, data_json, created_at) VALUES (?, ?, ?, ?, ?)",
                [(job_id, k, m, json.dumps(d) if d is not None else None, now) for k, m, d in events])

    async def events(self, job_id: int, *, kind: str | None = None, after_id: int = 0) -> list[JobEvent]:
        sql = "SELECT id, job_id, kind, message, data_json, created_at FROM job_events WHERE job_id = ? AND id > ?"
        args: list[Any] = [job_id, after_id]
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        async with self._db.execute(sql + " ORDER BY id", args) as cur:
            rows = await cur.fetchall()
        return [JobEvent(id=r[0], job_id=r[1], kind=r[2], message=r[3],
                         data=json.loads(r[4]) if r[4] is not None else None, created_at=r[5]) for r in rows]

    @staticmethod
    async def _insert_event(db: aiosqlite.Connection, job_id: int, kind: str, message: str,
                            data: dict[str, Any] | None, now: float) -> int:
        cur = await db.execute(
            "INSERT INTO job_events (job_id, kind, message, data_json, created_at) VALUES (?, ?, ?, ?, ?)",
            (job_id, kind, message, json.dumps(data) if data is not None else None, now))
        assert cur.lastrowid is not None
        return cur.lastrowid

    # --- blobs --------------------------------------------------------------------------------------

    @staticmethod
    async def _put_blob(db: aiosqlite.Connection, data: bytes, content_type: str, now: float, *,
                        sha: str | None = None) -> str:
        """Store bytes once by content (`sha`, when the caller already hashed them, is trusted)."""
        sha = sha or hashlib.sha256(data).hexdigest()
        await db.execute(
            "INSERT OR IGNORE INTO blobs (sha256, content_type, size, data, created_at) VALUES (?, ?, ?, ?, ?)",
            (sha, content_type, len(data), data, now))
        return sha

    async def put_blob(self, data: bytes, content_type: str) -> str:
        """Store bytes once by content; returns their sha256."""
        async with self._transaction() as db:
            return await self._put_blob(db, data, content_type, time.time())

    async def get_blob(self, sha256: str) -> StoredBlob | None:
        async with self._db.execute("SELECT sha256, content_type, data FROM blobs WHERE sha256 = ?",
                                    (sha256,)) as cur:
            row = await cur.fetchone()
        return StoredBlob(sha256=row[0], content_type=row[1], data=bytes(row[2])) if row else None

    async def job_blobs(self, job_id: int) -> dict[str, StoredBlob]:
        """A job's input blobs by role ("image", "mask", …)."""
        async with self._db.execute(
                "SELECT jb.role, b.sha256, b.content_type, b.data FROM job_blobs jb "
                "JOIN blobs b ON b.sha256 = jb.sha256 WHERE jb.job_id = ?", (job_id,)) as cur:
            rows = await cur.fetchall()
        return {r[0]: StoredBlob(sha256=r[1], content_type=r[2], data=bytes(r[3])) for r in rows}

    async def blob_count(self) -> int:
        async with self._db.execute("SELECT COUNT(*) FROM blobs") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    # --- guild settings -----------------------------------------------------------------------------

    async def get_guild_settings(self, guild_id: int) -> dict[str, Any]:
        async with self._db.execute("SELECT key, value_json FROM guild_settings WHERE guild_id = ?",
                                    (guild_id,)) as cur:
            rows = await cur.fetchall()
        return {r[0]: json.loads(r[1]) for r in rows}

    async def set_guild_settings(self, guild_id: int, values: dict[str, Any]) -> None:
        """Upsert settings; a value of None removes the key (back to the default)."""
        now = time.time()
        async with self._transaction() as db:
            for key, value in values.items():
                if value is None:
                    await db.execute("DELETE FROM guild_settings WHERE guild_id = ? AND key = ?", (guild_id, key))
                else:
                    await db.execute(
                        "INSERT INTO guild_settings (guild_id, key, value_json, updated_at) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (guild_id, key) DO UPDATE SET value_json = excluded.value_json, "
                        "updated_at = excluded.updated_at", (guild_id, key, json.dumps(value), now))


class Usage(BaseModel):
    """What a user and their server have used since a moment (the start of the day, for quotas)."""

    user_jobs: int
    server_jobs: int
    server_steps: int
    last_user_job_at: float | None


class ModerationEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    guild_id: int
    job_id: int | None
    user_id: int | None
    actor_id: int | None
    action: str
    detail: str
    created_at: float


#: Jobs that count against quotas: everything except what was blocked or never reached a backend.
_COUNTED = "status != 'blocked' AND NOT (status IN ('failed', 'cancelled') AND attempts = 0)"


class ModerationStore:
    """Bans, the moderation log and usage counts, on the same database as the jobs."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    async def usage(self, guild_id: int, user_id: int, since: float) -> Usage:
        db = self.store._db
        async with db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(user_id = ?), 0), COALESCE(SUM("
                f"COALESCE(json_extract(input_json, '$.num_inference_steps'), 25) * "
                f"COALESCE(json_extract(input_json, '$.num_images'), 1)), 0) "
                f"FROM jobs WHERE guild_id = ? AND created_at >= ? AND {_COUNTED}",
                (user_id, guild_id, since)) as cur:
            row = await cur.fetchone()
        async with db.execute("SELECT MAX(created_at) FROM jobs WHERE guild_id = ? AND user_id = ? AND " + _COUNTED,
                              (guild_id, user_id)) as cur:
            last = await cur.fetchone()
        assert row is not None
        return Usage(server_jobs=int(row[0]), user_jobs=int(row[1]), server_steps=int(row[2]),
                     last_user_job_at=last[0] if last else None)

    async def ban(self, guild_id: int, user_id: int, *, by: int | None, reason: str = "") -> bool:
        """Ban a user from the bot in a server; False if they already were."""
        async with self.store._transaction() as db:
            cur = await db.execute(
                "INSERT OR IGNORE INTO bans (guild_id, user_id, by_user_id, reason, created_at) VALUES (?, ?, ?, ?, ?)",
                (guild_id, user_id, by, reason, time.time()))
            return cur.rowcount > 0

    async def unban(self, guild_id: int, user_id: int) -> bool:
        async with self.store._transaction() as db:
            cur = await db.execute("DELETE FROM bans WHERE guild_id = ? AND user_id = ?", (guild_id, user_id))
            return cur.rowcount > 0

    async def is_banned(self, guild_id: int, user_id: int) -> bool:
        async with self.store._db.execute("SELECT 1 FROM bans WHERE guild_id = ? AND user_id = ?",
                                          (guild_id, user_id)) as cur:
            return await cur.fetchone() is not None

    async def log(self, guild_id: int, action: str, *, job_id: int | None = None, user_id: int | None = None,
                  actor_id: int | None = None, detail: str = "") -> ModerationEntry:
        now = time.time()
        async with self.store._transaction() as db:
            cur = await db.execute(
                "INSERT INTO moderation_log (guild_id, job_id, user_id, actor_id, action, detail, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", (guild_id, job_id, user_id, actor_id, action, detail, now))
            entry_id = cur.lastrowid
        assert entry_id is not None
        return ModerationEntry(id=entry_id, guild_id=guild_id, job_id=job_id, user_id=user_id, actor_id=actor_id,
                               action=action, detail=detail, created_at=now)

    async def entries(self, guild_id: int, limit: int = 50) -> list[ModerationEntry]:
        async with self.store._db.execute(
                "SELECT id, guild_id, job_id, user_id, actor_id, action, detail, created_at FROM moderation_log "
                "WHERE guild_id = ? ORDER BY id DESC LIMIT ?", (guild_id, limit)) as cur:
            rows = await cur.fetchall()
        return [ModerationEntry(id=r[0], guild_id=r[1], job_id=r[2], user_id=r[3], actor_id=r[4], action=r[5],
                                detail=r[6], created_at=r[7]) for r in reversed(list(rows))]


class PainterSession(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    user_id: int
    guild_id: int | None
    channel_id: int | None
    image_sha256: str
    requester: dict[str, Any]
    params: dict[str, Any]
    created_at: float
    expires_at: float
    browser_key: str | None
    used_at: float | None
    job_id: int | None


_PAINTER_COLUMNS = ("id, user_id, guild_id, channel_id, image_sha256, requester_json, params_json, created_at, "
                    "expires_at, browser_key, used_at, job_id")


class PainterSessions:
    """Mask-painter links: who may paint which image for which channel, until when, and whether it was used."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    async def create(self, session_id: str, *, user_id: int, guild_id: int | None, channel_id: int | None,
                     image: tuple[bytes, str], requester: dict[str, Any], params: dict[str, Any],
                     expires_at: float) -> PainterSession:
        now = time.time()
        async with self.store._transaction() as db:
            sha = await JobStore._put_blob(db, image[0], image[1], now)
            await db.execute(
                f"INSERT INTO painter_sessions ({_PAINTER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, "
                "NULL)", (session_id, user_id, guild_id, channel_id, sha, json.dumps(requester), json.dumps(params),
                          now, expires_at))
        found = await self.get(session_id)
        assert found is not None
        return found

    async def get(self, session_id: str) -> PainterSession | None:
        async with self.store._db.execute(f"SELECT {_PAINTER_COLUMNS} FROM painter_sessions WHERE id = ?",
                                          (session_id,)) as cur:
            r = await cur.fetchone()
        if r is None:
            return None
        return PainterSession(id=r[0], user_id=r[1], guild_id=r[2], channel_id=r[3], image_sha256=r[4],
                              requester=json.loads(r[5]), params=json.loads(r[6]), created_at=r[7], expires_at=r[8],
                              browser_key=r[9], used_at=r[10], job_id=r[11])

    async def claim_browser(self, session_id: str, browser_key: str) -> bool:
        """Bind the session to the first browser that opens it; True if this browser holds it."""
        async with self.store._transaction() as db:
            await db.execute("UPDATE painter_sessions SET browser_key = ? WHERE id = ? AND browser_key IS NULL",
                             (browser_key, session_id))
            async with db.execute("SELECT browser_key FROM painter_sessions WHERE id = ?", (session_id,)) as cur:
                row = await cur.fetchone()
        return row is not None and row[0] == browser_key

    async def consume(self, session_id: str, now: float) -> bool:
        """Mark the link used; False if it already was (a link works once)."""
        async with self.store._transaction() as db:
            cur = await db.execute("UPDATE painter_sessions SET used_at = ? WHERE id = ? AND used_at IS NULL",
                                   (now, session_id))
            return cur.rowcount == 1

    async def release(self, session_id: str) -> None:
        """Make a consumed link usable again (the submit was refused for a reason the user can fix)."""
        async with self.store._transaction() as db:
            await db.execute("UPDATE painter_sessions SET used_at = NULL WHERE id = ? AND job_id IS NULL",
                             (session_id,))

    async def set_job(self, session_id: str, job_id: int) -> None:
        async with self.store._transaction() as db:
            await db.execute("UPDATE painter_sessions SET job_id = ? WHERE id = ?", (job_id, session_id))


class Draft(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    user_id: int
    image_sha256: str
    mask_sha256: str
    requester: dict[str, Any]
    params: dict[str, Any]
    created_at: float


class Drafts:
    """Jobs shown to their author with the mask overlaid, waiting for Confirm (servers that ask for it)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    async def create(self, draft_id: str, *, user_id: int, image: tuple[bytes, str], mask: tuple[bytes, str],
                     requester: dict[str, Any], params: dict[str, Any]) -> Draft:
        now = time.time()
        async with self.store._transaction() as db:
            image_sha = await JobStore._put_blob(db, image[0], image[1], now)
            mask_sha = await JobStore._put_blob(db, mask[0], mask[1], now)
            await db.execute("INSERT INTO drafts (id, user_id, image_sha256, mask_sha256, requester_json, params_json, "
                             "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (draft_id, user_id, image_sha, mask_sha, json.dumps(requester), json.dumps(params), now))
        return Draft(id=draft_id, user_id=user_id, image_sha256=image_sha, mask_sha256=mask_sha, requester=requester,
                     params=params, created_at=now)

    async def get(self, draft_id: str) -> Draft | None:
        async with self.store._db.execute(
                "SELECT id, user_id, image_sha256, mask_sha256, requester_json, params_json, created_at FROM drafts "
                "WHERE id = ?", (draft_id,)) as cur:
            r = await cur.fetchone()
        if r is None:
            return None
        return Draft(id=r[0], user_id=r[1], image_sha256=r[2], mask_sha256=r[3], requester=json.loads(r[4]),
                     params=json.loads(r[5]), created_at=r[6])

    async def replace_mask(self, draft_id: str, mask: tuple[bytes, str]) -> None:
        now = time.time()
        async with self.store._transaction() as db:
            sha = await JobStore._put_blob(db, mask[0], mask[1], now)
            await db.execute("UPDATE drafts SET mask_sha256 = ? WHERE id = ?", (sha, draft_id))

    async def take(self, draft_id: str) -> Draft | None:
        """Remove and return a draft (confirm or cancel); None if it is already gone (a double click)."""
        draft = await self.get(draft_id)
        if draft is None:
            return None
        async with self.store._transaction() as db:
            cur = await db.execute("DELETE FROM drafts WHERE id = ?", (draft_id,))
            if cur.rowcount != 1:
                return None
        return draft


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
