"""The worker's request queue: arrival order, one batch on the device at a time, cancel, results kept for a TTL.

(Under Ray Serve, `services.worker.serve`, the pipeline is the model deployment's replicas: the queue then keeps
the pipeline's `concurrent_batches` requests in flight at once and awaits its `run_batch_async`; Serve batches.)

Requests live in memory (the bot keeps the durable record and re-submits after a worker restart). The queue holds
the requests of every app the worker serves, so lookups, cancel and expiry are one thing for all of them, but it
runs them in two lines:

- inpainting requests (`InpaintRecord`) wait in arrival order for the pipeline, one batch at a time; compatible
  requests waiting together share one pipeline batch when the pipeline can batch. A request that asks for
  `expand_prompt` has its prompt expanded (`services.worker.expander`) just before inference.
- NSFW checks (`CheckRecord`, `services.worker.checks`) take seconds at most and must not wait behind a long
  inpainting batch: each runs as soon as it arrives, up to `MAX_RUNNING_CHECKS` at once (the rest wait their
  turn, in order), beside whatever batch is running.

Inference, text generation, image decoding and encoding run in threads so the HTTP server stays responsive while a
job runs.

Nothing waits on a fetch, and memory stays bounded:

- inpainting requests are prepared (image and mask fetched, decoded, checked, fitted) ahead of the device by a
  `Preparer` (`services.worker.preparation`), a bounded number at once; the runner runs only prepared requests, so
  a slow image URL delays its own request and nobody else's;
- a waiting request's image and mask sources wait on disk (`services.worker.storage`), not in memory, and are
  dropped once it is prepared; results (files, and output bodies too large for memory) are kept there until they
  expire; the waiting requests' sources are limited in bytes (MAX_QUEUE_BYTES) as well as in number (MAX_QUEUE);
- a submit carrying an `Idempotency-Key` the worker still knows gets the request already made with it
  (`services.worker.idempotency`);
- when the queue falls idle, freed memory is handed back to the OS (`services.worker.memory`).

A batch's results are finished (its images safety-checked in one checker call, encoded, stored) in a task of their
own while the runner takes the next batch to the device, `MAX_FINISHING_BATCHES` batches at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from PIL import Image

from services.schema import CancelOutcome, InpaintInput, NsfwCheckInput
from services.worker.checks import run_check
from services.worker.config import WorkerConfig
from services.worker.expander import PromptExpander
from services.worker.idempotency import IdempotencyKeys, IdempotencyScope
from services.worker.inputs import RequestError, prepare_job, request_batch_key, resolve_seed
from services.worker.memory import release_freed_memory
from services.worker.outputs import build_output, check_batch
from services.worker.pipelines.base import Cancelled, Pipeline, PipelineJob, RunContext
from services.worker.preparation import Preparer
from services.worker.records import CheckRecord, InpaintRecord, RequestRecord
from services.worker.safety import SafetyChecker
from services.worker.storage import SPOOL_ABOVE_BYTES, RequestStorage, WaitingSources

log = logging.getLogger(__name__)

_R = TypeVar("_R", bound=RequestRecord)

#: how long the runner waits for compatible requests still being prepared to join the batch it is about to run
BATCH_MATES_WAIT_S = 0.5

#: NSFW checks running at once (each fetches and decodes an image of up to MAX_IMAGE_BYTES); more wait their turn
MAX_RUNNING_CHECKS = 4

#: batches whose results are checked and encoded at once beside the running batch; the runner waits past this
MAX_FINISHING_BATCHES = 2


class QueueFull(RuntimeError):
    """`max_queue` requests, or `max_queue_bytes` of their sources, are already waiting, or the worker can't store
    a request's inputs now (the client is told to retry: fal's 503)."""


class RequestQueue:
    """Holds the requests of every app and runs them: inpainting a batch at a time through the pipeline (prepared
    ahead), NSFW checks through the safety checker as they come."""

    def __init__(self, config: WorkerConfig, pipeline: Pipeline,
                 safety: SafetyChecker | None = None, expander: PromptExpander | None = None,
                 storage: RequestStorage | None = None) -> None:
        """Without `storage`, the queue keeps its data in WORKER_DATA_DIR (or a temporary folder) until `close()`."""
        self.config = config
        self.pipeline = pipeline
        self.safety = safety
        self.expander = expander
        self.storage = storage if storage is not None else RequestStorage(config.worker_data_dir)
        self.records: dict[str, RequestRecord] = {}
        self.keys = IdempotencyKeys()
        self.pending: deque[InpaintRecord] = deque()
        self.running: list[InpaintRecord] = []
        self.checks_waiting: deque[CheckRecord] = deque()
        self.checks_running: list[CheckRecord] = []
        self.preparer = Preparer(self._prepare, concurrency=config.prepare_concurrency,
                                 ahead=config.max_batch_images, on_prepared=self._on_prepared)
        self._arriving = 0  # submits storing their sources, not queued yet
        self._arriving_bytes = 0
        self._wakeup = asyncio.Event()
        self._check_slots = asyncio.Semaphore(MAX_RUNNING_CHECKS)
        self._check_tasks: set[asyncio.Task[None]] = set()
        self._finish_slots = asyncio.Semaphore(MAX_FINISHING_BATCHES)
        self._finishing: dict[asyncio.Task[None], list[InpaintRecord]] = {}  # batches being finished
        self._trim_due = False
        #: batches on the pipeline at once: 1 (one device), or the pipeline's `concurrent_batches` (a pipeline
        #: that sends its batches elsewhere, as the Ray Serve ingress's does, keeps several replicas busy)
        concurrent = int(getattr(pipeline, "concurrent_batches", 1))
        self._batch_slots = asyncio.Semaphore(concurrent) if concurrent > 1 else None
        self._batch_tasks: set[asyncio.Task[None]] = set()

    # --- client-facing operations -------------------------------------------------------------------

    async def submit(self, inp: InpaintInput, base_url: str,
                     idempotency: IdempotencyScope | None = None) -> InpaintRecord:
        """Queue an inpainting request behind the others (its image and mask wait in the storage); or, when
        `idempotency` names a request the worker still knows, that request."""
        known = self._known(idempotency, InpaintRecord)
        if known is not None:
            return known
        self._refuse_when_full(len(self.pending), _source_chars(inp.image_url, inp.mask_url))
        record = InpaintRecord(id=str(uuid.uuid4()), input=_without_sources(inp), seed=resolve_seed(inp),
                               base_url=base_url)
        sources = await self._arrive(record, idempotency, inp.image_url, inp.mask_url)
        if sources is None:
            return record
        record.sources = sources
        self.pending.append(record)
        self._wakeup.set()
        self._fill()
        return record

    async def submit_check(self, inp: NsfwCheckInput, base_url: str,
                           idempotency: IdempotencyScope | None = None) -> CheckRecord:
        """Start an NSFW check now (or as soon as one of the `MAX_RUNNING_CHECKS` slots is free; its image waits
        in the storage meanwhile); or, when `idempotency` names a check the worker still knows, that check."""
        assert self.safety is not None, "checks are refused at submit without a checker"
        known = self._known(idempotency, CheckRecord)
        if known is not None:
            return known
        self._refuse_when_full(len(self.checks_waiting), _source_chars(inp.image_url, ""))
        record = CheckRecord(id=str(uuid.uuid4()), input=inp.model_copy(update={"image_url": ""}),
                             base_url=base_url)
        sources = await self._arrive(record, idempotency, inp.image_url, "")
        if sources is None:
            return record
        self.checks_waiting.append(record)
        task = asyncio.create_task(self._run_check(record, sources), name=f"worker-check-{record.id}")
        self._check_tasks.add(task)
        task.add_done_callback(self._check_tasks.discard)
        return record

    def _known(self, scope: IdempotencyScope | None, kind: type[_R]) -> _R | None:
        """The request of the app already made with this idempotency key, if any."""
        request_id = self.keys.find(scope) if scope is not None else None
        record = self.records.get(request_id) if request_id is not None else None
        return record if isinstance(record, kind) else None

    async def _arrive(self, record: RequestRecord, scope: IdempotencyScope | None, image_url: str,
                      mask_url: str) -> WaitingSources | None:
        """Make `record` known (and its key), and store its sources; None when it was cancelled meanwhile. The
        request counts against the queue's limits from the start (its sources are written in a thread)."""
        chars = _source_chars(image_url, mask_url)
        self.records[record.id] = record
        if scope is not None:
            self.keys.remember(scope, record.id)
        self._arriving += 1
        self._arriving_bytes += chars
        try:
            if chars <= SPOOL_ABOVE_BYTES // 4:  # kept in memory, nothing written
                sources = self.storage.put_sources(record.id, image_url, mask_url)
            else:
                sources = await asyncio.to_thread(self.storage.put_sources, record.id, image_url, mask_url)
        except BaseException as exc:
            self._forget(record.id)
            if isinstance(exc, OSError):
                log.exception("could not store the inputs of %s", record.id)
                raise QueueFull("the worker could not store the request's inputs just now; try again shortly") \
                    from exc
            raise
        finally:
            self._arriving -= 1
            self._arriving_bytes -= chars
        if record.state == "COMPLETED":  # cancelled while its sources were written
            self.storage.drop_sources(sources)
            return None
        return sources

    def _refuse_when_full(self, waiting: int, chars: int) -> None:
        """Refuse a request when `max_queue` of its line already wait, or its sources would take the waiting
        requests' sources (both lines) past `max_queue_bytes` (a request finding nothing waiting is never refused
        for its size: MAX_IMAGE_BYTES bounds that)."""
        if waiting + self._arriving >= self.config.max_queue:
            raise QueueFull(f"the worker's queue is full ({self.config.max_queue} requests waiting); "
                            "try again shortly")
        held = self.waiting_bytes
        if held and held + chars > self.config.max_queue_bytes:
            raise QueueFull(f"the worker's queue is full (the waiting requests' images take {held / 2**20:.1f} "
                            f"MiB of its {self.config.max_queue_bytes / 2**20:.0f} MiB); try again shortly")

    @property
    def waiting_bytes(self) -> int:
        """Bytes of the sources the waiting requests hold (on disk or in memory), arriving ones included."""
        stored = sum(r.sources.nbytes for r in self.pending if r.sources is not None)
        return stored + sum(r.waiting.nbytes for r in self.checks_waiting if r.waiting is not None) + \
            self._arriving_bytes

    def get(self, request_id: str) -> RequestRecord | None:
        return self.records.get(request_id)

    def position(self, record: RequestRecord) -> int:
        """Requests waiting ahead of this one in its line (0 = next to run), as fal defines `queue_position`."""
        try:
            if isinstance(record, CheckRecord):
                return self.checks_waiting.index(record)
            if isinstance(record, InpaintRecord):
                return self.pending.index(record)
        except ValueError:
            pass
        return 0

    def cancel(self, request_id: str) -> CancelOutcome:
        """A queued request is completed as cancelled at once (its preparation stopped, its sources dropped); a
        running one stops at its pipeline's next check."""
        record = self.records.get(request_id)
        if record is None:
            return "NOT_FOUND"
        if record.state == "COMPLETED":
            return "ALREADY_COMPLETED"
        if record.state == "IN_QUEUE":
            if isinstance(record, CheckRecord) and record in self.checks_waiting:
                self.checks_waiting.remove(record)
            elif isinstance(record, InpaintRecord) and record in self.pending:
                self.pending.remove(record)
                self.preparer.discard(record)
                self._drop_sources(record)
                self._fill()
            record.fail_cancelled("cancelled while queued")
            return "OK"
        if record.ctx is not None:
            record.ctx.cancel_event.set()
        record.add_log("cancellation requested")
        return "CANCELLATION_REQUESTED"

    @property
    def queue_length(self) -> int:
        """Requests waiting or running, of every app."""
        return len(self.pending) + len(self.running) + len(self.checks_waiting) + len(self.checks_running) + \
            sum(len(records) for records in self._finishing.values())

    # --- batching -----------------------------------------------------------------------------------

    def take_batch(self, eligible: Callable[[InpaintRecord], bool] | None = None) -> list[InpaintRecord]:
        """Take the next request off the queue, plus the compatible ones behind it (`request_batch_key`) up to
        `max_batch_images` images in all, when the pipeline can share a batch between requests. With `eligible`,
        only the requests it accepts count (the runner takes prepared requests only); the others keep their
        places."""
        candidates = [record for record in self.pending if eligible is None or eligible(record)]
        first = candidates[0]
        self.pending.remove(first)
        batch = [first]
        key = request_batch_key(first.input)
        if key is None or not self.pipeline.batches:
            return batch
        images = first.input.num_images
        for record in candidates[1:]:
            if images + record.input.num_images > self.config.max_batch_images:
                break
            if request_batch_key(record.input) == key:
                self.pending.remove(record)
                batch.append(record)
                images += record.input.num_images
        return batch

    # --- background tasks ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def background_tasks(self) -> AsyncIterator[None]:
        """Run the runner and the reaper while the context is open; at the end, stop them, any running check and
        preparation, and delete what the storage holds."""
        tasks = [asyncio.create_task(self.run_forever(), name="worker-runner"),
                 asyncio.create_task(self.reap_forever(), name="worker-reaper")]
        try:
            yield
        finally:
            tasks += self._check_tasks
            tasks += self._batch_tasks
            tasks += self._finishing
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.close()

    async def close(self) -> None:
        """Stop the preparations and delete what the storage holds (every request's sources and results)."""
        await self.preparer.close()
        await asyncio.to_thread(self.storage.close)

    async def run_forever(self) -> None:
        while True:
            if not any(self.preparer.is_ready(record) for record in self.pending):
                self._wakeup.clear()
                if self._trim_due and self._idle:
                    self._trim_due = False
                    await asyncio.to_thread(release_freed_memory)
                    continue  # something may have arrived meanwhile
                await self._wakeup.wait()
                continue
            await self._wait_for_batch_mates()
            if not any(self.preparer.is_ready(record) for record in self.pending):
                continue
            if self._batch_slots is not None and self._batch_slots.locked():
                # a pipeline that runs several batches at once (Ray Serve), all of them busy: wait for a slot
                # with the requests still in the queue (where a cancel takes them out, and positions count them)
                async with self._batch_slots:
                    pass
                continue
            batch = self.take_batch(self.preparer.is_ready)
            self.running.extend(batch)
            self._fill()
            if self._batch_slots is None:
                try:
                    await self.run(batch, finish_later=True)
                finally:
                    self._batch_done(batch)
                continue
            await self._batch_slots.acquire()  # free: checked above, and nothing was awaited since
            task = asyncio.create_task(self._run_concurrently(batch), name="worker-batch")
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_tasks.discard)

    async def _run_concurrently(self, batch: list[InpaintRecord]) -> None:
        assert self._batch_slots is not None
        try:
            await self.run(batch, finish_later=True)
        finally:
            self._batch_done(batch)
            self._batch_slots.release()
            self._wakeup.set()

    def _batch_done(self, batch: list[InpaintRecord]) -> None:
        for record in batch:
            if record in self.running:
                self.running.remove(record)
        self._trim_due = True

    async def _wait_for_batch_mates(self) -> None:
        """When the pipeline batches and the next batch has room, give the requests that could share it but are
        still being prepared up to `BATCH_MATES_WAIT_S` to be ready (a data URI is prepared in milliseconds; a
        slow download is not waited for longer)."""
        if not self.pipeline.batches:
            return
        deadline = time.monotonic() + BATCH_MATES_WAIT_S
        while (remaining := deadline - time.monotonic()) > 0:
            first = next((record for record in self.pending if self.preparer.is_ready(record)), None)
            if first is None:  # cancelled meanwhile
                return
            key = request_batch_key(first.input)
            mates = [r for r in self.pending if key is not None and request_batch_key(r.input) == key]
            ready = sum(r.input.num_images for r in mates if self.preparer.is_ready(r))
            if ready >= self.config.max_batch_images or not any(self.preparer.is_preparing(r) for r in mates):
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    @property
    def _idle(self) -> bool:
        return not (self.pending or self.running or self.checks_waiting or self.checks_running
                    or self.preparer.in_flight or self._arriving or self._finishing)

    def _fill(self) -> None:
        """Start preparing the waiting requests there is room for."""
        self.preparer.fill(self.pending)

    def _on_prepared(self) -> None:
        self._wakeup.set()
        self._fill()

    async def reap_forever(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, self.config.result_ttl_s / 2))
            expired = self.expire()
            if expired:
                await asyncio.to_thread(self.storage.remove_results_of, expired)  # files off the event loop
                self._trim_due = True
                self._wakeup.set()

    def reap(self) -> int:
        """Free completed requests older than the TTL (results, files and idempotency keys); returns how many."""
        expired = self.expire()
        self.storage.remove_results_of(expired)
        return len(expired)

    def expire(self) -> list[str]:
        """Forget completed requests older than the TTL (records and idempotency keys); returns their ids, whose
        result files are the caller's to remove (blocking: the reaper does it in a thread)."""
        cutoff = time.monotonic() - self.config.result_ttl_s
        expired = [rid for rid, r in self.records.items()
                   if r.state == "COMPLETED" and r.finished_at is not None and r.finished_at < cutoff]
        for rid in expired:
            self._forget(rid)
        return expired

    def _forget(self, request_id: str) -> None:
        self.records.pop(request_id, None)
        self.keys.forget(request_id)

    def _drop_sources(self, record: InpaintRecord) -> None:
        sources, record.sources = record.sources, None
        if sources is not None:
            self.storage.drop_sources(sources)

    # --- running a check ----------------------------------------------------------------------------

    async def _run_check(self, record: CheckRecord, sources: WaitingSources) -> None:
        """Wait for a free slot, then run the check (unless it was cancelled while it waited) with its image
        read back from the storage; the image is dropped again at the end."""
        assert self.safety is not None
        record.waiting = sources
        try:
            async with self._check_slots:
                if record.state != "IN_QUEUE":
                    return
                self.checks_waiting.remove(record)
                self.checks_running.append(record)
                try:
                    image_url, _ = await asyncio.to_thread(self.storage.take_sources, sources)
                    record.waiting = None
                    record.input = record.input.model_copy(update={"image_url": image_url})
                    del image_url
                    await run_check(record, self.config, self.safety)
                finally:
                    record.input = record.input.model_copy(update={"image_url": ""})
                    self.checks_running.remove(record)
                    self._trim_due = True
                    self._wakeup.set()
        finally:
            record.waiting = None
            self.storage.drop_sources(sources)

    # --- preparing a request ------------------------------------------------------------------------

    async def _prepare(self, record: InpaintRecord) -> PipelineJob | None:
        """Read back a request's sources (dropping them), fetch and check its image and mask and fit them to the
        output size (`prepare_job`); or complete it with its error and return None."""
        sources, record.sources = record.sources, None
        try:
            if sources is None:
                raise RuntimeError("the request's image and mask are gone")
            if sources.path is None:
                image_url, mask_url = self.storage.take_sources(sources)
            else:
                image_url, mask_url = await asyncio.to_thread(self.storage.take_sources, sources)
            inp = record.input.model_copy(update={"image_url": image_url, "mask_url": mask_url})
            del image_url, mask_url
            return await prepare_job(inp, record.seed, self.config, safety=self.safety)
        except RequestError as exc:
            self._leave_queue(record)
            record.add_log(f"request error: {exc}", "ERROR")
            record.fail(str(exc), exc.error_type, 422, {"detail": exc.detail})
        except Exception as exc:
            self._leave_queue(record)
            log.exception("request %s failed", record.id)
            _fail_crashed(record, exc)
        finally:
            if sources is not None:
                self.storage.drop_sources(sources)  # deleted already, unless cancelled while reading it back
        return None

    def _leave_queue(self, record: InpaintRecord) -> None:
        if record in self.pending:
            self.pending.remove(record)

    # --- running a batch ----------------------------------------------------------------------------

    async def run(self, batch: list[InpaintRecord], *, finish_later: bool = False) -> None:
        """Take each request's prepared job (preparing it now if it wasn't), expand prompts where asked, run those
        still live through the pipeline together, and complete every one (with `finish_later`, the results are
        finished by a task of their own: `run` returns once the pipeline is free)."""
        for record in batch:
            if record.state == "COMPLETED":  # failed or cancelled meanwhile: its prepared job is dropped
                self.preparer.discard(record)
        batch = [record for record in batch if record.state != "COMPLETED"]
        contexts = [record.start() for record in batch]
        prepared = await asyncio.gather(*(self._job_for(record, ctx) for record, ctx in zip(batch, contexts,
                                                                                           strict=True)))
        self._fill()  # the batch's jobs are taken: room to prepare the next ones
        live = [(record, ctx, job) for record, ctx, job in zip(batch, contexts, prepared, strict=True)
                if job is not None]
        if not live:
            return
        records, ctxs, jobs = [r for r, _, _ in live], [c for _, c, _ in live], [j for _, _, j in live]
        del live, prepared
        pipeline = self.pipeline
        together = f" (sharing a batch with {len(records) - 1} other request(s))" if len(records) > 1 else ""
        for record, job in zip(records, jobs, strict=True):
            record.add_log(f"running {pipeline.name} on {pipeline.device}: {job.image.width}×{job.image.height}, "
                           f"{job.num_images} image(s), seed {record.seed}{together}")
        start = time.perf_counter()
        run_async = getattr(pipeline, "run_batch_async", None)  # a pipeline that awaits its work elsewhere
        try:
            if run_async is not None:
                outputs = await run_async(jobs, ctxs)
            else:
                outputs = await asyncio.to_thread(pipeline.run_batch, jobs, ctxs)
        except Cancelled:
            for record in records:
                record.fail_cancelled("cancelled between denoising steps")
            return
        except Exception as exc:
            log.exception("batch %s failed", [record.id for record in records])
            for record in records:
                _fail_crashed(record, exc)
            return
        finally:
            jobs.clear()  # their images
        elapsed = time.perf_counter() - start
        for record in records:
            record.inference_time = elapsed
        if not finish_later:
            await self._finish_batch(records, outputs)
            return
        await self._finish_slots.acquire()
        task = asyncio.create_task(self._finish_batch(records, outputs), name="worker-finish")
        self._finishing[task] = records
        task.add_done_callback(self._finished)

    async def _finish_batch(self, records: list[InpaintRecord], outputs: list[list[Image.Image]]) -> None:
        """Safety-check a batch's images in one checker call, then encode and complete its requests."""
        verdicts = await check_batch(records, outputs, self.safety)
        await asyncio.gather(*(self._finish(record, images, flags)
                               for record, images, flags in zip(records, outputs, verdicts, strict=True)))

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._finishing.pop(task, None)
        self._finish_slots.release()
        self._trim_due = True
        self._wakeup.set()

    async def _job_for(self, record: InpaintRecord, ctx: RunContext) -> PipelineJob | None:
        """A started request's prepared job, its prompt expanded when it asks for that; None when it can't run
        (it is completed: its error, or cancelled)."""
        job = await self.preparer.job_for(record)
        if job is None:
            return None
        try:
            ctx.check()
            if record.input.expand_prompt:
                job = await self._expand_prompt(record, job)
                ctx.check()
            return job
        except Cancelled:
            record.fail_cancelled("cancelled before inference")
        except Exception as exc:
            log.exception("request %s failed", record.id)
            _fail_crashed(record, exc)
        return None

    async def _expand_prompt(self, record: InpaintRecord, job: PipelineJob) -> PipelineJob:
        """The job with the request's prompt expanded (in a thread, seeded with the request's seed); the record
        keeps the expanded prompt for the output."""
        assert self.expander is not None, "requests asking for expand_prompt are refused at submit without one"
        record.add_log("expanding the prompt")
        record.expanded_prompt = await asyncio.to_thread(self.expander, record.input.prompt, record.seed)
        # not the text itself: logs are shown as the job runs, and a client filters the prompt it gets back first
        added = len(record.expanded_prompt.split()) - len(record.input.prompt.split())
        record.add_log(f"expanded the prompt (+{max(0, added)} words)")
        return dataclasses.replace(job, prompt=record.expanded_prompt)

    async def _finish(self, record: InpaintRecord, images: list[Image.Image],
                      flags: list[bool] | None = None) -> None:
        """Safety check (unless the batch's check gave `flags`), encode and complete one request of a batch (unless
        it was cancelled meanwhile)."""
        if record.cancel_requested:
            record.fail_cancelled("cancelled: its images are discarded")
            return
        try:
            body = await build_output(record, images, self.safety, self.storage, flags=flags)
            record.result, record.result_file = await asyncio.to_thread(self.storage.keep_body, record.id, body)
        except Exception as exc:
            log.exception("request %s failed", record.id)
            record.fail_internal(exc)
            return
        record.add_log(f"done in {record.running_for_s():.2f} s")
        record.complete()


def _fail_crashed(record: InpaintRecord, exc: Exception) -> None:
    record.add_log(f"internal error: {type(exc).__name__}: {exc}", "ERROR")
    record.fail_internal(exc)


def _source_chars(image_url: str, mask_url: str) -> int:
    """How much a request's sources weigh (characters: bytes, for the ASCII of URLs and data URIs)."""
    return len(image_url) + len(mask_url)


def _without_sources(inp: InpaintInput) -> InpaintInput:
    """The input the record keeps: everything but the image and mask, which wait in the storage."""
    return inp.model_copy(update={"image_url": "", "mask_url": ""})
