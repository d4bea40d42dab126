"""The worker's request queue: arrival order, one batch on the device at a time, cancel, results kept for a TTL.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator

import httpx
from PIL import Image

from services.schema import CancelOutcome, InpaintInput, NsfwCheckInput
from services.worker.checks import run_check
from services.worker.config import WorkerConfig
from services.worker.expander import PromptExpander
from services.worker.inputs import RequestError, prepare_job, request_batch_key, resolve_seed
from services.worker.outputs import build_output
from services.worker.pipelines.base import Cancelled, Pipeline, PipelineJob, RunContext
from services.worker.records import CheckRecord, InpaintRecord, RequestRecord
from services.worker.safety import SafetyChecker

log = logging.getLogger(__name__)

#: NSFW checks running at once (each fetches and decodes an image of up to MAX_IMAGE_BYTES); more wait their turn
MAX_RUNNING_CHECKS = 4


class QueueFull(RuntimeError):
    """`max_queue` requests are already waiting (the client is told to retry: fal's 503)."""


class RequestQueue:
    """Holds the requests of every app and runs them: inpainting a batch at a time through the pipeline, NSFW
    checks through the safety checker as they come."""

    def __init__(self, config: WorkerConfig, http: httpx.AsyncClient, pipeline: Pipeline,
                 safety: SafetyChecker | None = None, expander: PromptExpander | None = None) -> None:
        self.config = config
        self.http = http  # fetches image and mask URLs
        self.pipeline = pipeline
        self.safety = safety
        self.expander = expander
        self.records: dict[str, RequestRecord] = {}
        self.pending: deque[InpaintRecord] = deque()
        self.running: list[InpaintRecord] = []
        self.checks_waiting: deque[CheckRecord] = deque()
        self.checks_running: list[CheckRecord] = []
        self._wakeup = asyncio.Event()
        self._check_slots = asyncio.Semaphore(MAX_RUNNING_CHECKS)
        self._check_tasks: set[asyncio.Task[None]] = set()

    # --- client-facing operations -------------------------------------------------------------------

    def submit(self, inp: InpaintInput, base_url: str) -> InpaintRecord:
        """Queue an inpainting request behind the others."""
        self._refuse_when_full(self.pending)
        record = InpaintRecord(id=str(uuid.uuid4()), input=inp, seed=resolve_seed(inp), base_url=base_url)
        self.records[record.id] = record
        self.pending.append(record)
        self._wakeup.set()
        return record

    def submit_check(self, inp: NsfwCheckInput, base_url: str) -> CheckRecord:
        """Start an NSFW check now (or as soon as one of the `MAX_RUNNING_CHECKS` slots is free)."""
        assert self.safety is not None, "checks are refused at submit without a checker"
        self._refuse_when_full(self.checks_waiting)
        record = CheckRecord(id=str(uuid.uuid4()), input=inp, base_url=base_url)
        self.records[record.id] = record
        self.checks_waiting.append(record)
        task = asyncio.create_task(self._run_check(record), name=f"worker-check-{record.id}")
        self._check_tasks.add(task)
        task.add_done_callback(self._check_tasks.discard)
        return record

    def _refuse_when_full(self, waiting: deque[InpaintRecord] | deque[CheckRecord]) -> None:
        if len(waiting) >= self.config.max_queue:
            raise QueueFull(f"the worker's queue is full ({self.config.max_queue} requests waiting); "
                            "try again shortly")

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
        """A queued request is completed as cancelled at once; a running one stops at its pipeline's next check."""
        record = self.records.get(request_id)
        if record is None:
            return "NOT_FOUND"
        if record.state == "COMPLETED":
            return "ALREADY_COMPLETED"
        if record.state == "IN_QUEUE":
            if isinstance(record, CheckRecord):
                self.checks_waiting.remove(record)
            elif isinstance(record, InpaintRecord):
                self.pending.remove(record)
            record.fail_cancelled("cancelled while queued")
            return "OK"
        if record.ctx is not None:
            record.ctx.cancel_event.set()
        record.add_log("cancellation requested")
        return "CANCELLATION_REQUESTED"

    @property
    def queue_length(self) -> int:
        """Requests waiting or running, of every app."""
        return len(self.pending) + len(self.running) + len(self.checks_waiting) + len(self.checks_running)

    # --- batching -----------------------------------------------------------------------------------

    def take_batch(self) -> list[InpaintRecord]:
        """Take the next request off the queue, plus the compatible ones behind it (`request_batch_key`) up to
        `max_batch_images` images in all, when the pipeline can share a batch between requests."""
        first = self.pending.popleft()
        batch = [first]
        key = request_batch_key(first.input)
        if key is None or not self.pipeline.batches:
            return batch
        images = first.input.num_images
        for record in list(self.pending):
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
        """Run the runner and the reaper while the context is open; at the end, stop them and any running check."""
        tasks = [asyncio.create_task(self.run_forever(), name="worker-runner"),
                 asyncio.create_task(self.reap_forever(), name="worker-reaper")]
        try:
            yield
        finally:
            tasks += self._check_tasks
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def run_forever(self) -> None:
        while True:
            while not self.pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = self.take_batch()
            self.running = batch
            try:
                await self.run(batch)
            finally:
                self.running = []

    async def reap_forever(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, self.config.result_ttl_s / 2))
            self.reap()

    def reap(self) -> int:
        """Free completed requests older than the TTL (results and files); returns how many."""
        cutoff = time.monotonic() - self.config.result_ttl_s
        expired = [rid for rid, r in self.records.items()
                   if r.state == "COMPLETED" and r.finished_at is not None and r.finished_at < cutoff]
        for rid in expired:
            del self.records[rid]
        return len(expired)

    # --- running a check ----------------------------------------------------------------------------

    async def _run_check(self, record: CheckRecord) -> None:
        """Wait for a free slot, then run the check (unless it was cancelled while it waited)."""
        assert self.safety is not None
        async with self._check_slots:
            if record.state != "IN_QUEUE":
                return
            self.checks_waiting.remove(record)
            self.checks_running.append(record)
            try:
                await run_check(record, self.config, self.http, self.safety)
            finally:
                self.checks_running.remove(record)

    # --- running a batch ----------------------------------------------------------------------------

    async def run(self, batch: list[InpaintRecord]) -> None:
        """Prepare each request, run those still live through the pipeline together, and complete every one."""
        contexts = [record.start() for record in batch]
        prepared = await asyncio.gather(*(self._prepare(record, ctx) for record, ctx in zip(batch, contexts,
                                                                                             strict=True)))
        live = [(record, ctx, job) for record, ctx, job in zip(batch, contexts, prepared, strict=True)
                if job is not None]
        if not live:
            return
        pipeline = self.pipeline
        together = f" (sharing a batch with {len(live) - 1} other request(s))" if len(live) > 1 else ""
        for record, _, job in live:
            record.add_log(f"running {pipeline.name} on {pipeline.device}: {job.image.width}×{job.image.height}, "
                           f"{job.num_images} image(s), seed {record.seed}{together}")
        start = time.perf_counter()
        try:
            outputs = await asyncio.to_thread(pipeline.run_batch, [job for _, _, job in live],
                                              [ctx for _, ctx, _ in live])
        except Cancelled:
            for record, _, _ in live:
                record.fail_cancelled("cancelled between denoising steps")
            return
        except Exception as exc:
            log.exception("batch %s failed", [record.id for record, _, _ in live])
            for record, _, _ in live:
                _fail_crashed(record, exc)
            return
        elapsed = time.perf_counter() - start
        for (record, _, _), images in zip(live, outputs, strict=True):
            record.inference_time = elapsed
            await self._finish(record, images)

    async def _prepare(self, record: InpaintRecord, ctx: RunContext) -> PipelineJob | None:
        """Fetch, check and fit one request's inputs, and expand its prompt when it asks for that; a request that
        can't run is completed with its error."""
        try:
            job = await prepare_job(record.input, record.seed, self.config, http=self.http, safety=self.safety)
            ctx.check()
            if record.input.expand_prompt:
                job = await self._expand_prompt(record, job)
                ctx.check()
            return job
        except Cancelled:
            record.fail_cancelled("cancelled before inference")
        except RequestError as exc:
            record.add_log(f"request error: {exc}", "ERROR")
            record.fail(str(exc), exc.error_type, 422, {"detail": exc.detail})
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

    async def _finish(self, record: InpaintRecord, images: list[Image.Image]) -> None:
        """Safety check, encode and complete one request of a batch (unless it was cancelled meanwhile)."""
        if record.cancel_requested:
            record.fail_cancelled("cancelled: its images are discarded")
            return
        try:
            record.result = await build_output(record, images, self.safety)
        except Exception as exc:
            log.exception("request %s failed", record.id)
            record.fail_internal(exc)
            return
        record.add_log(f"done in {record.running_for_s():.2f} s")
        record.complete()


def _fail_crashed(record: InpaintRecord, exc: Exception) -> None:
    record.add_log(f"internal error: {type(exc).__name__}: {exc}", "ERROR")
    record.fail_internal(exc)
