"""What the retention cleanup (`services/retention.py`) deletes, one short batch per write transaction: a finished
job's pictures, result images and events, old drafts, moderation-log entries and upload checks, and blobs that
nothing refers to any more.

A job row is never deleted (its options, status, error and cost stay, for /jobs, /job and quotas); it records when
its pictures, result and events went (`inputs_deleted_at`, `results_deleted_at`, `events_deleted_at`), so a button
on an old result can say so. Only finished jobs lose anything, and a succeeded job's result only once it is posted:
a queued, submitted or running job keeps its inputs, and a result the bot still has to post stays.

Blobs are shared by content (a reroll refers to its parent's picture): a blob goes only when no row refers to it.
The columns that refer to blobs are read from the schema's foreign keys, so a table added later that refers to a
blob keeps its blobs too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from services.job_state import TERMINAL
from services.store.database import Database

JobData = Literal["inputs", "results", "events"]

_TERMINAL = ", ".join(f"'{status.value}'" for status in sorted(TERMINAL))
#: a succeeded job whose result was never posted to its channel: the bot posts it on its next start
_UNPOSTED = "status = 'succeeded' AND result_message_id IS NULL AND channel_id IS NOT NULL"
#: result images are the roles output_0, output_1, …; everything else a job holds is its input
_RESULT_ROLE = "role GLOB 'output_*'"

_SWEPT_COLUMN: dict[JobData, str] = {"inputs": "inputs_deleted_at", "results": "results_deleted_at",
                                     "events": "events_deleted_at"}
_EXTRA_CONDITION: dict[JobData, str] = {"inputs": "", "results": f" AND NOT ({_UNPOSTED})", "events": ""}
_DELETE: dict[JobData, str] = {
    "inputs": f"DELETE FROM job_blobs WHERE job_id IN ({{ids}}) AND NOT {_RESULT_ROLE}",
    "results": f"DELETE FROM job_blobs WHERE job_id IN ({{ids}}) AND {_RESULT_ROLE}",
    "events": "DELETE FROM job_events WHERE job_id IN ({ids})",
}


@dataclass(frozen=True)
class Deletions:
    """When a job's pictures and result were deleted by the cleanup (None: not deleted), and when it finished."""

    finished_at: float | None
    inputs_deleted_at: float | None
    results_deleted_at: float | None


@dataclass(frozen=True)
class BlobReference:
    """A column that refers to a blob's sha256."""

    table: str
    column: str


class RetentionStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._references: tuple[BlobReference, ...] | None = None

    # --- jobs -----------------------------------------------------------------------------------------

    async def expire_jobs(self, data: JobData, finished_before: float, now: float, *, limit: int) -> int:
        """Delete `data` of up to `limit` jobs that finished before `finished_before` (oldest first) and still hold
        it; returns how many jobs were swept (fewer than `limit`: none are left)."""
        column = _SWEPT_COLUMN[data]
        async with self.db.transaction() as conn:
            async with conn.execute(
                    f"SELECT id FROM jobs INDEXED BY jobs_{data}_kept WHERE {column} IS NULL AND finished_at < ? "
                    f"AND status IN ({_TERMINAL}){_EXTRA_CONDITION[data]} ORDER BY finished_at LIMIT ?",
                    (finished_before, limit)) as cur:
                ids = [int(row[0]) for row in await cur.fetchall()]
            if ids:
                marks = ",".join("?" * len(ids))
                await conn.execute(_DELETE[data].format(ids=marks), ids)
                await conn.execute(f"UPDATE jobs SET {column} = ? WHERE id IN ({marks})", (now, *ids))
        return len(ids)

    async def deletions(self, job_id: int) -> Deletions | None:
        row = await self.db.fetch_one("SELECT finished_at, inputs_deleted_at, results_deleted_at FROM jobs "
                                      "WHERE id = ?", (job_id,))
        if row is None:
            return None
        return Deletions(finished_at=row[0], inputs_deleted_at=row[1], results_deleted_at=row[2])

    # --- everything else, by age ----------------------------------------------------------------------

    async def delete_drafts(self, created_before: float, *, limit: int) -> int:
        """Drafts nobody confirmed or cancelled (their pictures are inputs)."""
        return await self._delete_by_age("drafts", "created_at", created_before, limit)

    async def delete_painter_sessions(self, expired_before: float, *, limit: int) -> int:
        """Painter links that stopped working before `expired_before`."""
        return await self._delete_by_age("painter_sessions", "expires_at", expired_before, limit)

    async def delete_modlog(self, created_before: float, *, limit: int) -> int:
        return await self._delete_by_age("moderation_log", "created_at", created_before, limit)

    async def delete_upload_checks(self, checked_before: float, *, limit: int) -> int:
        """What the NSFW estimator said of old uploads (a picture uploaded again is checked again)."""
        return await self._delete_by_age("upload_checks", "checked_at", checked_before, limit)

    async def _delete_by_age(self, table: str, column: str, before: float, limit: int) -> int:
        async with self.db.transaction() as conn:
            cur = await conn.execute(f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} "
                                     f"WHERE {column} < ? ORDER BY {column} LIMIT ?)", (before, limit))
            return max(0, cur.rowcount)

    # --- blobs ----------------------------------------------------------------------------------------

    async def blob_references(self) -> tuple[BlobReference, ...]:
        """Every column that refers to `blobs(sha256)`, from the schema's foreign keys."""
        if self._references is None:
            tables = [r[0] for r in await self.db.fetch_all(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
            found = []
            for table in tables:
                for fk in await self.db.fetch_all(f"PRAGMA foreign_key_list({table})"):
                    if fk["table"] == "blobs":
                        found.append(BlobReference(table, fk["from"]))
            self._references = tuple(found)
        return self._references

    async def _unreferenced(self) -> str:
        return " AND ".join(f"NOT EXISTS (SELECT 1 FROM {ref.table} WHERE {ref.table}.{ref.column} = blobs.sha256)"
                            for ref in await self.blob_references()) or "1"

    async def blob_keys(self, after: str, *, limit: int) -> list[str]:
        """The next `limit` blob hashes after `after`, in order (read from the primary key's index alone)."""
        rows = await self.db.fetch_all("SELECT sha256 FROM blobs WHERE sha256 > ? ORDER BY sha256 LIMIT ?",
                                       (after, limit))
        return [str(row[0]) for row in rows]

    async def unreferenced(self, keys: Sequence[str]) -> list[tuple[str, int]]:
        """Which of `keys` nothing refers to, with their sizes."""
        if not keys:
            return []
        rows = await self.db.fetch_all(
            f"SELECT sha256, size FROM blobs WHERE sha256 IN ({','.join('?' * len(keys))}) "
            f"AND {await self._unreferenced()}", keys)
        return [(str(row[0]), int(row[1])) for row in rows]

    async def delete_unreferenced(self, keys: Sequence[str]) -> tuple[int, int]:
        """Delete those of `keys` that nothing refers to (checked again inside the write: a job created meanwhile
        keeps its blob); returns how many went and their bytes."""
        if not keys:
            return 0, 0
        condition = await self._unreferenced()
        marks = ",".join("?" * len(keys))
        async with self.db.transaction() as conn:
            async with conn.execute(f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blobs WHERE sha256 IN ({marks}) "
                                    f"AND {condition}", keys) as cur:
                row = await cur.fetchone()
            await conn.execute(f"DELETE FROM blobs WHERE sha256 IN ({marks}) AND {condition}", keys)
        assert row is not None
        return int(row[0]), int(row[1])
