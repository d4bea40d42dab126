"""The SQLite store: migrations (and upgrading a database written by older code), the state machine, events,
blobs, server settings, drafts and painter sessions, concurrency, restarts."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.blob import Blob
from services.job_state import TERMINAL, TRANSITIONS, IllegalTransition, JobNotFound, JobStatus
from services.requester import Requester
from services.store import Store
from services.store.database import SCHEMA_VERSION, Database, load_migrations

INPUT = {"prompt": "a red boat", "image_url": "blob:image", "mask_url": "blob:mask", "seed": 17454220438242315174}


V5_DATABASE = Path(__file__).parent / "data" / "store_v5.sqlite3"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with await Store.open(tmp_path / "jobs.sqlite3") as s:
        yield s


async def test_migrations_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "bot.sqlite3"
    async with await Store.open(path) as store:
        assert await store.db.schema_version() == SCHEMA_VERSION >= 6
        assert await store.db.journal_mode() == "wal"
    # reopening applies nothing twice
    async with await Store.open(path) as store:
        assert await store.db.schema_version() == SCHEMA_VERSION
    # a database from newer code is refused rather than misread
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="newer"):
        await Store.open(path)


async def test_job_lifecycle_with_events(store: Store) -> None:
    job = await store.jobs.create(user_id=7, guild_id=1, channel_id=2, input=INPUT, backend="fal")
    assert job.status is JobStatus.QUEUED and job.attempts == 0 and job.input == INPUT
    assert job.input["seed"] == 17454220438242315174  # a seed above 2**63 survives JSON storage

    job = await store.jobs.transition(job.id, JobStatus.SUBMITTED, backend_request_id="req-1",
                                 status_url="http://w/requests/req-1/status", response_url="http://w/requests/req-1",
                                 cancel_url="http://w/requests/req-1/cancel")
    assert job.attempts == 1 and job.submitted_at is not None and job.backend_request_id == "req-1"
    await store.jobs.add_event(job.id, "queue", "position 2", {"position": 2})
    job = await store.jobs.transition(job.id, JobStatus.RUNNING)
    await store.jobs.add_events(job.id, [("log", "step 1/3", None), ("log", "step 2/3", {"level": "INFO"})])
    job = await store.jobs.transition(job.id, JobStatus.SUCCEEDED, result={"images": [], "seed": 3})
    assert job.terminal and job.result == {"images": [], "seed": 3} and job.finished_at is not None

    events = await store.jobs.events(job.id)
    assert [(e.kind, e.message) for e in events] == [
        ("state", "queued"), ("state", "submitted"), ("queue", "position 2"), ("state", "running"),
        ("log", "step 1/3"), ("log", "step 2/3"), ("state", "succeeded")]
    assert events[1].data == {"from": "queued", "to": "submitted"}
    assert [e.message for e in await store.jobs.events(job.id, kind="log")] == ["step 1/3", "step 2/3"]
    assert [e.message for e in await store.jobs.events(job.id, after_id=events[4].id)] == ["step 2/3", "succeeded"]


async def test_illegal_transitions_are_refused(store: Store) -> None:
    job = await store.jobs.create(user_id=1, input=INPUT, backend="fal")
    with pytest.raises(IllegalTransition):
        await store.jobs.transition(job.id, JobStatus.RUNNING)  # queued → running skips submission
    with pytest.raises(IllegalTransition):
        await store.jobs.transition(job.id, JobStatus.SUCCEEDED)
    await store.jobs.transition(job.id, JobStatus.CANCELLED)
    for target in JobStatus:
        with pytest.raises(IllegalTransition):
            await store.jobs.transition(job.id, target)  # terminal means terminal
    assert (await store.jobs.get(job.id)).status is JobStatus.CANCELLED
    # refused transitions leave no trace in the history
    assert [e.message for e in await store.jobs.events(job.id)] == ["queued", "cancelled"]
    with pytest.raises(JobNotFound):
        await store.jobs.transition(999, JobStatus.SUBMITTED)
    with pytest.raises(TypeError):
        await store.jobs.transition(job.id, JobStatus.FAILED, bogus=1)


def test_transition_table_shape() -> None:
    assert set(TRANSITIONS) == set(JobStatus)
    for status in TERMINAL:
        assert TRANSITIONS[status] == frozenset()
    # every non-terminal state can end as failed or cancelled
    for status in set(JobStatus) - TERMINAL:
        assert {JobStatus.FAILED, JobStatus.CANCELLED} <= TRANSITIONS[status]


async def test_requeue_clears_backend_request_and_counts_attempts(store: Store) -> None:
    job = await store.jobs.create(user_id=1, input=INPUT, backend="worker")
    await store.jobs.transition(job.id, JobStatus.SUBMITTED, backend_request_id="a", status_url="s", response_url="r",
                           cancel_url="c")
    job = await store.jobs.transition(job.id, JobStatus.QUEUED, message="worker lost the request")
    assert job.backend_request_id is None and job.status_url is None and job.attempts == 1
    job = await store.jobs.transition(job.id, JobStatus.SUBMITTED, backend_request_id="b")
    assert job.attempts == 2 and job.backend_request_id == "b"


async def test_concurrent_writers_lose_nothing(store: Store) -> None:
    jobs = [await store.jobs.create(user_id=i % 5, input={"i": i}, backend="fal") for i in range(40)]

    async def drive(job_id: int) -> None:
        await store.jobs.transition(job_id, JobStatus.SUBMITTED, backend_request_id=f"r{job_id}")
        await store.jobs.transition(job_id, JobStatus.RUNNING)
        for n in range(10):
            await store.jobs.add_event(job_id, "log", f"step {n}")
        await store.jobs.transition(job_id, JobStatus.SUCCEEDED, result={"job": job_id})

    async def race(job_id: int) -> bool:
        try:
            await store.jobs.transition(job_id, JobStatus.CANCELLED)
            return True
        except IllegalTransition:
            return False

    await asyncio.gather(*(drive(j.id) for j in jobs))
    for job in jobs:
        final = await store.jobs.get(job.id)
        assert final.status is JobStatus.SUCCEEDED and final.result == {"job": job.id}
        assert [e.message for e in await store.jobs.events(job.id, kind="log")] == [f"step {n}" for n in range(10)]

    # many tasks racing to move one job: exactly one wins
    contested = await store.jobs.create(user_id=1, input={}, backend="fal")
    wins = await asyncio.gather(*(race(contested.id) for _ in range(20)))
    assert wins.count(True) == 1


async def test_blobs_are_content_addressed(store: Store) -> None:
    image, mask = b"\x89PNG image bytes", b"\x89PNG mask bytes"
    a = await store.jobs.create(user_id=1, input=INPUT, backend="fal",
                                blobs={"image": Blob(image, "image/png"), "mask": Blob(mask, "image/png")})
    b = await store.jobs.create(user_id=2, input=INPUT, backend="fal",
                                blobs={"image": Blob(image, "image/png"), "mask": Blob(b"other", "image/png")})
    assert await store.blobs.count() == 3  # the shared image is stored once
    blobs_a = await store.jobs.blobs(a.id)
    assert blobs_a["image"].data == image and blobs_a["mask"].data == mask
    assert (await store.jobs.blobs(b.id))["image"].sha256 == blobs_a["image"].sha256
    assert (await store.jobs.blob_refs(a.id))["image"] == blobs_a["image"].sha256
    await store.drafts.create("d", who=Requester(guild_id=1, channel_id=2, user_id=1), image=Blob(image, "image/png"),
                              mask=Blob(mask, "image/png"), params={})
    assert await store.blobs.count() == 3  # a draft of the same images stores nothing new
    stored = await store.blobs.get(blobs_a["image"].sha256)
    assert stored is not None and stored.content_type == "image/png"
    assert await store.blobs.get("0" * 64) is None


async def test_server_settings_key_by_key(store: Store) -> None:
    settings = store.server_settings
    assert await settings.raw(10) == {}
    await settings.save(10, {"nsfw_policy": "spoiler", "filter_words": ["foo"], "user_daily_jobs": 50})
    await settings.save(11, {"nsfw_policy": "allow"})
    await settings.save(10, {"user_daily_jobs": 60, "filter_words": None})
    assert await settings.raw(10) == {"nsfw_policy": "spoiler", "user_daily_jobs": 60}
    assert (await settings.load(10)).filter_words == []
    assert (await settings.load(11)).nsfw_policy == "allow"
    assert (await settings.load(None)).nsfw_policy == "block"  # outside servers: the defaults


async def test_everything_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    async with await Store.open(path) as store:
        running = await store.jobs.create(user_id=1, input=INPUT, backend="fal",
                                         blobs={"image": Blob(b"img", "image/png")})
        await store.jobs.transition(running.id, JobStatus.SUBMITTED, backend_request_id="r1", status_url="s")
        queued = await store.jobs.create(user_id=2, input=INPUT, backend="fal")
        done = await store.jobs.create(user_id=3, input=INPUT, backend="fal")
        await store.jobs.transition(done.id, JobStatus.FAILED, error="backend down")
        await store.jobs.set_status_message(running.id, 123456789012345678)
        await store.server_settings.save(5, {"user_cooldown_s": 30})
    async with await Store.open(path) as store:
        pending = await store.jobs.with_status([JobStatus.QUEUED, JobStatus.SUBMITTED, JobStatus.RUNNING])
        assert [j.id for j in pending] == [running.id, queued.id]
        resumed = await store.jobs.get(running.id)
        assert resumed.backend_request_id == "r1" and resumed.status_message_id == 123456789012345678
        assert (await store.jobs.blobs(running.id))["image"].data == b"img"
        assert (await store.jobs.get(done.id)).error == "backend down"
        assert [j.id for j in await store.jobs.for_user(3)] == [done.id]
        assert await store.server_settings.raw(5) == {"user_cooldown_s": 30}


async def test_a_database_written_by_the_previous_version_upgrades_in_place(tmp_path: Path) -> None:
    """`store_v5.sqlite3` was written by the store as it was at schema v5 (before the store package): two jobs, a
    derived one, server settings, a ban, a mod-log entry, a draft and a painter session."""
    path = tmp_path / "bot.sqlite3"
    path.write_bytes(V5_DATABASE.read_bytes())
    with sqlite3.connect(path) as raw:  # a blocked job whose options came from a form unvalidated (NaN is no JSON)
        raw.execute("INSERT INTO jobs (user_id, status, backend, input_json, created_at, updated_at) "
                    "VALUES (8, 'blocked', 'fal', '{\"prompt\": \"x\", \"strength\": NaN}', 1, 1)")
    async with await Store.open(path) as store:
        assert await store.db.schema_version() == SCHEMA_VERSION
        first, second = await store.jobs.get(1), await store.jobs.get(2)
        assert first.status is JobStatus.SUCCEEDED and first.result_message_id == 555
        assert first.input["image_size"] == {"width": 1024, "height": 768}
        assert (first.cost, second.cost) == (25, 160)  # backfilled: fal's default steps, and 40 steps × 4 images
        assert second.parent_job_id == 1 and second.backend_request_id == "r2"
        assert (await store.jobs.blobs(1))["image"].data.startswith(b"\x89PNG")
        assert (await store.usage.since(1, 8, 0)).server_steps == 185
        assert (await store.server_settings.load(1)).user_daily_jobs == 5
        assert await store.bans.is_banned(1, 9)
        assert [e.action for e in await store.modlog.entries(1)] == ["user_banned"]
        draft = await store.drafts.get("draft-1")
        assert draft is not None and draft.requester.role_ids == (4,) and draft.params == {"prompt": "a kite"}
        session = await store.painter_sessions.get("session-1")
        assert session is not None and session.requester.age_restricted and session.params["prompt"] == "a balloon"
        # and the upgraded database keeps working
        assert (await store.jobs.get(3)).cost == 0
        fourth = await store.jobs.create(user_id=7, guild_id=1, input={}, backend="fal", cost=10)
        assert fourth.id == 4 and (await store.jobs.get(4)).cost == 10
        with pytest.raises(ValueError, match="JSON"):  # nothing new is stored that SQLite can't read back
            await store.jobs.create(user_id=7, input={"strength": float("nan")}, backend="fal")


async def test_a_failing_migration_changes_nothing(tmp_path: Path) -> None:
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "V1__first.sql").write_text("CREATE TABLE a (x INTEGER);")
    (migrations / "V2__broken.sql").write_text("CREATE TABLE b (y INTEGER); INSERT INTO nowhere VALUES (1);")
    found = load_migrations(migrations)
    assert [(m.version, m.name) for m in found] == [(1, "first"), (2, "broken")]
    path = tmp_path / "m.sqlite3"
    with sqlite3.connect(path) as raw:
        raw.executescript(found[0].sql + "PRAGMA user_version = 1;")
    import services.store.database as database

    original = database.MIGRATIONS
    database.MIGRATIONS, database.SCHEMA_VERSION = found, 2
    try:
        with pytest.raises(sqlite3.OperationalError, match="nowhere"):
            await Database.open(path)
    finally:
        database.MIGRATIONS, database.SCHEMA_VERSION = original, len(original)
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (1,)
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "b" not in tables  # V2's first statement was rolled back with the rest


def test_migrations_are_numbered_without_gaps(tmp_path: Path) -> None:
    (tmp_path / "V1__a.sql").write_text("SELECT 1;")
    (tmp_path / "V3__c.sql").write_text("SELECT 1;")
    with pytest.raises(RuntimeError, match="without gaps"):
        load_migrations(tmp_path)
