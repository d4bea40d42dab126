"""Jobs and their events: creating a job with its input blobs, moving it through the state machine
(`services/job_state.py`) with an event for every change, and reading jobs back."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import aiosqlite

from services.blob import Blob
from services.crop_plan import CropPlan
from services.job_state import TERMINAL, TRANSITIONS, IllegalTransition, Job, JobEvent, JobNotFound, JobStatus
from services.store.blobs import put_blob
from services.store.database import Database, Row, as_dict

_COLUMNS = ("id, guild_id, channel_id, user_id, status, status_message_id, parent_job_id, backend, "
            "backend_request_id, status_url, response_url, cancel_url, input_json, result_json, error, attempts, "
            "created_at, updated_at, submitted_at, started_at, finished_at, result_message_id, age_restricted, cost, "
            "options_json, plan_json, result_removed_at, submit_key, deadline_at")

#: Columns `transition()` may set alongside the status.
_TRANSITION_FIELDS = frozenset({
    "backend_request_id", "status_url", "response_url", "cancel_url", "result", "error", "status_message_id",
})
_BACKEND_REQUEST = ("backend_request_id", "status_url", "response_url", "cancel_url", "submit_key")


def _job(row: Row) -> Job:
    values = as_dict(row, without=("input_json", "result_json", "options_json", "plan_json"))
    result, asked, plan = row["result_json"], row["options_json"], row["plan_json"]
    return Job(**values, input=json.loads(row["input_json"]),
               result=json.loads(result) if result is not None else None,
               asked=json.loads(asked) if asked is not None else None,
               plan=CropPlan.model_validate_json(plan) if plan is not None else None)


def _event(row: Row) -> JobEvent:
    data = row["data_json"]
    return JobEvent(id=row["id"], job_id=row["job_id"], kind=row["kind"], message=row["message"],
                    data=json.loads(data) if data is not None else None, created_at=row["created_at"])


async def _insert_event(conn: aiosqlite.Connection, job_id: int, kind: str, message: str,
                        data: Mapping[str, Any] | None, now: float) -> int:
    cur = await conn.execute(
        "INSERT INTO job_events (job_id, kind, message, data_json, created_at) VALUES (?, ?, ?, ?, ?)",
        (job_id, kind, message, json.dumps(data) if data is not None else None, now))
    assert cur.lastrowid is not None
    return cur.lastrowid


async def _attach(conn: aiosqlite.Connection, job_id: int, blobs: Mapping[str, Blob], now: float) -> None:
    for role, blob in blobs.items():
        await put_blob(conn, blob, now)
        await conn.execute("INSERT OR REPLACE INTO job_blobs (job_id, role, sha256) VALUES (?, ?, ?)",
                           (job_id, role, blob.sha256))


class Jobs:
    def __init__(self, db: Database) -> None:
        self.db = db

    # --- writing ------------------------------------------------------------------------------------

    async def create(self, *, user_id: int, input: Mapping[str, Any], backend: str, guild_id: int | None = None,
                     channel_id: int | None = None, parent_job_id: int | None = None,
                     blobs: Mapping[str, Blob] | None = None, blob_refs: Mapping[str, str] | None = None,
                     age_restricted: bool = False, cost: int = 0, asked: Mapping[str, Any] | None = None,
                     plan: CropPlan | None = None) -> Job:
        """Insert a `queued` job, its input blobs and its first event.

        `blobs` maps a role ("image", "mask") to new blobs; `blob_refs` maps a role to the sha256 of a blob already
        stored (a reroll shares its parent's inputs without copying them).
        """
        now = time.time()
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "INSERT INTO jobs (guild_id, channel_id, user_id, status, parent_job_id, backend, input_json, "
                "created_at, updated_at, age_restricted, cost, options_json, plan_json) "
                "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (guild_id, channel_id, user_id, parent_job_id, backend, json.dumps(input, allow_nan=False), now, now,
                 int(age_restricted), cost, json.dumps(asked, allow_nan=False) if asked is not None else None,
                 plan.model_dump_json() if plan is not None else None))
            job_id = cur.lastrowid
            assert job_id is not None
            await _attach(conn, job_id, blobs or {}, now)
            for role, sha in (blob_refs or {}).items():
                await conn.execute("INSERT INTO job_blobs (job_id, role, sha256) VALUES (?, ?, ?)",
                                   (job_id, role, sha))
            await _insert_event(conn, job_id, "state", "queued", None, now)
        return await self.get(job_id)

    async def transition(self, job_id: int, new_status: JobStatus, *, message: str | None = None,
                         data: Mapping[str, Any] | None = None, blobs: Mapping[str, Blob] | None = None,
                         **fields: Any) -> Job:
        """Move a job to `new_status`, refusing illegal transitions, and record the change as an event.

        `fields` may set the backend request id and URLs, `result`, `error` or `status_message_id` in the same
        transaction, and `blobs` attaches blobs (a result's images) in it too. Re-queueing (`→ queued`) clears the
        backend request; each submission counts an attempt.
        """
        unknown = set(fields) - _TRANSITION_FIELDS
        if unknown:
            raise TypeError(f"transition() got unexpected fields {sorted(unknown)}")
        new_status = JobStatus(new_status)
        now = time.time()
        async with self.db.transaction() as conn:
            async with conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)) as cur:
                row = await cur.fetchone()
            if row is None:
                raise JobNotFound(f"no job {job_id}")
            current = JobStatus(row[0])
            if new_status not in TRANSITIONS[current]:
                raise IllegalTransition(job_id, current, new_status)
            sets = self._transition_columns(new_status, fields, now)
            attempts = 1 if new_status is JobStatus.SUBMITTED else 0
            assignments = ", ".join(f"{k} = ?" for k in sets) + ", attempts = attempts + ?"
            await conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*sets.values(), attempts, job_id))
            await _insert_event(conn, job_id, "state", message or new_status.value,
                                {"from": current.value, "to": new_status.value, **(data or {})}, now)
            await _attach(conn, job_id, blobs or {}, now)
        return await self.get(job_id)

    @staticmethod
    def _transition_columns(new_status: JobStatus, fields: Mapping[str, Any], now: float) -> dict[str, Any]:
        sets: dict[str, Any] = {"status": new_status.value, "updated_at": now}
        for key, value in fields.items():
            if key == "result":
                sets["result_json"] = json.dumps(value) if value is not None else None
            else:
                sets[key] = value
        if new_status is JobStatus.SUBMITTED:
            sets["submitted_at"] = now
        elif new_status is JobStatus.RUNNING:
            sets["started_at"] = now
        elif new_status is JobStatus.QUEUED:
            for key in _BACKEND_REQUEST:
                sets.setdefault(key, None)
        elif new_status in TERMINAL:
            sets["finished_at"] = now
        return sets

    async def attach_blobs(self, job_id: int, blobs: Mapping[str, Blob]) -> None:
        """Attach more blobs to a job (its output images), replacing any with the same role."""
        async with self.db.transaction() as conn:
            await _attach(conn, job_id, blobs, time.time())

    async def set_status_message(self, job_id: int, message_id: int | None) -> None:
        async with self.db.transaction() as conn:
            await conn.execute("UPDATE jobs SET status_message_id = ?, updated_at = ? WHERE id = ?",
                               (message_id, time.time(), job_id))

    async def set_result_message(self, job_id: int, message_id: int) -> None:
        now = time.time()
        async with self.db.transaction() as conn:
            await conn.execute("UPDATE jobs SET result_message_id = ?, updated_at = ? WHERE id = ?",
                               (message_id, now, job_id))
            await _insert_event(conn, job_id, "posted", f"result posted as message {message_id}", None, now)

    async def sharing_result_message(self, message_id: int) -> list[int]:
        """The jobs whose results one message still shows (several when they were posted together), by id."""
        rows = await self.db.fetch_all("SELECT id FROM jobs WHERE result_message_id = ? AND result_removed_at IS NULL "
                                       "ORDER BY id", (message_id,))
        return [int(row[0]) for row in rows]

    async def set_result_removed(self, job_id: int, by: int, *, removed: bool = True) -> bool:
        """Mark the job's posted result as taken out of the channel (or, with `removed=False`, back after a removal
        that failed); False when it already was (or wasn't)."""
        now = time.time()
        async with self.db.transaction() as conn:
            if removed:
                cur = await conn.execute("UPDATE jobs SET result_removed_at = ?, updated_at = ? WHERE id = ? AND "
                                         "result_message_id IS NOT NULL AND result_removed_at IS NULL",
                                         (now, now, job_id))
            else:
                cur = await conn.execute("UPDATE jobs SET result_removed_at = NULL, updated_at = ? WHERE id = ? AND "
                                         "result_removed_at IS NOT NULL", (now, job_id))
            if cur.rowcount != 1:
                return False
            message = f"result removed from the channel by {by}" if removed else "result removal failed"
            await _insert_event(conn, job_id, "note", message, {"by": by}, now)
        return True

    async def start_clock(self, job_id: int, deadline_at: float) -> Job:
        """Fix the job's deadline at the backend, unless it already has one (a restart keeps the first)."""
        async with self.db.transaction() as conn:
            await conn.execute("UPDATE jobs SET deadline_at = ? WHERE id = ? AND deadline_at IS NULL",
                               (deadline_at, job_id))
        return await self.get(job_id)

    async def begin_submit(self, job_id: int, key: str, *, backend: str | None = None) -> Job:
        """Record, before the request is sent, that the job is being submitted with `key` (its Idempotency-Key), and
        to which `backend` (the pool's name for it; None: the one it has): after a crash, recovery knows which
        backend may hold it."""
        now = time.time()
        async with self.db.transaction() as conn:
            await conn.execute("UPDATE jobs SET submit_key = ?, backend = COALESCE(?, backend), updated_at = ? "
                               "WHERE id = ?", (key, backend, now, job_id))
            where = f"the backend {backend}" if backend is not None else "the backend"
            await _insert_event(conn, job_id, "note", f"submitting to {where}",
                                {"submit_key": key, **({"backend": backend} if backend is not None else {})}, now)
        return await self.get(job_id)

    async def forget_submit(self, job_id: int, why: str) -> Job:
        """The submission recorded by `begin_submit` certainly never reached the backend: forget its key."""
        now = time.time()
        async with self.db.transaction() as conn:
            await conn.execute("UPDATE jobs SET submit_key = NULL, updated_at = ? WHERE id = ? AND status = 'queued'",
                               (now, job_id))
            await _insert_event(conn, job_id, "note", f"not submitted: {why}", None, now)
        return await self.get(job_id)

    async def add_event(self, job_id: int, kind: str, message: str, data: Mapping[str, Any] | None = None) -> int:
        """Append an event (a backend log line, a queue position, a note) to a job's history."""
        async with self.db.transaction() as conn:
            return await _insert_event(conn, job_id, kind, message, data, time.time())

    async def add_events(self, job_id: int, events: Sequence[tuple[str, str, dict[str, Any] | None]]) -> None:
        """Append several events in one transaction (a poll's batch of new log lines)."""
        if not events:
            return
        now = time.time()
        async with self.db.transaction() as conn:
            await conn.executemany(
                "INSERT INTO job_events (job_id, kind, message, data_json, created_at) VALUES (?, ?, ?, ?, ?)",
                [(job_id, k, m, json.dumps(d) if d is not None else None, now) for k, m, d in events])

    # --- reading ------------------------------------------------------------------------------------

    async def get(self, job_id: int) -> Job:
        row = await self.db.fetch_one(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        if row is None:
            raise JobNotFound(f"no job {job_id}")
        return _job(row)

    async def with_status(self, statuses: Iterable[JobStatus]) -> list[Job]:
        wanted = [JobStatus(s).value for s in statuses]
        marks = ",".join("?" * len(wanted))
        rows = await self.db.fetch_all(f"SELECT {_COLUMNS} FROM jobs WHERE status IN ({marks}) ORDER BY id", wanted)
        return [_job(r) for r in rows]

    async def for_user(self, user_id: int, *, guild_id: int | None = None, limit: int = 10) -> list[Job]:
        """A user's most recent jobs, newest first (in one server, given `guild_id`)."""
        sql = f"SELECT {_COLUMNS} FROM jobs WHERE user_id = ?"
        args: list[Any] = [user_id]
        if guild_id is not None:
            sql += " AND guild_id = ?"
            args.append(guild_id)
        rows = await self.db.fetch_all(sql + " ORDER BY id DESC LIMIT ?", [*args, limit])
        return [_job(r) for r in rows]

    async def unposted_results(self) -> list[Job]:
        """Succeeded jobs whose result never reached their channel (the bot stopped in between): read from the
        partial index of exactly those (V11), not from every succeeded job."""
        rows = await self.db.fetch_all(
            f"SELECT {_COLUMNS} FROM jobs INDEXED BY jobs_unposted WHERE status = 'succeeded' "
            "AND result_message_id IS NULL AND channel_id IS NOT NULL ORDER BY id")
        return [_job(r) for r in rows]

    async def blobs(self, job_id: int) -> dict[str, Blob]:
        """A job's blobs by role ("image", "mask", "output_0", …)."""
        rows = await self.db.fetch_all(
            "SELECT jb.role, b.sha256, b.content_type, b.data FROM job_blobs jb "
            "JOIN blobs b ON b.sha256 = jb.sha256 WHERE jb.job_id = ?", (job_id,))
        return {r["role"]: Blob(bytes(r["data"]), r["content_type"], sha256=r["sha256"]) for r in rows}

    async def blob_refs(self, job_id: int) -> dict[str, str]:
        """A job's blob hashes by role, without reading the bytes."""
        rows = await self.db.fetch_all("SELECT role, sha256 FROM job_blobs WHERE job_id = ?", (job_id,))
        return {r["role"]: r["sha256"] for r in rows}

    async def events(self, job_id: int, *, kind: str | None = None, after_id: int = 0) -> list[JobEvent]:
        sql = "SELECT id, job_id, kind, message, data_json, created_at FROM job_events WHERE job_id = ? AND id > ?"
        args: list[Any] = [job_id, after_id]
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        return [_event(r) for r in await self.db.fetch_all(sql + " ORDER BY id", args)]
