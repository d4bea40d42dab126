"""Retention: how long the bot keeps what its jobs leave behind, and the periodic cleanup that deletes the rest and
gives the space back to the disk.

    async with RetentionCleanup(store, RetentionPolicy.from_config(config)):
        ...  # a sweep soon after start, then every `interval_s`

What a sweep deletes (`services/store/retention.py` runs each step as short write transactions of a few hundred
rows, so a job being created or posted never waits long behind it):

- a finished job's pictures (the upload, mask, crops) `inputs_days` after it finished, and drafts nobody confirmed;
- a finished job's result images `results_days` after it finished, once the result is posted;
- a finished job's event history `events_days` after it finished (the job row itself stays: options, status,
  error, cost, for /jobs, /job and quotas);
- moderation-log entries after `modlog_days`; painter links an hour after they stopped working;
- then every blob no job, draft or painter link refers to any more, and the freed pages go back to the disk
  (`PRAGMA incremental_vacuum`). A database created before incremental vacuum is converted by one `VACUUM` when
  its live data is small enough to copy quickly (`convert_max_bytes`); a larger one reuses its free pages and is
  converted offline: stop the bot and run `python -m services.retention --vacuum`.

A queued, submitted or running job loses nothing, nor does a result the bot has yet to post. A button on an old
result whose pictures were deleted says so, and after how long (`pictures_gone`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields
from functools import partial
from typing import TYPE_CHECKING, Self

from pydantic import BaseModel, ConfigDict, Field

from services.refusals import ImagesGone
from services.store import Store
from services.store.retention import JobData

if TYPE_CHECKING:
    from services.config import BotConfig

log = logging.getLogger(__name__)

DAY_S = 86400.0
#: jobs per write transaction when deleting their pictures or results (rows of job_blobs: a few each)
JOB_BATCH = 100
#: jobs per write transaction when deleting their events (a job may have hundreds)
EVENT_JOB_BATCH = 20
#: drafts, painter links, mod-log entries or upload checks per write transaction
ROW_BATCH = 500
#: blob hashes looked at per read while collecting
BLOB_SCAN = 500
#: the most blob bytes deleted per write transaction (SQLite reads each overflow page it frees)
BLOB_DELETE_BYTES = 8 * 1024 * 1024
#: pages handed back to the disk per `incremental_vacuum` step (1 MiB at SQLite's default page size)
VACUUM_STEP_PAGES = 256


class RetentionPolicy(BaseModel):
    """How long things are kept, in days after the job finished (0: forever)."""

    model_config = ConfigDict(frozen=True)

    inputs_days: float = Field(default=7, ge=0)
    results_days: float = Field(default=30, ge=0)
    events_days: float = Field(default=30, ge=0)
    modlog_days: float = Field(default=365, ge=0)
    #: painter links are deleted this long after they stopped working (a submit in progress finishes first)
    painter_grace_s: float = Field(default=3600, ge=0)

    @classmethod
    def from_config(cls, config: BotConfig) -> Self:
        return cls(inputs_days=config.retention_inputs_days, results_days=config.retention_results_days,
                   events_days=config.retention_events_days, modlog_days=config.retention_modlog_days)

    @staticmethod
    def cutoff(days: float, now: float) -> float | None:
        """The moment before which things kept `days` have expired (None: kept forever)."""
        return now - days * DAY_S if days > 0 else None


@dataclass
class SweepReport:
    """What one sweep deleted: jobs that lost their pictures, results or events; rows; blobs; disk space."""

    inputs: int = 0
    results: int = 0
    events: int = 0
    drafts: int = 0
    painter_sessions: int = 0
    modlog: int = 0
    upload_checks: int = 0
    spend_days: int = 0  # spending-ledger rows of days past the events' retention
    blobs: int = 0
    blob_bytes: int = 0
    reclaimed_bytes: int = 0  # how much smaller the database file got
    converted: bool = False  # an old database was converted to incremental vacuum
    seconds: float = 0.0

    def summary(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name))


class RetentionCleanup:
    """The periodic cleanup. `sweep()` runs one (tests and `python -m services.retention` call it directly)."""

    def __init__(self, store: Store, policy: RetentionPolicy, *, interval_s: float = 3600.0,
                 first_delay_s: float = 60.0, convert_max_bytes: int = 256 * 1024 * 1024,
                 pause_s: float = 0.002, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.policy = policy
        self.interval_s = interval_s
        self.first_delay_s = first_delay_s
        self.convert_max_bytes = convert_max_bytes
        self.pause_s = pause_s
        self.clock = clock
        self._task: asyncio.Task[None] | None = None
        self._warned_convert = False

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name="retention-cleanup")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()  # a batch in progress rolls back; the next start sweeps it again
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        await asyncio.sleep(self.first_delay_s)
        while True:
            try:
                report = await self.sweep()
                log.info("retention sweep: %s", report.summary() or "nothing to delete")
            except Exception:
                log.exception("the retention sweep failed; trying again in %.0f s", self.interval_s)
            await asyncio.sleep(self.interval_s)

    async def sweep(self, now: float | None = None) -> SweepReport:
        """Delete everything expired at `now` (default the clock), collect unreferenced blobs, reclaim space."""
        now = self.clock() if now is None else now
        started = time.perf_counter()
        report = SweepReport()
        retention, policy = self.store.retention, self.policy
        job_steps: tuple[tuple[JobData, float, int], ...] = (
            ("inputs", policy.inputs_days, JOB_BATCH), ("results", policy.results_days, JOB_BATCH),
            ("events", policy.events_days, EVENT_JOB_BATCH))
        for data, days, batch in job_steps:
            if (before := policy.cutoff(days, now)) is not None:
                setattr(report, data, await self._drain(partial(retention.expire_jobs, data, before, now, limit=batch),
                                                        batch))
        if (before := policy.cutoff(policy.inputs_days, now)) is not None:
            report.drafts = await self._drain(partial(retention.delete_drafts, before, limit=ROW_BATCH), ROW_BATCH)
            report.upload_checks = await self._drain(partial(retention.delete_upload_checks, before, limit=ROW_BATCH),
                                                     ROW_BATCH)
        if (before := policy.cutoff(policy.modlog_days, now)) is not None:
            report.modlog = await self._drain(partial(retention.delete_modlog, before, limit=ROW_BATCH), ROW_BATCH)
        if (before := policy.cutoff(policy.events_days, now)) is not None:  # the spending ledger's old days
            report.spend_days = await self.store.spend.forget_before(int(before // DAY_S))
        report.painter_sessions = await self._drain(
            partial(retention.delete_painter_sessions, now - policy.painter_grace_s, limit=ROW_BATCH), ROW_BATCH)
        report.blobs, report.blob_bytes = await self.collect_blobs()
        report.reclaimed_bytes, report.converted = await self.reclaim()
        report.seconds = time.perf_counter() - started
        return report

    async def _drain(self, step: Callable[[], Awaitable[int]], batch: int) -> int:
        """Run `step` (one batch, returning how many it deleted) until a batch comes back short."""
        total = 0
        while True:
            done = await step()
            total += done
            if done < batch:
                return total
            await asyncio.sleep(self.pause_s)  # let waiting writers in

    async def collect_blobs(self) -> tuple[int, int]:
        """Delete every blob nothing refers to (walking the blobs' hashes a page at a time); returns how many went
        and their bytes."""
        retention = self.store.retention
        count = size = 0
        after = ""
        while keys := await retention.blob_keys(after, limit=BLOB_SCAN):
            after = keys[-1]
            for chunk in _by_bytes(await retention.unreferenced(keys)):
                deleted, deleted_bytes = await retention.delete_unreferenced(chunk)
                count, size = count + deleted, size + deleted_bytes
                await asyncio.sleep(self.pause_s)
            await asyncio.sleep(0)
        return count, size

    async def reclaim(self) -> tuple[int, bool]:
        """Give free pages back to the disk; returns how many bytes the file shrank, and whether an old database
        was converted to incremental vacuum on the way."""
        db = self.store.db
        before = (await db.space()).file_bytes
        converted = False
        mode = await db.auto_vacuum()
        if mode == "none":
            space = await db.space()
            if space.free_pages == 0:
                return 0, False
            if space.used_bytes > self.convert_max_bytes:
                if not self._warned_convert:
                    log.warning("the database was created before incremental vacuum: it reuses its %d MB of free "
                                "space but can't give it back to the disk. To convert it (once), stop the bot and "
                                "run `python -m services.retention --vacuum`; it needs %d MB free on the disk",
                                space.free_pages * space.page_size // 2**20, space.used_bytes // 2**20)
                    self._warned_convert = True
                return 0, False
            log.info("converting the database to incremental vacuum (%d MB of live data, once)",
                     space.used_bytes // 2**20)
            await db.vacuum()
            converted = True
        elif mode == "incremental":
            free = (await db.space()).free_pages
            while free:  # a few MB a step: writers wait for one step at most
                free = await db.incremental_vacuum(VACUUM_STEP_PAGES)
                await asyncio.sleep(self.pause_s)
        await db.checkpoint()
        return max(0, before - (await db.space()).file_bytes), converted


def _by_bytes(blobs: Sequence[tuple[str, int]]) -> list[list[str]]:
    """Blob hashes in groups of at most `BLOB_DELETE_BYTES` (a bigger blob goes alone)."""
    groups: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for sha, size in blobs:
        if current and current_bytes + size > BLOB_DELETE_BYTES:
            groups.append(current)
            current, current_bytes = [], 0
        current.append(sha)
        current_bytes += size
    if current:
        groups.append(current)
    return groups


async def pictures_gone(store: Store, job_id: int, *, result: bool = False) -> ImagesGone:
    """Why job `job_id`'s pictures (or, with `result`, its result images) can't be used: deleted by the retention
    cleanup, and how long after the job finished, when that is what happened."""
    deletions = await store.retention.deletions(job_id)
    if deletions is None or deletions.finished_at is None:
        return ImagesGone(job_id, result=result)
    deleted_at = deletions.results_deleted_at if result else deletions.inputs_deleted_at
    if deleted_at is None:
        return ImagesGone(job_id, result=result)
    return ImagesGone(job_id, deleted_after_s=max(0.0, deleted_at - deletions.finished_at), result=result)


async def _main(argv: Sequence[str] | None = None) -> None:
    from services.config import load_config

    parser = argparse.ArgumentParser(prog="python -m services.retention",
                                     description="Run one retention sweep on the bot's database (DATABASE_PATH), "
                                                 "with the RETENTION_* settings. Stop the bot first.")
    parser.add_argument("--vacuum", action="store_true",
                        help="also convert a database created before incremental vacuum, whatever its size (it "
                             "needs as much free disk as the live data)")
    args = parser.parse_args(argv)
    config = load_config()
    async with await Store.open(config.database_path) as store:
        most = (1 << 62) if args.vacuum else config.retention_convert_max_mb << 20
        cleanup = RetentionCleanup(store, RetentionPolicy.from_config(config), convert_max_bytes=most)
        report = await cleanup.sweep()
        space, mode = await store.db.space(), await store.db.auto_vacuum()
    print(f"deleted: {report.summary() or 'nothing'}; the database is {space.file_bytes / 2**20:.1f} MB "
          f"(auto_vacuum {mode})")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(_main())
