"""Retention (services/retention.py, services/store/retention.py): the cleanup deletes exactly what expired and
nothing a live job needs, keeps blobs other jobs share, gives the space back to the disk, converts a database
written by older code; and the V11 indexes answer quotas and start-up without reading job rows."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.blob import Blob
from services.job_state import Job, JobStatus
from services.refusals import ImagesGone
from services.requester import Requester
from services.retention import DAY_S, RetentionCleanup, RetentionPolicy, pictures_gone
from services.store import Store
from tests.services.test_store import V5_DATABASE

INPUT = {"prompt": "a red boat", "image_url": "blob:crop_image", "mask_url": "blob:crop_mask"}
WEEK = RetentionPolicy(inputs_days=7, results_days=30, events_days=30, modlog_days=365)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with await Store.open(tmp_path / "bot.sqlite3") as s:
        yield s


def picture(tag: str, size: int = 64) -> Blob:
    return Blob(tag.encode() + os.urandom(size), "image/png")


async def new_job(store: Store, tag: str, *, parent: Job | None = None, channel_id: int | None = 2) -> Job:
    """A job holding its own pictures (or, derived from `parent`, its parent's), like the launcher makes them."""
    if parent is not None:
        refs = {role: sha for role, sha in (await store.jobs.blob_refs(parent.id)).items()
                if not role.startswith("output_")}
        return await store.jobs.create(user_id=7, guild_id=1, channel_id=channel_id, input=INPUT, backend="fal",
                                       parent_job_id=parent.id, blob_refs=refs)
    blobs = {role: picture(f"{tag}-{role}") for role in ("image", "mask", "crop_image", "crop_mask")}
    return await store.jobs.create(user_id=7, guild_id=1, channel_id=channel_id, input=INPUT, backend="fal",
                                   blobs=blobs)


async def run_to(store: Store, job: Job, status: JobStatus, *, posted: bool = True, outputs: int = 1) -> Job:
    """Move `job` on to `status` (through submitted and running), with result images when it succeeds."""
    steps = {JobStatus.SUBMITTED: [JobStatus.SUBMITTED], JobStatus.RUNNING: [JobStatus.SUBMITTED, JobStatus.RUNNING],
             JobStatus.SUCCEEDED: [JobStatus.SUBMITTED, JobStatus.RUNNING, JobStatus.SUCCEEDED],
             JobStatus.FAILED: [JobStatus.SUBMITTED, JobStatus.FAILED], JobStatus.CANCELLED: [JobStatus.CANCELLED]}
    for step in steps[status]:
        blobs = {f"output_{i}": picture(f"{job.id}-out{i}") for i in range(outputs)} \
            if step is JobStatus.SUCCEEDED else None
        job = await store.jobs.transition(job.id, step, blobs=blobs, result={"images": []} if blobs else None)
        await store.jobs.add_event(job.id, "log", f"{step} happened")
    if status is JobStatus.SUCCEEDED and posted:
        await store.jobs.set_result_message(job.id, 1000 + job.id)
    return await store.jobs.get(job.id)


async def shas(store: Store) -> set[str]:
    return {str(r[0]) for r in await store.db.fetch_all("SELECT sha256 FROM blobs")}


async def test_cleanup_deletes_exactly_what_expired_and_nothing_a_live_job_needs(store: Store) -> None:
    posted = await run_to(store, await new_job(store, "posted"), JobStatus.SUCCEEDED)
    unposted = await run_to(store, await new_job(store, "unposted"), JobStatus.SUCCEEDED, posted=False)
    cli = await run_to(store, await new_job(store, "cli", channel_id=None), JobStatus.SUCCEEDED, posted=False)
    failed = await run_to(store, await new_job(store, "failed"), JobStatus.FAILED)
    queued = await new_job(store, "queued")
    submitted = await run_to(store, await new_job(store, "submitted"), JobStatus.SUBMITTED)
    running = await run_to(store, await new_job(store, "running"), JobStatus.RUNNING)
    live = (queued, submitted, running)
    live_refs = {job.id: await store.jobs.blob_refs(job.id) for job in live}
    who = Requester(user_id=7, guild_id=1, channel_id=2)
    await store.drafts.create("old-draft", who=who, image=picture("draft"), mask=picture("draft-mask"), params={})
    await store.painter_sessions.create("gone-link", who=who, image=picture("link"), params={},
                                        expires_at=time.time() + 1800)
    await store.modlog.add(1, "prompt_blocked", detail="old")
    await store.upload_checks.record("a" * 64, 0.1)
    now = time.time()
    cleanup = RetentionCleanup(store, WEEK)

    # a day later only the painter link has gone (it stopped working more than an hour ago)
    report = await cleanup.sweep(now + DAY_S)
    assert (report.inputs, report.results, report.events, report.drafts) == (0, 0, 0, 0)
    assert report.painter_sessions == 1 and await store.painter_sessions.get("gone-link") is None

    # eight days on: every finished job's pictures are gone, and the draft; results, events and live jobs stay
    report = await cleanup.sweep(now + 8 * DAY_S)
    assert (report.inputs, report.results, report.events, report.drafts) == (4, 0, 0, 1)
    for job in (posted, unposted, cli, failed):
        refs = await store.jobs.blob_refs(job.id)
        assert all(role.startswith("output_") for role in refs), refs
        assert (await store.retention.deletions(job.id)).inputs_deleted_at == now + 8 * DAY_S  # type: ignore[union-attr]
    assert {r for r in await store.jobs.blob_refs(posted.id)} == {"output_0"}
    for job in live:
        assert await store.jobs.blob_refs(job.id) == live_refs[job.id]
        assert (await store.jobs.blobs(job.id)).keys() == live_refs[job.id].keys()  # the bytes too
    assert await store.drafts.get("old-draft") is None
    assert await store.upload_checks.probability("a" * 64) is None
    assert len(await store.jobs.events(posted.id)) > 1
    assert report.blobs == 4 * 4 + 2  # four jobs' four pictures, the draft's two

    # a month on: results and events too, but never a result the bot has yet to post
    report = await cleanup.sweep(now + 31 * DAY_S)
    assert (report.inputs, report.results, report.events) == (0, 3, 4)  # the failed job had no result
    assert await store.jobs.blob_refs(posted.id) == {} and await store.jobs.blob_refs(cli.id) == {}
    assert (await store.jobs.blob_refs(unposted.id)).keys() == {"output_0"}
    assert [j.id for j in await store.jobs.unposted_results()] == [unposted.id]
    assert (await store.jobs.blobs(unposted.id))["output_0"].data.startswith(f"{unposted.id}-out0".encode())
    assert await store.jobs.events(posted.id) == [] and await store.jobs.events(failed.id) == []
    for job in live:
        assert await store.jobs.blob_refs(job.id) == live_refs[job.id] and await store.jobs.events(job.id)
    # the job rows stay: status, options, cost, what /jobs and quotas read
    assert (await store.jobs.get(posted.id)).status is JobStatus.SUCCEEDED
    assert [e.action for e in await store.modlog.entries(1)] == ["prompt_blocked"]
    # and every blob left is one a row still refers to
    referenced = {str(r[0]) for r in await store.db.fetch_all("SELECT sha256 FROM job_blobs")}
    assert await shas(store) == referenced

    # a year on, the moderation log too; a sweep with nothing left to do deletes nothing
    assert (await cleanup.sweep(now + 366 * DAY_S)).modlog == 1
    assert (await cleanup.sweep(now + 366 * DAY_S)).summary().startswith("seconds=")


async def test_a_blob_shared_by_a_derived_job_is_kept_while_referenced(store: Store) -> None:
    parent = await run_to(store, await new_job(store, "parent"), JobStatus.SUCCEEDED)
    child = await new_job(store, "child", parent=parent)  # a reroll: the same picture, referred to by hash
    parent_refs = await store.jobs.blob_refs(parent.id)
    assert {k: v for k, v in parent_refs.items() if k != "output_0"} == await store.jobs.blob_refs(child.id)
    cleanup = RetentionCleanup(store, WEEK)
    now = time.time()

    await cleanup.sweep(now + 8 * DAY_S)  # the parent's pictures expire while its reroll waits in the queue
    assert set(await store.jobs.blob_refs(parent.id)) == {"output_0"}
    assert (await store.jobs.blobs(child.id)).keys() == {"image", "mask", "crop_image", "crop_mask"}

    child = await run_to(store, child, JobStatus.SUCCEEDED)  # it finishes later than its parent…
    await cleanup.sweep(now + 6 * DAY_S)  # …so six days after, its (shared) pictures are still stored
    assert (await store.jobs.blobs(child.id)).keys() == {"image", "mask", "crop_image", "crop_mask", "output_0"}
    await cleanup.sweep(now + 8 * DAY_S)
    assert await store.jobs.blob_refs(child.id) == {"output_0": (await store.jobs.blob_refs(child.id))["output_0"]}
    shared = {v for k, v in parent_refs.items() if k != "output_0"}
    assert not shared & await shas(store)  # nobody refers to them any more: collected


async def test_the_space_goes_back_to_the_disk(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    async with await Store.open(path) as store:
        assert await store.db.auto_vacuum() == "incremental"
        for i in range(12):
            job = await store.jobs.create(user_id=7, guild_id=1, channel_id=2, input=INPUT, backend="fal",
                                          blobs={"image": picture(f"{i}", 300_000), "mask": picture(f"m{i}", 100_000)})
            await run_to(store, job, JobStatus.SUCCEEDED)
        await store.db.checkpoint()
        before = path.stat().st_size
        assert before > 12 * 400_000 + 12 * 64 * 2
        report = await RetentionCleanup(store, WEEK).sweep(time.time() + 8 * DAY_S)
        after = path.stat().st_size
        assert report.blobs == 24 and report.blob_bytes >= 12 * 400_000
        assert after < before - 12 * 400_000 and report.reclaimed_bytes == before - after
        assert (await store.db.space()).free_pages == 0
        assert len(await store.jobs.for_user(7, limit=20)) == 12


async def test_a_database_written_by_older_code_is_upgraded_and_converted(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    path.write_bytes(V5_DATABASE.read_bytes())
    written = 1795698079.0  # when the fixture's jobs ran
    async with await Store.open(path) as store:
        assert await store.db.auto_vacuum() == "none"  # created before incremental vacuum: needs one VACUUM
        first_refs = await store.jobs.blob_refs(1)
        session = await store.painter_sessions.get("session-1")
        assert session is not None and session.image_sha256 == first_refs["image"]
        cleanup = RetentionCleanup(store, WEEK)
        report = await cleanup.sweep(written + DAY_S)  # nothing expired: nothing freed, nothing to convert yet
        assert not report.converted and report.inputs == 0 and await store.jobs.blob_refs(1) == first_refs
        big = await store.jobs.create(user_id=7, guild_id=1, channel_id=2, input=INPUT, backend="fal",
                                      blobs={"image": picture("big", 200_000), "mask": picture("big-mask")})
        await run_to(store, big, JobStatus.SUCCEEDED)
        report = await cleanup.sweep(max(time.time(), written) + 8 * DAY_S)
        assert report.converted and report.inputs == 2 and report.drafts == 1
        assert await store.db.auto_vacuum() == "incremental"
        assert await store.jobs.blob_refs(1) == {}
        # job 1's picture stays while the painter link (valid till 2033) refers to it; its mask and job 4's went
        assert await shas(store) == {first_refs["image"], (await store.jobs.blob_refs(big.id))["output_0"]}
        assert (await store.jobs.get(2)).status is JobStatus.SUBMITTED  # the live job is untouched
        assert (await store.jobs.get(1)).result_message_id == 555
        assert await store.drafts.get("draft-1") is None
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
        assert raw.execute("PRAGMA freelist_count").fetchone() == (0,)


async def test_a_large_old_database_is_left_for_the_operator(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "bot.sqlite3"
    path.write_bytes(V5_DATABASE.read_bytes())
    async with await Store.open(path) as store:
        big = await store.jobs.create(user_id=7, guild_id=1, channel_id=2, input=INPUT, backend="fal",
                                      blobs={"image": picture("big", 200_000), "mask": picture("big-mask")})
        await run_to(store, big, JobStatus.SUCCEEDED)
        report = await RetentionCleanup(store, WEEK, convert_max_bytes=0).sweep(time.time() + 8 * DAY_S)
        assert not report.converted and report.blobs == 3 and await store.db.auto_vacuum() == "none"
        assert (await store.db.space()).free_pages > 40  # reused by what comes next, not given back
    assert "python -m services.retention --vacuum" in caplog.text


async def test_pictures_gone_says_when_and_why(store: Store) -> None:
    job = await run_to(store, await new_job(store, "x"), JobStatus.SUCCEEDED)
    assert await pictures_gone(store, job.id) == ImagesGone(job.id)  # not deleted by the cleanup
    finished = (await store.jobs.get(job.id)).finished_at
    assert finished is not None
    await RetentionCleanup(store, WEEK).sweep(finished + 7 * DAY_S + 1800)
    gone = await pictures_gone(store, job.id)
    assert gone.plain() == (f"Job #{job.id}'s pictures were deleted after 7 days (this bot keeps a job's pictures "
                            "that long), so it can't be run again: start a new job with /inpaint.")
    assert (await pictures_gone(store, job.id, result=True)).deleted_after_s is None  # the result is still here
    await RetentionCleanup(store, WEEK).sweep(finished + 30 * DAY_S + 60)
    assert "result was deleted after 30 days" in (await pictures_gone(store, job.id, result=True)).plain()
    assert "after 12 hours" in ImagesGone(1, deleted_after_s=12 * 3600).plain()


async def test_quotas_and_start_up_read_indexes_not_rows(store: Store) -> None:
    """The V11 indexes cover what /inpaint's admission counts and what start-up looks for (no JSON, no row reads)."""
    async def plan(sql: str, args: tuple[object, ...]) -> str:
        return " | ".join(str(r[3]) for r in await store.db.fetch_all(f"EXPLAIN QUERY PLAN {sql}", args))

    from services.store import usage

    counted = usage._COUNTED
    assert "COVERING INDEX jobs_guild_usage" in await plan(
        f"SELECT COUNT(*), SUM(user_id = ?), SUM(cost) FROM jobs WHERE guild_id = ? AND created_at >= ? AND {counted}",
        (1, 1, 0.0))
    assert "COVERING INDEX jobs_guild_user_usage" in await plan(
        f"SELECT created_at FROM jobs WHERE guild_id = ? AND user_id = ? AND {counted} ORDER BY created_at DESC "
        "LIMIT 1", (1, 1))
    # start-up names its index (the planner alone would read every succeeded job through jobs_status)
    assert await plan("SELECT id FROM jobs INDEXED BY jobs_unposted WHERE status = 'succeeded' AND result_message_id "
                      "IS NULL AND channel_id IS NOT NULL ORDER BY id", ()) == "SCAN jobs USING INDEX jobs_unposted"
    assert await store.jobs.unposted_results() == []


async def test_the_spending_ledger_keeps_only_recent_days(store: Store) -> None:
    """The bot-wide budget's ledger (services/spend.py) is history too: days older than the events' retention go."""
    now = 100 * DAY_S
    for day in (60, 69, 70, 99):
        await store.spend.reserve(day, 5.0, 1000.0, guild_id=1, now=day * DAY_S)
    report = await RetentionCleanup(store, RetentionPolicy(events_days=30)).sweep(now)
    assert report.spend_days == 2  # days 60 and 69: before day 70
    assert [await store.spend.used(day) for day in (60, 69, 70, 99)] == [0, 0, 5.0, 5.0]
