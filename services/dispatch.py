"""The dispatcher: runs queued jobs through the backend, records every change in SQLite, tells a listener
(the Discord layer) about progress and results, and picks everything up again after a restart.

Recovery on start: jobs that were submitted or running are followed again from their stored request URLs
(or re-submitted from their blobs when the backend lost them); queued jobs run; succeeded jobs whose result
was never posted are posted. Nothing is posted twice: a posted result records its message id.

Nothing waits forever, and nothing is sent twice:
- each job has a total deadline at the backend (`deadline_s`, fixed when it first leaves the queue and kept over
  restarts): past it the request is cancelled at the backend and the job fails, saying so, and its slot is freed;
- a backend that is unreachable is waited for, with backoff, for up to `outage_s` (the job keeps its request and
  follows it again); a request is sent again only when the backend says it no longer has it (404);
- before a request is sent the job records its `Idempotency-Key`; a job found with a key but no request (a crash,
  or a submit whose answer was lost) is sent again only with that same key to a backend that honours keys (our
  worker answers with the request it already has), and otherwise fails with a Retry rather than risk running twice;
- a database error while running a job puts it back in the queue and tries again with backoff (the user is told
  when it persists): no job is ever dropped from the in-memory queue;
- progress from the backend is written to the job's history in batches (`services/job_events.py`).

With a pool of backends (`services/backend_pool.py`) a job leaving the queue goes to the pool's choice, and the
backend's name is recorded with its submit key before the request is sent: from then on everything about the job
(follow, cancel, a submit sent again with its key, recovery, where its results may be downloaded from) goes to
that backend. A backend that refuses a submit (unreachable, 503 queue full) hands the job to the next one at once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from PIL import Image

from services.backend_pool import BackendPool, PoolBackend
from services.backends.fal_queue import (
    FalError,
    FalHTTPError,
    FalNotFoundError,
    FalQueueClient,
    FalSubmitUncertain,
    FalUnavailableError,
    QueueUpdate,
)
from services.blob import Blob
from services.crop_plan import CropPlan
from services.errors import UserError
from services.fairqueue import FairQueue, QueuedJob, UserKey
from services.images import ImageInputError, IntakeLimits, fetch_source, to_data_uri
from services.job_events import EventBuffer
from services.job_failures import MAYBE_SUBMITTED, ending_for, overdue, refused
from services.job_state import BLOB_REFS, IllegalTransition, Job, JobStatus
from services.modlog import ModerationLog
from services.outage import Outage
from services.progress import Progress
from services.prompt_filter import PromptFilter
from services.schema import InpaintOutput, QueueHandle
from services.spend import SpendBudget
from services.stitch import stitch_encoded
from services.store import Store
from services.upload_check import UploadCheck
from services.url_fetch import FetchPolicy

log = logging.getLogger(__name__)

OUTPUT_LIMITS = IntakeLimits(max_bytes=64 * 1024 * 1024, max_pixels=200_000_000, min_side=1)
#: consecutive database failures of one job after which its user is told (it keeps being retried)
TELL_AFTER_STORAGE_FAILURES = 3
#: the longest wait between retries after a database failure
MAX_STORAGE_RETRY_S = 60.0


async def _never() -> bool | None:
    return False


@dataclass(frozen=True)
class JobImages:
    """A new job's image and mask, decoded (the presentation layer shows the mask over the image)."""

    image: Image.Image
    mask: Image.Image


class JobListener(Protocol):
    """What the dispatcher tells the presentation layer. Only `job_queued` may raise (the job is then cancelled);
    the others must not raise for presentation errors."""

    async def job_queued(self, job: Job, images: JobImages, position: int | None) -> None:
        """A new job is queued (`position`: jobs ahead of it in the bot's queue); show it."""

    async def job_progress(self, job: Job, progress: Progress) -> None: ...

    async def job_succeeded(self, job: Job, output: InpaintOutput, images: list[Blob], *,
                            spoiler: bool = False) -> None: ...

    async def job_ended(self, job: Job) -> None:
        """A job ended without a result: failed, cancelled or blocked (`job.error` says why)."""


class QuietListener:
    """A listener that shows nothing: a base for listeners that care about some of what happens (the command line
    waits for the end; benchmarks time it)."""

    async def job_queued(self, job: Job, images: JobImages, position: int | None) -> None:
        return None

    async def job_progress(self, job: Job, progress: Progress) -> None:
        return None

    async def job_succeeded(self, job: Job, output: InpaintOutput, images: list[Blob], *,
                            spoiler: bool = False) -> None:
        return None

    async def job_ended(self, job: Job) -> None:
        return None


class Dispatcher:
    """Runs jobs fairly: users take turns, each user and each server under its concurrency cap, and at most
    `concurrency` jobs at the backend in all."""

    def __init__(self, store: Store, backend: FalQueueClient | BackendPool, http: httpx.AsyncClient,
                 modlog: ModerationLog, *,
                 upload_check: UploadCheck | None = None, concurrency: int = 4, max_attempts: int = 3,
                 deadline_s: float = 600.0, outage_s: float = 120.0,
                 keys_honoured: Callable[[], Awaitable[bool | None]] = _never, event_interval_s: float = 2.0,
                 results_from: FetchPolicy | None = None, spend: SpendBudget | None = None) -> None:
        """`deadline_s`: a job's total time at the backend; `outage_s`: how long an unreachable backend is waited
        for; `keys_honoured`: whether the backend answers a repeated `Idempotency-Key` with the request it has (None:
        it hasn't said yet);
        `results_from`: where result images may be downloaded from (default: the backend's own origin, and hosted
        fal's CDN). With a `BackendPool`, each backend brings its own `keys_honoured` and `results_from`;
        `spend`: given with a pool where only hosted fal costs money, told where each job was submitted."""
        self.spend = spend
        self.store = store
        self.pool = backend if isinstance(backend, BackendPool) else BackendPool.single(
            backend, keys_honoured=keys_honoured, results_from=results_from)
        self.upload_check = upload_check
        self.jobs = store.jobs
        self.backend = self.pool.first.client
        self.http = http
        self.modlog = modlog
        self.max_attempts = max_attempts
        self._listener: JobListener | None = None
        self._queue = FairQueue()
        self._wakeup = asyncio.Event()
        self._running: dict[int, tuple[QueuedJob, asyncio.Task[None]]] = {}
        self._scheduler: asyncio.Task[None] | None = None
        self._concurrency = concurrency
        self._caps: dict[int | None, tuple[int, int]] = {}
        self._cancel_requested: set[int] = set()
        self.deadline_s = deadline_s
        self.outage_s = outage_s
        self.event_interval_s = event_interval_s
        #: jobs whose backend lost their request: submitted again there first, if it takes jobs
        self._lost_at: dict[int, str] = {}
        self._storage_failures: Counter[int] = Counter()
        self._retrying: dict[int, asyncio.Task[None]] = {}  # jobs waiting out a database error
        self._submits: dict[int, asyncio.Task[QueueHandle]] = {}  # submits on the wire, by job
        #: requests the backend took whose handles aren't recorded yet (the database failed): used before sending again
        self._handles: dict[int, QueueHandle] = {}
        #: the order jobs started in (job ids), for tests and the fairness benchmark
        self.started: list[int] = []

    # --- lifecycle ----------------------------------------------------------------------------------

    @property
    def listener(self) -> JobListener:
        assert self._listener is not None, "the dispatcher has not been started"
        return self._listener

    async def start(self, listener: JobListener) -> None:
        """Start running jobs, telling `listener`, and recover everything a previous process left unfinished."""
        if self._scheduler is not None:
            raise RuntimeError("the dispatcher is already running")
        self._listener = listener
        for job in await self.jobs.unposted_results():
            await self._post_result(job)
        pending = await self.jobs.with_status([JobStatus.SUBMITTED, JobStatus.RUNNING, JobStatus.QUEUED])
        # jobs already at the backend first (they hold their place there), then the local queue in order
        for job in sorted(pending, key=lambda j: (j.status is JobStatus.QUEUED, j.id)):
            self._push(job)
        if pending:
            log.info("recovering %d unfinished job(s): %s", len(pending), [j.id for j in pending])
        self._scheduler = asyncio.create_task(self._schedule(), name="dispatch-scheduler")

    async def close(self) -> None:
        """Stop without changing any job's state: whatever was in flight resumes on the next start."""
        tasks = [task for _, task in self._running.values()] + [*self._retrying.values(), *self._submits.values()]
        if self._scheduler is not None:
            tasks.append(self._scheduler)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._scheduler = None
        self._running.clear()
        self._retrying.clear()
        self._submits.clear()
        self._handles.clear()
        self._queue = FairQueue()

    # --- operations ---------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Started and not closed: new jobs can be queued."""
        return self._scheduler is not None

    async def enqueue(self, job: Job, images: JobImages) -> None:
        """Queue a new job, then tell the listener (the job may start meanwhile: showing it is off the critical
        path). If the listener can't show it (e.g. the channel refused the progress message), the job is cancelled
        and the error raised: at once while it waits here, otherwise at the backend as soon as it is submitted."""
        if not self.running:
            raise RuntimeError("the dispatcher is not running")
        self._push(job)
        try:
            await self.listener.job_queued(job, images, self._queue.position(job.id))
        except BaseException:
            await self.cancel(job.id)
            raise

    def _push(self, job: Job) -> None:
        self._queue.push(QueuedJob(job.id, job.user_id, job.guild_id))
        self._wakeup.set()

    async def settings_changed(self, guild_id: int) -> None:
        """A server's settings changed: read its concurrency caps again before starting its next job."""
        self._caps.pop(guild_id, None)
        self._wakeup.set()

    async def cancel(self, job_id: int) -> bool:
        """Cancel a job: at once while it waits here, or by asking the backend once submitted."""
        job = await self.jobs.get(job_id)
        if job.terminal:
            return False
        if job_id in self._queue and job.status is JobStatus.QUEUED:
            self._queue.remove(job_id)
            try:
                job = await self.jobs.transition(job_id, JobStatus.CANCELLED, message="cancelled before submission")
            except IllegalTransition:
                return False
            await self.listener.job_ended(job)
            return True
        self._cancel_requested.add(job_id)  # a job being submitted right now is cancelled once it has a handle
        await self._cancel_at_backend(job)
        return True

    async def _cancel_at_backend(self, job: Job, *, wait_for_submit: bool = False) -> None:
        """Cancel the job's request at the backend: the recorded one, or one its submit may have created (learnt by
        sending its key again, where the backend honours keys). A submit on the wire is left to the job's own run,
        which cancels once it answers, unless `wait_for_submit` (that run is over)."""
        if (not wait_for_submit and _handle(job) is None and job.id not in self._handles
                and job.id in self._submits):
            return
        entry = self.pool.get(job.backend)
        if entry is None:
            if _held(job):
                await self.jobs.add_event(job.id, "note", f"cancelled, but its backend {job.backend!r} is no longer "
                                          "configured, so a request there can't be cancelled")
            return
        handle = await self._known_request(job, entry)
        if handle is None:
            if job.submit_key is not None:
                await self.jobs.add_event(job.id, "note", "cancelled, but a request its submit may have created at "
                                          "the backend can't be found to cancel there")
            return
        try:
            async with asyncio.timeout(15.0):
                outcome = await entry.client.cancel(handle)
            await self.jobs.add_event(job.id, "note", f"cancel requested at the backend {entry.name}: {outcome}")
        except (FalError, TimeoutError) as exc:
            await self.jobs.add_event(job.id, "note", f"cancel request failed: {exc or 'no answer'}")

    # --- running ------------------------------------------------------------------------------------

    async def _schedule(self) -> None:
        """Start queued jobs, fairly and within the caps, whenever there is room."""
        while True:
            self._wakeup.clear()
            try:
                for guild_id in {q.guild_id for q in self._queue} - self._caps.keys():
                    settings = await self.store.server_settings.load(guild_id)
                    self._caps[guild_id] = (settings.user_concurrent, settings.server_concurrent)
            except sqlite3.Error as exc:  # the queue waits (nothing is dropped) until the database answers
                log.error("can't read server settings to start jobs: %s; trying again in 1 s", exc)
                await asyncio.sleep(1.0)
                continue
            while len(self._running) < self._concurrency:
                users: Counter[UserKey] = Counter(q.user_key for q, _ in self._running.values())
                guilds: Counter[int | None] = Counter(q.guild_id for q, _ in self._running.values())

                def can_run(item: QueuedJob, users: Counter[UserKey] = users,
                            guilds: Counter[int | None] = guilds) -> bool:
                    user_cap, server_cap = self._caps.get(item.guild_id, (1, 1))
                    return users[item.user_key] < user_cap and guilds[item.guild_id] < server_cap

                item = self._queue.pop(can_run)
                if item is None:
                    break
                self.started.append(item.job_id)
                task = asyncio.create_task(self._guarded_run(item), name=f"job-{item.job_id}")
                self._running[item.job_id] = (item, task)
            await self._wakeup.wait()

    async def _guarded_run(self, item: QueuedJob) -> None:
        storage_error: sqlite3.Error | None = None
        try:
            try:
                await self._run(item.job_id)
            except sqlite3.Error:
                raise
            except Exception:
                log.exception("job %s: unexpected error in the dispatcher", item.job_id)
                await self._end(item.job_id, JobStatus.FAILED, "An unexpected error stopped this job.")
            self._storage_failures.pop(item.job_id, None)
        except asyncio.CancelledError:
            raise
        except sqlite3.Error as exc:
            storage_error = exc
        finally:
            self._running.pop(item.job_id, None)
            self._wakeup.set()
        if storage_error is not None:
            self._retry_after_storage_error(item, storage_error)

    def _retry_after_storage_error(self, item: QueuedJob, exc: sqlite3.Error) -> None:
        """The database failed while running a job: put the job back in the queue after a backoff (it resumes from
        what the database last recorded), and tell its user when this persists."""
        failures = self._storage_failures[item.job_id] = self._storage_failures[item.job_id] + 1
        delay = min(0.5 * 2 ** (failures - 1), MAX_STORAGE_RETRY_S)
        log.error("job %s: database error (%s, %d in a row); trying it again in %.1f s", item.job_id, exc, failures,
                  delay)

        async def requeue() -> None:
            if failures == TELL_AFTER_STORAGE_FAILURES:
                await self._tell_storage_trouble(item.job_id)
            await asyncio.sleep(delay)
            self._retrying.pop(item.job_id, None)
            if self.running and item.job_id not in self._queue and item.job_id not in self._running:
                self._queue.push(item)
                self._wakeup.set()

        if self.running:  # a dispatcher being closed starts nothing new: the next start recovers the job
            self._retrying[item.job_id] = asyncio.create_task(requeue(), name=f"job-{item.job_id}-retry")

    async def _tell_storage_trouble(self, job_id: int) -> None:
        try:
            job = await self.jobs.get(job_id)
        except sqlite3.Error:
            return  # nothing to show it with: the log says it
        progress = Progress(status=job.status, started_at=job.created_at)
        progress.add_log("The bot can't save to its database right now; this job will carry on when it can.")
        await self.listener.job_progress(job, progress)

    async def _run(self, job_id: int) -> None:
        """Submit the job (unless it is already at the backend), follow it to its end within its deadline, and
        record the outcome."""
        job = await self.jobs.get(job_id)
        if job.terminal:
            return
        if job.deadline_at is None:
            job = await self.jobs.start_clock(job_id, time.time() + self.deadline_s)
        assert job.deadline_at is not None
        progress = Progress(status=job.status, started_at=job.created_at)
        events = EventBuffer(self.jobs, job_id, interval_s=self.event_interval_s)
        try:
            async with asyncio.timeout(max(0.0, job.deadline_at - time.time())):
                output = await self._at_backend(job, progress, events)
        except TimeoutError:
            await events.flush(final=True)
            await self._overdue(job_id)
            return
        await events.flush(final=True)
        if output is None:
            return
        try:
            await self._succeed(job_id, output)
        except (FalError, UserError, ImageInputError) as exc:
            await self._fail(job_id, exc)

    async def _at_backend(self, job: Job, progress: Progress, events: EventBuffer) -> InpaintOutput | None:
        """Submit and follow until the backend has the result (None: the job ended some other way). A request the
        backend lost is submitted again, up to `max_attempts` submissions; an unreachable backend is waited for."""
        job_id = job.id
        outage = Outage(self.outage_s)
        entry: PoolBackend | None = None
        while True:
            try:
                entry = self.pool.get(job.backend) if _held(job) or job_id in self._handles else None
                if entry is None and (_held(job) or job_id in self._handles):
                    await self._end(job_id, JobStatus.FAILED, f"This job was at the backend {job.backend!r}, which "
                                    "the bot no longer uses (BACKENDS), so it can't be followed there; Retry runs "
                                    "it again.", retryable=True)
                    return None
                handle = _handle(job)
                if job.status is JobStatus.QUEUED or handle is None:
                    if job_id in self._cancel_requested:
                        await self._cancel_at_backend(job)  # a request its submit may have left there
                        await self._end(job_id, JobStatus.CANCELLED, "Cancelled.")
                        return None
                    if entry is not None and job.submit_key is not None and job_id not in self._handles:
                        honoured = await entry.keys_honoured()
                        if honoured is None:  # wait for the backend to say, as for an outage
                            raise FalUnavailableError("the backend hasn't said (/health) whether it honours "
                                                      "Idempotency-Key, so this job's submit can't be sent again yet")
                        if not honoured:
                            await self._end(job_id, JobStatus.FAILED, MAYBE_SUBMITTED, retryable=True)
                            return None
                    if not await self._upload_allowed(job):
                        return None
                    job, handle, entry = await self._submit(job, progress, entry)
                    outage.over()
                    if job_id in self._cancel_requested:  # cancelled while the submit was on its way
                        await self._cancel_at_backend(job)
                assert entry is not None
                return await entry.client.follow(handle, lambda u: self._on_update(job_id, progress, events, outage,
                                                                                   u))
            except FalNotFoundError as exc:
                await events.flush()
                lost_at = job.backend
                requeued = await self._lost(job_id, exc)
                if requeued is None:
                    return None
                self._lost_at[job_id] = lost_at
                job = requeued
            except FalUnavailableError as exc:  # FalSubmitUncertain too: the job keeps its submit key
                await events.flush()
                if entry is not None and len(self.pool.entries) > 1:
                    entry.failed(str(exc))
                delay = outage.next_delay()
                if delay is None:
                    await self._fail(job_id, exc)
                    return None
                if outage.tries == 1:
                    await self._waiting_for_backend(job_id, progress, exc)
                await asyncio.sleep(delay)
                job = await self.jobs.get(job_id)
            except (FalError, UserError, ImageInputError) as exc:
                await events.flush()
                await self._fail(job_id, exc)
                return None

    async def _waiting_for_backend(self, job_id: int, progress: Progress, exc: FalError) -> None:
        """An outage began: say so in the job's history and to its user (once per outage)."""
        await self.jobs.add_event(job_id, "note", f"the backend is unreachable ({exc}); waiting up to "
                                  f"{self.outage_s:g} s for it")
        progress.add_log("The backend can't be reached right now; waiting for it to come back…")
        await self.listener.job_progress(await self.jobs.get(job_id), progress)

    async def _overdue(self, job_id: int) -> None:
        """The job's deadline passed: cancel its request at the backend (best effort) and fail it."""
        job = await self.jobs.get(job_id)
        if job.terminal:
            return
        await self._cancel_at_backend(job, wait_for_submit=True)  # the deadline may have cut a submit short
        await self._end(job_id, JobStatus.FAILED, overdue(self.deadline_s), retryable=True,
                        data={"deadline_at": job.deadline_at})

    async def _upload_allowed(self, job: Job) -> bool:
        """The whole picture checked before (a crop of) it is sent, when the job runs with the safety checker;
        a flagged picture blocks the job (`services/upload_check.py`)."""
        if self.upload_check is None or not job.input.get("enable_safety_checker", True):
            return True
        verdict = await self.upload_check.verdict(job)
        if verdict.verdict == "flagged":
            await self._block_flagged_input(job.id, f"the whole upload: NSFW probability {verdict.probability:.2f}")
            return False
        if verdict.verdict == "unchecked":
            await self.jobs.add_event(job.id, "note", f"the whole upload was not checked: {verdict.why}; the "
                                      "server's settings decide, and the backend checks what it is sent")
        else:
            await self.jobs.add_event(job.id, "note", f"the whole upload was checked: NSFW probability "
                                      f"{verdict.probability:.2f}")
        return True

    async def _submit(self, job: Job, progress: Progress,
                      entry: PoolBackend | None) -> tuple[Job, QueueHandle, PoolBackend]:
        """Record the submission's key and backend, then send it (a job that already has a key sends it again with
        it, to the backend that has it), then record the request. The POST runs on, shielded, if the job's deadline
        interrupts it (`_overdue` cancels what it created); a request taken whose record failed is kept here, so the
        retry records it instead of sending again."""
        handle = self._handles.get(job.id)
        if handle is None:
            if job.submit_key is None:
                job, handle, entry = await self._submit_to_pool(job)
            else:
                assert entry is not None
                body = await self._request_body(job, entry)
                handle = await asyncio.shield(self._send(job.id, entry.client, body, job.submit_key))
                if self.spend is not None:  # as a fresh submit would (charging a job twice is a no-op)
                    await self.spend.ran_on(job.id, job.guild_id, job.input, hosted=entry.hosted)
        assert entry is not None
        job = await self.jobs.transition(
            job.id, JobStatus.SUBMITTED, data={"request_id": handle.request_id, "backend": job.backend},
            backend_request_id=handle.request_id, status_url=handle.status_url, response_url=handle.response_url,
            cancel_url=handle.cancel_url)
        self._handles.pop(job.id, None)
        progress.status = job.status
        await self.listener.job_progress(job, progress)
        return job, handle, entry

    async def _submit_to_pool(self, job: Job) -> tuple[Job, QueueHandle, PoolBackend]:
        """A fresh submit: to the pool's choice, the next backend at once when one refuses it (unreachable, or busy:
        429/503). Each try records its key and backend first; a refusal proves nothing arrived, so it is forgotten."""
        candidates = await self.pool.candidates(prefer=self._lost_at.get(job.id))
        key = f"job-{job.id}-{job.attempts + 1}-{secrets.token_hex(8)}"
        refusal: FalUnavailableError | FalHTTPError | None = None
        for position, entry in enumerate(candidates):
            body = await self._request_body(job, entry)
            # a pool of one keeps the name the job was created with (as before the pool)
            job = await self.jobs.begin_submit(job.id, key,
                                               backend=entry.name if len(self.pool.entries) > 1 else None)
            try:
                handle = await asyncio.shield(self._send(job.id, entry.submitter, body, key))
            except FalSubmitUncertain:
                raise  # the key stays: whatever is sent next for this job carries it, to this backend
            except FalUnavailableError as exc:  # never arrived (no connection, or refused with 429/503)
                job = await self.jobs.forget_submit(job.id, f"{entry.name}: {exc}")
                if len(candidates) > 1:
                    entry.failed(str(exc))
                refusal = exc
                continue
            except FalHTTPError as exc:
                if not refused(exc):
                    raise
                # answered "no": nothing was created there (nor spent). Another backend may say yes: its account
                # or key may be fine (401/403), it may still serve the app (404: a Serve app being redeployed), or
                # it may have what this one lacks (422: e.g. a prompt expander)
                job = await self.jobs.forget_submit(job.id, f"{entry.name}: {exc}")
                if position == len(candidates) - 1:
                    raise
                log.warning("backend %s refused job %d (%s): trying the next one", entry.name, job.id,
                            exc.status_code)
                if exc.status_code != 422:  # a request this backend can't serve says nothing of its health
                    entry.failed(str(exc))
                refusal = exc
                continue
            entry.worked()
            self._lost_at.pop(job.id, None)
            if self.spend is not None:
                await self.spend.ran_on(job.id, job.guild_id, job.input, hosted=entry.hosted)
            return job, handle, entry
        assert refusal is not None
        raise refusal

    def _send(self, job_id: int, client: FalQueueClient, body: dict[str, Any], key: str) -> asyncio.Task[QueueHandle]:
        """The POST, as a task of its own (kept in `_submits` while on the wire); a handle it gets is kept in
        `_handles` until the job records it."""
        task = asyncio.create_task(client.submit(body, idempotency_key=key), name=f"job-{job_id}-submit")
        self._submits[job_id] = task

        def settled(done: asyncio.Task[QueueHandle]) -> None:
            if self._submits.get(job_id) is done:
                del self._submits[job_id]
            if not done.cancelled() and done.exception() is None:
                self._handles[job_id] = done.result()

        task.add_done_callback(settled)
        return task

    async def _keys_honoured(self) -> bool | None:
        """Whether the first backend honours a repeated `Idempotency-Key` (each backend says for its own jobs)."""
        return await self.pool.first.keys_honoured()

    async def _known_request(self, job: Job, entry: PoolBackend) -> QueueHandle | None:
        """The backend's request for a job whose handle isn't recorded: a submit still on the wire is waited for;
        a key the job's backend honours is sent again to learn it. None when there is none (or no way to know)."""
        handle = _handle(job) or self._handles.get(job.id)
        if handle is not None:
            return handle
        task = self._submits.get(job.id)
        if task is not None:
            try:
                async with asyncio.timeout(30.0):
                    return await asyncio.shield(task)
            except (FalError, TimeoutError):
                pass
        if job.submit_key is None or await entry.keys_honoured() is not True:
            return None
        try:
            async with asyncio.timeout(30.0):
                return await entry.client.submit(await self._request_body(job, entry), idempotency_key=job.submit_key)
        except (FalError, UserError, TimeoutError) as exc:
            log.warning("job %s: could not learn its request at the backend %s: %s", job.id, entry.name, exc)
            return None

    async def _lost(self, job_id: int, exc: FalNotFoundError) -> Job | None:
        """The backend doesn't know the request: queue the job to submit again (None when it ended instead)."""
        job = await self.jobs.get(job_id)
        if job.status is JobStatus.QUEUED:  # the submit itself: the backend doesn't serve this app
            await self._end(job_id, JobStatus.FAILED, f"The backend can't run this job: {exc}")
            return None
        if job.attempts >= self.max_attempts:
            await self._end(job_id, JobStatus.FAILED, "The backend lost this job too many times.")
            return None
        return await self.jobs.transition(job_id, JobStatus.QUEUED,
                                          message="the backend lost the request; submitting again")

    async def _fail(self, job_id: int, exc: FalError | UserError | ImageInputError) -> None:
        """End a job the backend (or its inputs) failed, saying why in the user's terms (`job_failures.py`)."""
        ending = ending_for(exc, cancel_requested=job_id in self._cancel_requested)
        if ending.flagged_input:
            await self._block_flagged_input(job_id, ending.message)
        else:
            await self._end(job_id, ending.status, ending.message, retryable=ending.retryable)

    async def _on_update(self, job_id: int, progress: Progress, events: EventBuffer, outage: Outage,
                         update: QueueUpdate) -> None:
        outage.over()
        if update.kind == "queued":
            progress.queue_position = update.position
            events.position(update.position)
        elif update.kind == "started":
            progress.queue_position = None
            job = await self.jobs.get(job_id)
            if job.status is JobStatus.SUBMITTED:
                job = await self.jobs.transition(job_id, JobStatus.RUNNING)
            progress.status = JobStatus.RUNNING
            await events.flush()
            await self.listener.job_progress(job, progress)
            return
        elif update.kind == "log" and update.log is not None:
            progress.add_log(update.log.message)
            events.log(update.log.message, update.log.level)
        else:
            return
        await events.maybe_flush()
        await self.listener.job_progress(await self.jobs.get(job_id), progress)

    async def _succeed(self, job_id: int, output: InpaintOutput) -> None:
        blobs: dict[str, Blob] = {}
        entry = self.pool.get((await self.jobs.get(job_id)).backend) or self.pool.first
        for i, image in enumerate(output.images):
            data = await fetch_source(image.url, limits=OUTPUT_LIMITS, role="result", policy=entry.results_from)
            blobs[f"output_{i}"] = Blob(data, image.content_type)
        job = await self.jobs.get(job_id)
        if job.plan is not None:
            blobs, output = await self._stitched(job, job.plan, blobs, output)
        if await self._expansion_blocked(job, output, blobs):
            return
        result = output.model_dump(mode="json")
        for stored_image in result["images"]:
            if stored_image["url"].startswith("data:"):
                stored_image["url"] = "stored"  # the bytes are in blobs; don't keep megabytes of base64 twice
        if job.status is JobStatus.SUBMITTED:
            job = await self.jobs.transition(job_id, JobStatus.RUNNING, message="running (seen only at completion)")
        flagged = [i for i, f in enumerate(output.has_nsfw_concepts) if f]
        spoiler = False
        if flagged:
            settings = await self.store.server_settings.load(job.guild_id)
            action = settings.flagged_action(job.age_restricted)
            flagged_images = [blobs[f"output_{i}"].data for i in flagged if f"output_{i}" in blobs]
            where = "an age-restricted" if job.age_restricted else "an ordinary"
            await self._log(job, f"image_flagged_{action}", f"{len(flagged)} of {len(output.images)} image(s) "
                            f"flagged by the safety checker in {where} channel: {action}", flagged_images)
            if action == "block":
                await self.jobs.attach_blobs(job_id, blobs)
                await self._end(job_id, JobStatus.BLOCKED, "The safety checker flagged the result, so it was not "
                                "posted here.", data={"rule": "safety checker (output)"})
                return
            spoiler = action == "spoiler"
        job = await self.jobs.transition(job_id, JobStatus.SUCCEEDED, result=result, blobs=blobs)
        self._ended(job_id)
        await self.listener.job_succeeded(job, output, list(blobs.values()), spoiler=spoiler)

    async def _stitched(self, job: Job, plan: CropPlan, outputs: dict[str, Blob],
                        output: InpaintOutput) -> tuple[dict[str, Blob], InpaintOutput]:
        """The backend's results for the crop, each put back into the job's picture (`services/stitch.py`)."""
        inputs = await self.jobs.blobs(job.id)
        if "image" not in inputs or "mask" not in inputs:
            raise UserError(f"Job #{job.id}'s picture is no longer stored, so its result can't be put back.")
        picture = inputs.get("original", inputs["image"])  # with its transparency, when it had any
        stitched = await asyncio.to_thread(stitch_encoded, picture.data, inputs["mask"].data,
                                           [blob.data for blob in outputs.values()], plan)
        width, height = plan.image_size
        images = [image.model_copy(update={"width": width, "height": height, "content_type": content_type})
                  for image, (_, content_type) in zip(output.images, stitched, strict=True)]
        blobs = {role: Blob(data, content_type) for role, (data, content_type) in zip(outputs, stitched, strict=True)}
        return blobs, output.model_copy(update={"images": images})

    async def _expansion_blocked(self, job: Job, output: InpaintOutput, blobs: dict[str, Blob]) -> bool:
        """A prompt the backend expanded (`expand_prompt`) is a model's text, and the picture was painted from it:
        it goes through the server's prompt filters like the user's own, and a job whose expansion breaks them is
        blocked (nothing posted, the moderation log told) as if the user had written it."""
        if output.prompt == str(job.input.get("prompt", "")):
            return False
        settings = await self.store.server_settings.load(job.guild_id)
        hit = PromptFilter(settings).check({"prompt": output.prompt})
        if hit is None:
            return False
        rule = f"{hit.rule} in the expanded prompt"
        await self._log(job, "prompt_blocked", f"{rule}: {output.prompt}"[:1000])
        await self.jobs.attach_blobs(job.id, blobs)
        await self._end(job.id, JobStatus.BLOCKED, f"Blocked: {rule}", data={"rule": rule})
        return True

    async def _block_flagged_input(self, job_id: int, detail: str) -> None:
        job = await self.jobs.get(job_id)
        blobs = await self.jobs.blobs(job_id)
        await self._log(job, "input_flagged", f"the backend's safety checker flagged the uploaded image: {detail}",
                        [blobs["image"].data] if "image" in blobs else [])
        await self._end(job_id, JobStatus.BLOCKED, "The safety checker flagged the uploaded image, so it can't be "
                        "used here.", data={"rule": "safety checker (input)"})

    async def _log(self, job: Job, action: str, detail: str, images: Sequence[bytes] = ()) -> None:
        if job.guild_id is not None:
            await self.modlog.record(job.guild_id, action, job=job, user_id=job.user_id, detail=detail,
                                     images=images)

    async def _request_body(self, job: Job, entry: PoolBackend) -> dict[str, Any]:
        """The request to send: the stored input with its blob references replaced by data URIs; to a backend that
        serves without a safety checker (a classic worker, `fit_to_policy`), with the checker off."""
        blobs = await self.jobs.blobs(job.id)
        body = dict(job.input)
        if not entry.choice.safety_checker:
            body["enable_safety_checker"] = False
        for key in ("image_url", "mask_url"):
            role = BLOB_REFS.get(body.get(key, ""))
            if role is not None:
                blob = blobs.get(role)
                if blob is None:
                    raise UserError(f"Job #{job.id}'s {role} is no longer stored.")
                body[key] = to_data_uri(blob.data, blob.content_type)
        return body

    async def _post_result(self, job: Job, output: InpaintOutput | None = None, *, spoiler: bool = False) -> None:
        if output is None:
            assert job.result is not None
            output = InpaintOutput.model_validate(job.result)
            spoiler = any(output.has_nsfw_concepts)  # only "spoiler" or "allow" let a flagged result get here
        blobs = await self.jobs.blobs(job.id)
        images = [blobs[f"output_{i}"] for i in range(len(output.images)) if f"output_{i}" in blobs]
        await self.listener.job_succeeded(job, output, images, spoiler=spoiler)

    async def _end(self, job_id: int, status: JobStatus, error: str, *, retryable: bool = False,
                   data: dict[str, object] | None = None) -> None:
        try:
            job = await self.jobs.transition(job_id, status, error=error,
                                              data={"retryable": retryable, **(data or {})})
        except IllegalTransition:
            job = await self.jobs.get(job_id)
        self._ended(job_id)
        log.info("job %s ended %s: %s", job_id, job.status, job.error)
        await self.listener.job_ended(job)

    def _ended(self, job_id: int) -> None:
        """Forget what was kept about a job while it ran (it has ended)."""
        self._cancel_requested.discard(job_id)
        self._lost_at.pop(job_id, None)
        self._handles.pop(job_id, None)
        self._storage_failures.pop(job_id, None)


def _held(job: Job) -> bool:
    """A backend has (or may have) the job's request: it has one recorded, or a submit that may have arrived."""
    return job.submit_key is not None or _handle(job) is not None


def _handle(job: Job) -> QueueHandle | None:
    if not (job.backend_request_id and job.status_url and job.response_url and job.cancel_url):
        return None
    return QueueHandle(request_id=job.backend_request_id, status_url=job.status_url, response_url=job.response_url,
                       cancel_url=job.cancel_url)
