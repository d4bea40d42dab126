"""Benchmark: the store at 100k jobs, before and after V11 (retention, covering quota indexes), and what the
retention cleanup leaves per job.

    .venv/bin/python -m bench.store_growth [--jobs 100000] [--days 60] [--real 200] [--dir DIR]

Builds a database at schema v8 (as the previous code left it: `auto_vacuum` off) holding `--jobs` jobs spread over
`--days` days and 20 servers (one busy server with 40% of the jobs; 50 to 500 users each, a few heavy users),
with the events, blobs and moderation log a running bot writes: 88% succeeded and posted, 5% failed, 3% blocked,
2% cancelled, 20% derived from an earlier job (sharing its pictures by hash), a few still queued or running and a
few results never posted. Every job has its picture, mask, crop, crop mask and result as small fake blobs, except
`--real` jobs with realistic sizes (about 1.35 MB: a 600 KB upload, 500 KB crop, 250 KB result, masks).

Then times, on the old schema and again after the V11 migration (the real `Store.open`):
- admission: the quota counts /inpaint runs for a user of the busy server (`usage.since`), plus the ban and
  settings lookups; target ≤ 2 ms;
- start-up recovery: results never posted and unfinished jobs; target ≤ 20 ms;
then runs the retention cleanup with the defaults (7 / 30 / 30 / 365 days) at the end of the period, and again as
if every job had expired, reporting the database's size per job, the sweep's time and its longest write.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from services.crop_plan import CropPlan, StitchOptions
from services.job_state import JobStatus
from services.quotas import day_start
from services.retention import DAY_S, RetentionCleanup, RetentionPolicy
from services.store import Store
from services.store.database import MIGRATIONS, Database

OLD_VERSION = 8
SERVERS = 20
#: what quotas counted before V11 (services/store/usage.py at v8)
_COUNTED = "status != 'blocked' AND NOT (status IN ('failed', 'cancelled') AND attempts = 0)"
OLD_USAGE = (f"SELECT COUNT(*) AS server_jobs, COALESCE(SUM(user_id = ?), 0) AS user_jobs, "
             f"COALESCE(SUM(cost), 0) AS server_steps FROM jobs WHERE guild_id = ? AND created_at >= ? AND {_COUNTED}")
OLD_LAST = f"SELECT MAX(created_at) FROM jobs WHERE guild_id = ? AND user_id = ? AND {_COUNTED}"
OLD_UNPOSTED = ("SELECT * FROM jobs WHERE status = 'succeeded' AND result_message_id IS NULL "
                "AND channel_id IS NOT NULL ORDER BY id")
BANNED = "SELECT 1 FROM bans WHERE guild_id = ? AND user_id = ?"
NEW_USAGE = OLD_USAGE  # the same query, answered from the covering index jobs_guild_usage
NEW_LAST = (f"SELECT created_at FROM jobs WHERE guild_id = ? AND user_id = ? AND {_COUNTED} "
            "ORDER BY created_at DESC LIMIT 1")
NEW_UNPOSTED = OLD_UNPOSTED.replace("FROM jobs", "FROM jobs INDEXED BY jobs_unposted")
LIVE = "SELECT * FROM jobs WHERE status IN ('submitted', 'running', 'queued') ORDER BY id"
PLAN = CropPlan(options=StitchOptions(), image_size=(1536, 1024), crop=(256, 0, 1024, 1024), sent=(1024, 1024),
                output_format="png").model_dump_json()
REAL_SIZES = {"image": 600_000, "mask": 20_000, "crop_image": 500_000, "crop_mask": 10_000, "output_0": 250_000}


def build(path: Path, jobs: int, days: float, real: int, seed: int = 13) -> tuple[float, int, int]:
    """Write the v8 database; returns the period's end, the busy server's id and its busiest user's id."""
    rng = random.Random(seed)
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("PRAGMA journal_mode=WAL")
    raw.execute("PRAGMA synchronous=OFF")
    for migration in MIGRATIONS[:OLD_VERSION]:
        raw.executescript(f"BEGIN;\n{migration.sql}\n;PRAGMA user_version = {migration.version};\nCOMMIT;")
    end = time.time()
    start = end - days * DAY_S
    weights = [0.4] + [0.6 / (SERVERS - 1)] * (SERVERS - 1)
    users = {g: [g * 10_000 + u for u in range(rng.randint(50, 500))] for g in range(1, SERVERS + 1)}
    real_ids = set(rng.sample(range(1, jobs + 1), real))
    statuses = (["succeeded"] * 88 + ["failed"] * 5 + ["blocked"] * 3 + ["cancelled"] * 2 + ["succeeded"] * 2)
    job_rows: list[tuple[Any, ...]] = []
    event_rows: list[tuple[Any, ...]] = []
    blob_rows: list[tuple[Any, ...]] = []
    ref_rows: list[tuple[Any, ...]] = []
    modlog_rows: list[tuple[Any, ...]] = []
    inputs_of: dict[int, dict[str, str]] = {}
    times = sorted(rng.uniform(start, end - 600) for _ in range(jobs))
    for job_id, created in enumerate(times, start=1):
        guild = rng.choices(range(1, SERVERS + 1), weights)[0]
        pool = users[guild]
        user = pool[0] if rng.random() < 0.05 else rng.choice(pool)  # a heavy user in every server
        status = rng.choice(statuses)
        if job_id > jobs - 5:
            status = ("queued", "queued", "submitted", "running", "running")[jobs - job_id]
        finished = created + rng.uniform(5, 60) if status not in ("queued", "submitted", "running") else None
        attempts = 0 if status == "blocked" or (status == "cancelled" and rng.random() < 0.5) else 1
        posted = 5_000_000 + job_id if status == "succeeded" and rng.random() > 0.0001 else None
        steps, images = rng.choice([(25, 1), (30, 1), (25, 4), (40, 2)])
        options = {"prompt": f"prompt {job_id} " + "words " * rng.randint(3, 30), "num_inference_steps": steps,
                   "num_images": images, "strength": 0.85, "guidance_scale": 7.5}
        body = {**options, "image_url": "blob:crop_image", "mask_url": "blob:crop_mask", "format": "png",
                "image_size": {"width": 1024, "height": 1024}, "enable_safety_checker": True}
        result = json.dumps({"images": [{"url": "stored", "width": 1024, "height": 1024,
                                         "content_type": "image/png"}], "seed": rng.getrandbits(63),
                             "has_nsfw_concepts": [False], "prompt": options["prompt"]}) \
            if status == "succeeded" else None
        parent = None
        if job_id > 10 and rng.random() < 0.2:
            parent = rng.randint(max(1, job_id - 200), job_id - 1)
            if parent not in inputs_of:
                parent = None
        job_rows.append((job_id, guild, guild * 100, user, status, None, parent, "fal", f"req-{job_id}",
                         json.dumps(body), result, "Backend failed" if status == "failed" else None, attempts, created,
                         finished or created, created + 1 if attempts else None, created + 2 if attempts else None,
                         finished, posted, 0, steps * images if status != "blocked" else 0, json.dumps(options),
                         PLAN))
        event_times = [created, created + 1, created + 2] + ([finished] if finished else [])
        for i, when in enumerate(event_times):
            event_rows.append((job_id, "state", ["queued", "submitted", "running", status][i], None, when))
        for step in range(rng.randint(1, 4) if attempts else 0):
            event_rows.append((job_id, "log", f"step {step}", '{"level": "INFO"}', created + 2))
        if posted:
            event_rows.append((job_id, "posted", f"result posted as message {posted}", None, (finished or 0) + 1))
        if parent is not None:
            refs = dict(inputs_of[parent])
        else:
            refs = {}
            for role in ("image", "mask", "crop_image", "crop_mask"):
                size = REAL_SIZES[role] if job_id in real_ids else rng.randint(64, 256)
                data = os.urandom(size)
                sha = f"{job_id:012d}{role:>12}".replace(" ", "-").ljust(64, "0")
                blob_rows.append((sha, "image/png", size, data, created))
                refs[role] = sha
        inputs_of[job_id] = refs
        for role, sha in refs.items():
            ref_rows.append((job_id, role, sha))
        if status == "succeeded":
            size = REAL_SIZES["output_0"] if job_id in real_ids else rng.randint(64, 256)
            sha = f"{job_id:012d}{'output_0':>12}".replace(" ", "-").ljust(64, "0")
            blob_rows.append((sha, "image/png", size, os.urandom(size), finished))
            ref_rows.append((job_id, "output_0", sha))
        if status == "blocked":
            modlog_rows.append((guild, job_id, user, None, "prompt_blocked", "a rule: a prompt", created))
    raw.execute("BEGIN")
    raw.executemany("INSERT INTO jobs (id, guild_id, channel_id, user_id, status, status_message_id, parent_job_id, "
                    "backend, backend_request_id, input_json, result_json, error, attempts, created_at, updated_at, "
                    "submitted_at, started_at, finished_at, result_message_id, age_restricted, cost, options_json, "
                    "plan_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    job_rows)
    raw.executemany("INSERT INTO job_events (job_id, kind, message, data_json, created_at) VALUES (?, ?, ?, ?, ?)",
                    event_rows)
    raw.executemany("INSERT INTO blobs (sha256, content_type, size, data, created_at) VALUES (?, ?, ?, ?, ?)",
                    blob_rows)
    raw.executemany("INSERT INTO job_blobs (job_id, role, sha256) VALUES (?, ?, ?)", ref_rows)
    raw.executemany("INSERT INTO moderation_log (guild_id, job_id, user_id, actor_id, action, detail, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)", modlog_rows)
    raw.execute("INSERT INTO server_settings (guild_id, key, value_json, updated_at) VALUES (1, 'user_daily_jobs', "
                "'50', 0)")
    raw.execute("COMMIT")
    raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    busiest = raw.execute("SELECT user_id FROM jobs WHERE guild_id = 1 GROUP BY user_id ORDER BY COUNT(*) DESC "
                          "LIMIT 1").fetchone()[0]
    raw.close()
    return end, 1, int(busiest)


async def timed(call: Callable[[], Awaitable[Any]], runs: int) -> tuple[float, float]:
    """Median and 95th percentile in ms of `runs` calls (after 5 to warm up)."""
    for _ in range(5):
        await call()
    samples = []
    for _ in range(runs):
        began = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - began) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.95) - 1]


def show(what: str, figures: tuple[float, float]) -> None:
    print(f"  {what:<44} median {figures[0]:7.3f} ms   p95 {figures[1]:7.3f} ms")


async def raw_queries(path: Path, label: str, now: float, guild: int, user: int, runs: int,
                      queries: tuple[str, str, str]) -> None:
    """The SQL alone (one aiosqlite connection, rows fetched, nothing parsed), as `label`."""
    usage_sql, last_sql, unposted_sql = queries
    async with aiosqlite.connect(path) as conn:
        async def admission() -> None:
            since = day_start(now)
            await (await conn.execute(usage_sql, (user, guild, since))).fetchall()
            await (await conn.execute(last_sql, (guild, user))).fetchall()
            await (await conn.execute(BANNED, (guild, user))).fetchall()
            await (await conn.execute("SELECT key, value_json FROM server_settings WHERE guild_id = ?",
                                      (guild,))).fetchall()

        async def recovery() -> None:
            await (await conn.execute(unposted_sql)).fetchall()
            await (await conn.execute(LIVE)).fetchall()

        print(f"{label}, the SQL alone:")
        show("admission (quota counts, ban, settings)", await timed(admission, runs))
        show("start-up recovery (unposted, unfinished)", await timed(recovery, max(20, runs // 10)))


async def new_schema(store: Store, now: float, guild: int, user: int, runs: int) -> None:
    async def admission() -> None:
        await store.usage.since(guild, user, day_start(now))
        await store.bans.is_banned(guild, user)
        await store.server_settings.load(guild)

    async def recovery() -> None:
        await store.jobs.unposted_results()
        await store.jobs.with_status([JobStatus.SUBMITTED, JobStatus.RUNNING, JobStatus.QUEUED])

    print("schema v11 (after, through the store):")
    show("admission (quota counts, ban, settings)", await timed(admission, runs))
    show("start-up recovery (unposted, unfinished)", await timed(recovery, max(20, runs // 10)))


@asynccontextmanager
async def write_timer(db: Database) -> AsyncIterator[list[tuple[float, str]]]:
    """Every write's time (how long it held the write lock), in ms, and what it was."""
    holds: list[tuple[float, str]] = []
    original = db.transaction

    @asynccontextmanager
    async def timed_transaction() -> AsyncIterator[aiosqlite.Connection]:
        caller = sys._getframe(2).f_code.co_name  # the store method that writes
        async with original() as conn:
            began = time.perf_counter()
            yield conn
        holds.append(((time.perf_counter() - began) * 1000, caller))

    def timing(call: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def timed_call(*args: Any) -> Any:
            began = time.perf_counter()
            try:
                return await call(*args)
            finally:
                holds.append(((time.perf_counter() - began) * 1000, call.__name__))
        return timed_call

    originals = db.transaction, db.incremental_vacuum, db.vacuum
    db.transaction = timed_transaction  # type: ignore[method-assign]
    db.incremental_vacuum = timing(db.incremental_vacuum)  # type: ignore[method-assign,assignment]
    db.vacuum = timing(db.vacuum)  # type: ignore[method-assign,assignment]
    try:
        yield holds
    finally:
        db.transaction, db.incremental_vacuum, db.vacuum = originals  # type: ignore[method-assign]


def size_line(what: str, path: Path, jobs: int) -> int:
    size = path.stat().st_size + (path.with_name(path.name + "-wal").stat().st_size
                                  if path.with_name(path.name + "-wal").exists() else 0)
    print(f"  {what:<44} {size / 2**20:9.1f} MB   {size / jobs / 1024:8.2f} KB per job")
    return size


async def main(jobs: int, days: float, real: int, runs: int, folder: Path, convert_max_mb: int) -> None:
    path = folder / "growth.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"SQLite {sqlite3.sqlite_version}; {jobs} jobs over {days:g} days, {real} with realistic pictures")
    began = time.perf_counter()
    end, guild, user = build(path, jobs, days, real)
    print(f"built in {time.perf_counter() - began:.1f} s")
    size_line("database at v8", path, jobs)
    await raw_queries(path, "schema v8 (before)", end, guild, user, runs, (OLD_USAGE, OLD_LAST, OLD_UNPOSTED))
    began = time.perf_counter()
    async with await Store.open(path) as store:
        print(f"V11 migration on open: {time.perf_counter() - began:.2f} s")
        usage = await store.usage.since(guild, user, day_start(end))
        print(f"  the busy server today: {usage.server_jobs} jobs, {usage.server_steps} steps; its busiest user: "
              f"{usage.user_jobs} jobs today")
        await new_schema(store, end, guild, user, runs)
        await raw_queries(path, "schema v11 (after)", end, guild, user, runs, (NEW_USAGE, NEW_LAST, NEW_UNPOSTED))
        size_line("database at v11, before cleanup", path, jobs)
        for label, policy, now in (
                ("defaults (7/30/30/365 days), at the period's end", RetentionPolicy(), end),
                ("everything expired (a year later)", RetentionPolicy(), end + 400 * DAY_S)):
            cleanup = RetentionCleanup(store, policy, pause_s=0, convert_max_bytes=convert_max_mb << 20)
            async with write_timer(store.db) as holds:
                report = await cleanup.sweep(now)
            holds.sort()
            print(f"cleanup, {label}: {report.seconds:.1f} s, {len(holds)} writes, longest: "
                  + ", ".join(f"{ms:.1f} ms ({what})" for ms, what in reversed(holds[-3:])))
            print(f"  {report.summary()}")
            size_line("database after cleanup", path, jobs)
            if label.startswith("defaults"):
                await new_schema(store, end, guild, user, runs)
        print(f"  auto_vacuum: {await store.db.auto_vacuum()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--days", type=float, default=60.0)
    parser.add_argument("--real", type=int, default=200, help="jobs with realistic picture sizes")
    parser.add_argument("--runs", type=int, default=500, help="timed calls per measurement")
    parser.add_argument("--convert-max-mb", type=int, default=1024,
                        help="convert the old database while running up to this much live data (the bot's default "
                             "is 256; 1024 here shows the size after conversion, as `--vacuum` would)")
    parser.add_argument("--dir", type=Path, default=None, help="where to build the database (default a temp dir)")
    args = parser.parse_args()
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        asyncio.run(main(args.jobs, args.days, args.real, args.runs, args.dir, args.convert_max_mb))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(main(args.jobs, args.days, args.real, args.runs, Path(tmp), args.convert_max_mb))
