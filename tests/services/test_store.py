"""The SQLite job store: migrations, the state machine, events, blobs, settings, concurrency, restarts."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.store import (
    SCHEMA_VERSION,
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    JobNotFound,
    JobStatus,
    JobStore,
)

INPUT = {"prompt": "a red boat", "image_url": "blob:image", "mask_url": "blob:mask", "seed": 17454220438242315174}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[JobStore]:
    async with await JobStore.open(tmp_path / "jobs.sqlite3") as s:
        yield s


async def test_migrations_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "bot.sqlite3"
    async with await JobStore.open(path) as store:
        assert await store.schema_version() == SCHEMA_VERSION >= 1
        assert await store.journal_mode() == "wal"
    # reopening applies nothing twice
    async with await JobStore.open(path) as store:
        assert await store.schema_version() == SCHEMA_VERSION
    # a database from newer code is refused rather than misread
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="newer"):
        await JobStore.open(path)


async def test_job_lifecycle_with_events(store: JobStore) -> None:
    job = await store.create_job(user_id=7, guild_id=1, channel_id=2, input=INPUT, backend="fal")
    assert job.status is JobStatus.QUEUED and job.attempts == 0 and job.input == INPUT
    assert job.input["seed"] == 17454220438242315174  # a seed above 2**63 survives JSON storage

    job = await store.transition(job.id, JobStatus.SUBMITTED, backend_request_id="req-1",
                                 status_url="http://w/requests/req-1/status", response_url="http://w/requests/req-1",
                                 cancel_url="http://w/requests/req-1/cancel")
    assert job.attempts == 1 and job.submitted_at is not None and job.backend_request_id == "req-1"
    await store.add_event(job.id, "queue", "position 2", {"position": 2})
    job = await store.transition(job.id, JobStatus.RUNNING)
    await store.add_events(job.id, [("log", "step 1/3", None), ("log", "step 2/3", {"level": "INFO"})])
    job = await store.transition(job.id, JobStatus.SUCCEEDED, result={"images": [], "seed": 3})
    assert job.terminal and job.result == {"images": [], "seed": 3} and job.finished_at is not None

    events = await store.events(job.id)
    assert [(e.kind, e.message) for e in events] == [
        ("state", "queued"), ("state", "submitted"), ("queue", "position 2"), ("state", "running"),
        ("log", "step 1/3"), ("log", "step 2/3"), ("state", "succeeded")]
    assert events[1].data == {"from": "queued", "to": "submitted"}
    assert [e.message for e in await store.events(job.id, kind="log")] == ["step 1/3", "step 2/3"]
    assert [e.message for e in await store.events(job.id, after_id=events[4].id)] == ["step 2/3", "succeeded"]


async def test_illegal_transitions_are_refused(store: JobStore) -> None:
    job = await store.create_job(user_id=1, input=INPUT, backend="fal")
    with pytest.raises(IllegalTransition):
        await store.transition(job.id, JobStatus.RUNNING)  # queued → running skips submission
    with pytest.raises(IllegalTransition):
        await store.transition(job.id, JobStatus.SUCCEEDED)
    await store.transition(job.id, JobStatus.CANCELLED)
    for target in JobStatus:
        with pytest.raises(IllegalTransition):
            await store.transition(job.id, target)  # terminal means terminal
    assert (await store.get_job(job.id)).status is JobStatus.CANCELLED
    # refused transitions leave no trace in the history
    assert [e.message for e in await store.events(job.id)] == ["queued", "cancelled"]
    with pytest.raises(JobNotFound):
        await store.transition(999, JobStatus.SUBMITTED)
    with pytest.raises(TypeError):
        await store.transition(job.id, JobStatus.FAILED, bogus=1)


def test_transition_table_shape() -> None:
    assert set(TRANSITIONS) == set(JobStatus)
    for status in TERMINAL:
        assert TRANSITIONS[status] == frozenset()
    # every non-terminal state can end as failed or cancelled
    for status in set(JobStatus) - TERMINAL:
        assert {JobStatus.FAILED, JobStatus.CANCELLED} <= TRANSITIONS[status]


async def test_requeue_clears_backend_request_and_counts_attempts(store: JobStore) -> None:
    job = await store.create_job(user_id=1, input=INPUT, backend="worker")
    await store.transition(job.id, JobStatus.SUBMITTED, backend_request_id="a", status_url="s", response_url="r",
                           cancel_url="c")
    job = await store.transition(job.id, JobStatus.QUEUED, message="worker lost the request")
    assert job.backend_request_id is None and job.status_url is None and job.attempts == 1
    job = await store.transition(job.id, JobStatus.SUBMITTED, backend_request_id="b")
    assert job.attempts == 2 and job.backend_request_id == "b"


async def test_concurrent_writers_lose_nothing(store: JobStore) -> None:
    jobs = [await store.create_job(user_id=i % 5, input={"i": i}, backend="fal") for i in range(40)]

    async def drive(job_id: int) -> None:
        await store.transition(job_id, JobStatus.SUBMITTED, backend_request_id=f"r{job_id}")
        await store.transition(job_id, JobStatus.RUNNING)
        for n in range(10):
            await store.add_event(job_id, "log", f"step {n}")
        await store.transition(job_id, JobStatus.SUCCEEDED, result={"job": job_id})

    async def race(job_id: int) -> bool:
        try:
            await store.transition(job_id, JobStatus.CANCELLED)
            return True
        except IllegalTransition:
            return False

    await asyncio.gather(*(drive(j.id) for j in jobs))
    for job in jobs:
        final = await store.get_job(job.id)
        assert final.status is JobStatus.SUCCEEDED and final.result == {"job": job.id}
        assert [e.message for e in await store.events(job.id, kind="log")] == [f"step {n}" for n in range(10)]

    # many tasks racing to move one job: exactly one wins
    contested = await store.create_job(user_id=1, input={}, backend="fal")
    wins = await asyncio.gather(*(race(contested.id) for _ in range(20)))
    assert wins.count(True) == 1


async def test_blobs_are_content_addressed(store: JobStore) -> None:
    image, mask = b"\x89PNG image bytes", b"\x89PNG mask bytes"
    a = await store.create_job(user_id=1, input=INPUT, backend="fal",
                               blobs={"image": (image, "image/png"), "mask": (mask, "image/png")})
    b = await store.create_job(user_id=2, input=INPUT, backend="fal",
                               blobs={"image": (image, "image/png"), "mask": (b"other", "image/png")})
    assert await store.blob_count() == 3  # the shared image is stored once
    blobs_a = await store.job_blobs(a.id)
    assert blobs_a["image"].data == image and blobs_a["mask"].data == mask
    assert (await store.job_blobs(b.id))["image"].sha256 == blobs_a["image"].sha256
    sha = await store.put_blob(image, "image/png")
    assert sha == blobs_a["image"].sha256 and await store.blob_count() == 3
    stored = await store.get_blob(sha)
    assert stored is not None and stored.content_type == "image/png"
    assert await store.get_blob("0" * 64) is None


async def test_guild_settings(store: JobStore) -> None:
    assert await store.get_guild_settings(10) == {}
    await store.set_guild_settings(10, {"nsfw_policy": "block", "filters": ["foo", "ba+r"], "daily_quota": 50})
    await store.set_guild_settings(11, {"nsfw_policy": "spoiler"})
    await store.set_guild_settings(10, {"daily_quota": 60, "filters": None})
    assert await store.get_guild_settings(10) == {"nsfw_policy": "block", "daily_quota": 60}
    assert await store.get_guild_settings(11) == {"nsfw_policy": "spoiler"}


async def test_everything_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    async with await JobStore.open(path) as store:
        running = await store.create_job(user_id=1, input=INPUT, backend="fal",
                                         blobs={"image": (b"img", "image/png")})
        await store.transition(running.id, JobStatus.SUBMITTED, backend_request_id="r1", status_url="s")
        queued = await store.create_job(user_id=2, input=INPUT, backend="fal")
        done = await store.create_job(user_id=3, input=INPUT, backend="fal")
        await store.transition(done.id, JobStatus.FAILED, error="backend down")
        await store.set_status_message(running.id, 123456789012345678)
        await store.set_guild_settings(5, {"x": 1})
    async with await JobStore.open(path) as store:
        pending = await store.jobs_with_status([JobStatus.QUEUED, JobStatus.SUBMITTED, JobStatus.RUNNING])
        assert [j.id for j in pending] == [running.id, queued.id]
        resumed = await store.get_job(running.id)
        assert resumed.backend_request_id == "r1" and resumed.status_message_id == 123456789012345678
        assert (await store.job_blobs(running.id))["image"].data == b"img"
        assert (await store.get_job(done.id)).error == "backend down"
        assert [j.id for j in await store.jobs_for_user(3)] == [done.id]
        assert await store.get_guild_settings(5) == {"x": 1}
