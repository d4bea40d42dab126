"""The dispatcher against a backend and a database that misbehave: a stuck backend meets the job's deadline, a
backend that goes away is waited for, a submit whose answer was lost is never sent twice blindly, a database that
fails keeps the job queued, and a chatty backend doesn't fill the job's history."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from services.backends.fal_queue import FalQueueClient, RetryPolicy
from services.blob import Blob
from services.dispatch import Dispatcher
from services.job_events import log_lines
from services.job_state import Job, JobStatus
from services.modlog import ModerationLog
from services.store import Store
from tests.helpers.fal_server import FalTestServer
from tests.helpers.imagegen import box_mask, encode, photo
from tests.helpers.listener import RecordingListener

INPUTS = {"image": Blob(encode(photo(64, 64)), "image/png"),
          "mask": Blob(encode(box_mask((64, 64), (8, 8, 40, 40))), "image/png")}
FAST = RetryPolicy(2, 0.01, 0.02)


@dataclass
class Rig:
    server: FalTestServer
    store: Store
    http: httpx.AsyncClient
    listener: RecordingListener

    def dispatcher(self, **options: Any) -> Dispatcher:
        backend = FalQueueClient(base_url=self.server.base_url, http=self.http, poll_interval_s=0.01, retry=FAST,
                                 request_timeout_s=options.pop("request_timeout_s", 30.0))
        return Dispatcher(self.store, backend, self.http, ModerationLog(self.store.modlog), **options)

    async def job(self, prompt: str = "x", user_id: int = 1) -> Job:
        return await self.store.jobs.create(
            user_id=user_id, guild_id=1, channel_id=2, backend="fal", blobs=INPUTS,
            input={"prompt": prompt, "image_url": "blob:image", "mask_url": "blob:mask", "image_size": "square",
                   "enable_safety_checker": False})

    async def ended(self, *jobs: Job, within_s: float = 30.0) -> list[Job]:
        await asyncio.wait_for(asyncio.gather(*(self.listener.event(j.id).wait() for j in jobs)), within_s)
        return [await self.store.jobs.get(j.id) for j in jobs]


@asynccontextmanager
async def rig(tmp_path: Path, **server: Any) -> AsyncIterator[Rig]:
    async with FalTestServer(key=None, **server) as fal, await Store.open(tmp_path / "bot.sqlite3") as store, \
            httpx.AsyncClient() as http:
        yield Rig(fal, store, http, RecordingListener())


def honoured(value: bool) -> Callable[[], Awaitable[bool]]:
    async def keys_honoured() -> bool:
        return value
    return keys_honoured


async def test_a_stuck_backend_meets_the_deadline_and_frees_the_slot(tmp_path: Path) -> None:
    """A backend that stays IN_PROGRESS (a new log line every poll, forever): the job fails at its deadline, its
    request is cancelled at the backend, the job queued behind it runs, and the history holds a few rows, not one
    per poll."""
    async with rig(tmp_path, queue_polls=0, progress_logs=1_000_000) as r:
        stuck, behind = await r.job("stuck"), await r.job("behind", user_id=2)
        dispatcher = r.dispatcher(concurrency=1, deadline_s=0.6, event_interval_s=0.2)
        await dispatcher.start(r.listener)
        stuck_job = (await r.ended(stuck))[0]
        assert stuck_job.status is JobStatus.FAILED
        assert "didn't finish this job within 0.6 seconds" in (stuck_job.error or "")
        assert len(r.server.hits("cancel")) == 1
        assert r.server.requests[stuck_job.backend_request_id or ""].cancel_requested
        polls = len([h for h in r.server.hits("status")])
        rows = await r.store.jobs.events(stuck.id)
        assert polls > 30 and len(rows) < 15, (polls, [e.message for e in rows])
        logs = log_lines(rows)
        assert len(logs) == polls - 1 or len(logs) >= polls - 3  # every line
        assert logs[:2] == ["step 1/1000000", "step 2/1000000"]  # the lines themselves are kept, in batches
        r.server.progress_logs = 1  # the next request finishes
        await r.ended(behind)
        await dispatcher.close()


async def test_the_deadline_is_kept_over_a_restart(tmp_path: Path) -> None:
    async with rig(tmp_path, queue_polls=0, progress_logs=1_000_000) as r:
        job = await r.job()
        first = r.dispatcher(deadline_s=1.0)
        await first.start(r.listener)
        for _ in range(200):
            if (await r.store.jobs.get(job.id)).backend_request_id:
                break
            await asyncio.sleep(0.01)
        deadline = (await r.store.jobs.get(job.id)).deadline_at
        await first.close()  # a restart: the job is picked up again…
        await asyncio.sleep(0.5)
        second = r.dispatcher(deadline_s=60.0)
        await second.start(r.listener)
        (ended,) = await r.ended(job, within_s=5)  # …with the deadline it had, not a fresh minute
        await second.close()
        assert ended.status is JobStatus.FAILED and ended.deadline_at == deadline
        assert len(r.server.requests) == 1  # followed again, not submitted again


async def test_in_flight_jobs_ride_out_a_backend_outage(tmp_path: Path) -> None:
    """Every status and result request fails (connections dropped) for a while: the jobs wait, keep their requests,
    and finish when the backend is back; nothing is submitted twice."""
    async with rig(tmp_path, queue_polls=60, progress_logs=3) as r:
        await r.store.server_settings.save(1, {"user_concurrent": 5, "server_concurrent": 5})
        jobs = [await r.job(f"job {n}", user_id=n) for n in range(5)]
        dispatcher = r.dispatcher(concurrency=5, outage_s=20.0)
        await dispatcher.start(r.listener)
        for _ in range(300):
            if len(r.server.requests) == 5:
                break
            await asyncio.sleep(0.01)
        outage = [r.server.inject("status", "drop", times=-1), r.server.inject("result", "drop", times=-1)]
        await asyncio.sleep(1.5)
        assert not any(e.is_set() for e in r.listener.done.values()), [
            (j.id, j.status, j.error) for j in [await r.store.jobs.get(j.id) for j in jobs]]
        for fault in outage:
            fault.times = 0  # back
        ended = await r.ended(*jobs)
        await dispatcher.close()
        assert [j.status for j in ended] == [JobStatus.SUCCEEDED] * 5
        assert len(r.server.hits("submit")) == 5 and len(r.server.requests) == 5
        assert any("can't be reached right now" in line for line in r.listener.said(jobs[0].id))


async def test_an_outage_longer_than_the_window_fails_the_job_with_retry(tmp_path: Path) -> None:
    async with rig(tmp_path, queue_polls=100_000) as r:
        job = await r.job()
        dispatcher = r.dispatcher(outage_s=0.5)
        await dispatcher.start(r.listener)
        for _ in range(300):
            if r.server.requests:
                break
            await asyncio.sleep(0.01)
        r.server.inject("status", "status", code=503, times=-1)
        (ended,) = await r.ended(job)
        await dispatcher.close()
        assert ended.status is JobStatus.FAILED and "unavailable right now" in (ended.error or "")


async def test_a_submit_whose_answer_was_lost_is_adopted_by_its_key(tmp_path: Path) -> None:
    """The backend took the request but the answer never came (a read timeout): the job sends it again with the
    same Idempotency-Key, and a backend that honours keys answers with the request it has. One request, one run."""
    async with rig(tmp_path, queue_polls=1, progress_logs=1) as r:
        r.server.honour_keys = True
        r.server.inject("submit", "late", delay_s=0.5, times=1)
        job = await r.job()
        dispatcher = r.dispatcher(request_timeout_s=0.2, keys_honoured=honoured(True))
        await dispatcher.start(r.listener)
        (ended,) = await r.ended(job)
        await dispatcher.close()
        assert ended.status is JobStatus.SUCCEEDED
        submits = r.server.hits("submit")
        assert len(submits) == 2 and len(r.server.requests) == 1
        assert submits[0].headers["idempotency-key"] == submits[1].headers["idempotency-key"] == ended.submit_key


async def test_a_submit_whose_answer_was_lost_is_not_sent_again_to_a_backend_without_keys(tmp_path: Path) -> None:
    """Hosted fal doesn't promise to honour the key: rather than risk running (and billing) the job twice, it
    fails with a Retry that says why."""
    async with rig(tmp_path, queue_polls=1, progress_logs=1) as r:
        r.server.inject("submit", "late", delay_s=0.5, times=1)
        job = await r.job()
        dispatcher = r.dispatcher(request_timeout_s=0.2, keys_honoured=honoured(False))
        await dispatcher.start(r.listener)
        (ended,) = await r.ended(job)
        await dispatcher.close()
        assert ended.status is JobStatus.FAILED and "may or may not have started" in (ended.error or "")
        assert len(r.server.hits("submit")) == 1
        state = [e for e in await r.store.jobs.events(job.id) if e.kind == "state"][-1]
        assert state.data is not None and state.data["retryable"] is True


async def test_a_crash_between_the_submit_and_recording_it_is_adopted_after_the_restart(tmp_path: Path) -> None:
    """The bot stops while its submit is on the wire (the backend creates the request after the bot is gone):
    the restarted bot finds the job queued with its key, sends it again with that key, and follows the request the
    backend already has, instead of creating a second."""
    async with rig(tmp_path, queue_polls=1, progress_logs=1) as r:
        r.server.honour_keys = True
        r.server.inject("submit", "late", delay_s=0.4, times=1)
        job = await r.job()
        first = r.dispatcher(keys_honoured=honoured(True))
        await first.start(r.listener)
        for _ in range(300):
            if r.server.hits("submit"):
                break
            await asyncio.sleep(0.01)
        await first.close()  # gone before the answer: nothing recorded but the key
        stored = await r.store.jobs.get(job.id)
        assert stored.status is JobStatus.QUEUED and stored.submit_key and not stored.backend_request_id
        await asyncio.sleep(0.6)
        assert len(r.server.requests) == 1  # the backend has it
        second = r.dispatcher(keys_honoured=honoured(True))
        await second.start(r.listener)
        (ended,) = await r.ended(job)
        await second.close()
        assert ended.status is JobStatus.SUCCEEDED and len(r.server.requests) == 1


async def test_a_database_error_keeps_the_job_and_tells_its_user(tmp_path: Path) -> None:
    """The database refuses writes (SQLite's `query_only`: every write fails as on a read-only or broken disk)
    while jobs run: they stay queued and are tried again with backoff, their user hears about it when it persists,
    and they finish once the database is back."""
    async with rig(tmp_path, queue_polls=0, progress_logs=0) as r:
        await r.store.server_settings.save(1, {"user_concurrent": 3, "server_concurrent": 3})
        jobs = [await r.job(f"job {n}", user_id=n) for n in range(3)]
        db = r.store.jobs.db
        await db.fetch_all("PRAGMA query_only = 1")
        dispatcher = r.dispatcher(concurrency=3)
        await dispatcher.start(r.listener)
        for _ in range(600):
            if all(any("can't save" in line for line in r.listener.said(j.id)) for j in jobs):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"users were not told: {r.listener.progress}")
        assert not r.listener.succeeded and not r.listener.ended
        await db.fetch_all("PRAGMA query_only = 0")  # writable again
        ended = await r.ended(*jobs, within_s=30)
        await dispatcher.close()
        assert [j.status for j in ended] == [JobStatus.SUCCEEDED] * 3
        assert sorted(r.listener.succeeded) == [j.id for j in jobs]  # each once


async def test_results_come_only_from_the_backend_or_the_hosts_the_operator_allows(tmp_path: Path) -> None:
    """A backend's result URL is downloaded only from the backend's own origin (or RESULT_HOSTS): one pointing
    anywhere else (here another server on this machine) fails the job without a connection being made."""
    async with rig(tmp_path, queue_polls=0, progress_logs=0) as r, FalTestServer(key=None) as elsewhere:
        r.server.results_at = r.server.base_url  # its own origin, as our worker serves /files/
        own = await r.job("own origin")
        dispatcher = r.dispatcher()
        await dispatcher.start(r.listener)
        (ended,) = await r.ended(own)
        assert ended.status is JobStatus.SUCCEEDED
        r.server.results_at = elsewhere.base_url
        elsewhere.files = r.server.files
        foreign = await r.job("foreign result", user_id=2)
        dispatcher._push(foreign)
        (ended,) = await r.ended(foreign)
        await dispatcher.close()
        assert ended.status is JobStatus.FAILED and "could not be downloaded" in (ended.error or "")
        assert elsewhere.hits("file") == []


async def test_a_database_error_right_after_the_submit_records_the_request_it_got(tmp_path: Path) -> None:
    """The backend took the request, then the database failed to record it: the retry records the request the
    submit got (kept in memory) instead of sending it again, or failing it as "maybe submitted" (a backend without
    keys) while the request runs unfollowed."""
    async with rig(tmp_path, queue_polls=1, progress_logs=1) as r:
        late = r.server.inject("submit", "late", delay_s=0.4, times=1)
        job = await r.job()
        dispatcher = r.dispatcher(keys_honoured=honoured(False))
        await dispatcher.start(r.listener)
        for _ in range(300):
            if late.times == 0:  # the request exists; its answer is on the way
                break
            await asyncio.sleep(0.01)
        db = r.store.jobs.db
        await db.fetch_all("PRAGMA query_only = 1")
        await asyncio.sleep(1.0)
        await db.fetch_all("PRAGMA query_only = 0")
        (ended,) = await r.ended(job)
        await dispatcher.close()
        assert ended.status is JobStatus.SUCCEEDED, ended.error
        assert len(r.server.hits("submit")) == 1 and len(r.server.requests) == 1


async def test_a_deadline_that_cuts_a_submit_short_cancels_what_it_created(tmp_path: Path) -> None:
    async with rig(tmp_path, queue_polls=1000) as r:
        r.server.inject("submit", "late", delay_s=1.0, times=1)
        job = await r.job()
        dispatcher = r.dispatcher(deadline_s=0.4)
        await dispatcher.start(r.listener)
        (ended,) = await r.ended(job)
        await dispatcher.close()
        assert ended.status is JobStatus.FAILED and "didn't finish" in (ended.error or "")
        (request,) = r.server.requests.values()
        assert request.error_type == "cancelled" and len(r.server.hits("cancel")) == 1


async def test_a_cancel_while_an_uncertain_submit_waits_cancels_it_at_the_backend(tmp_path: Path) -> None:
    """The submit's answer was lost (the job waits to send it again with its key): Cancel learns the request by
    sending the key again, and cancels it there."""
    async with rig(tmp_path, queue_polls=1000) as r:
        r.server.honour_keys = True
        r.server.inject("submit", "late", delay_s=0.5, times=1)
        r.server.inject("submit", "status", code=503, times=-1)  # then the backend is too busy to take it again
        job = await r.job()
        dispatcher = r.dispatcher(request_timeout_s=0.2, keys_honoured=honoured(True), outage_s=30.0)
        await dispatcher.start(r.listener)
        for _ in range(300):
            if r.server.requests and len(r.server.hits("submit")) >= 2:
                break
            await asyncio.sleep(0.01)
        r.server.faults.clear()
        assert await dispatcher.cancel(job.id)
        (ended,) = await r.ended(job)
        await dispatcher.close()
        assert ended.status is JobStatus.CANCELLED
        (request,) = r.server.requests.values()
        assert request.error_type == "cancelled"
        assert not dispatcher._cancel_requested  # nothing kept about a job that ended


async def test_a_refused_submit_leaves_nothing_to_find(tmp_path: Path) -> None:
    """A 422 on the submit: the backend created nothing, so the job's key is forgotten (a key would mean "maybe at
    the backend", and keep the job's cost on the day's spending)."""
    async with rig(tmp_path) as r:
        r.server.inject("submit", "status", code=422, body={"detail": [{"loc": ["body", "prompt"], "msg": "bad",
                                                                        "type": "value_error"}]})
        job = await r.job()
        dispatcher = r.dispatcher()
        await dispatcher.start(r.listener)
        (ended,) = await r.ended(job)
        await dispatcher.close()
        assert ended.status is JobStatus.FAILED and ended.submit_key is None


async def test_whether_a_backend_honours_keys_is_asked_again_until_it_says(tmp_path: Path) -> None:
    """The worker isn't listening yet when the bot starts (it loads its model first): "unknown", not "no", and
    asked again, so a job found with a submit key waits for the answer instead of failing."""
    from services.backend_select import BackendChoice, CapabilityProbe

    now = [0.0]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient() as http:
        probe = CapabilityProbe(BackendChoice("worker", url, None), url, http, recheck_s=5, clock=lambda: now[0])
        assert (await probe.current(recheck_unknown=True)).idempotency_keys is None
        async with FalTestServer(key=None, port=port) as worker:
            worker.health = {"ready": True, "idempotency_keys": True}
            assert (await probe.current(recheck_unknown=True)).idempotency_keys is None  # asked 0 s ago
            now[0] = 6.0
            assert (await probe.current(recheck_unknown=True)).idempotency_keys is True


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
