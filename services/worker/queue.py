"""The worker's request queue: arrival order, one batch on the device at a time, cancel, results kept for a TTL.

Requests live in memory (the bot keeps the durable record and re-submits after a worker restart). Compatible
requests waiting together share one pipeline batch when the pipeline can batch. Inference, image decoding and
encoding run in threads so the HTTP server stays responsive while a job runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator

import httpx
from PIL import Image

from services.schema import CancelOutcome, InpaintInput
from services.worker.config import WorkerConfig
from services.worker.inputs import RequestError, prepare_job, request_batch_key, resolve_seed
from services.worker.outputs import build_output
from services.worker.pipelines.base import Cancelled, Pipeline, PipelineJob, RunContext
from services.worker.records import RequestRecord
from services.worker.safety import SafetyChecker

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """`max_queue` requests are already waiting (the client is told to retry: fal's 503)."""


class RequestQueue:
    """Holds the requests and runs them, a batch at a time, through the pipeline."""

    def __init__(self, config: WorkerConfig, http: httpx.AsyncClient, pipeline: Pipeline,
                 safety: SafetyChecker | None = None) -> None:
        self.config = config
        self.http = http  # fetches image and mask URLs
        self.pipeline = pipeline
        self.safety = safety
        self.records: dict[str, RequestRecord] = {}
        self.pending: deque[RequestRecord] = deque()
        self.running: list[RequestRecord] = []
        self._wakeup = asyncio.Event()

    # --- client-facing operations -------------------------------------------------------------------

    def submit(self, inp: InpaintInput, base_url: str) -> RequestRecord:
        if len(self.pending) >= self.config.max_queue:
            raise QueueFull(f"the worker's queue is full ({self.config.max_queue} requests waiting); "
                            "try again shortly")
        record = RequestRecord(id=str(uuid.uuid4()), input=inp, seed=resolve_seed(inp), base_url=base_url)
        self.records[record.id] = record
        self.pending.append(record)
        self._wakeup.set()
        return record

    def get(self, request_id: str) -> RequestRecord | None:
        return self.records.get(request_id)

    def position(self, record: RequestRecord) -> int:
        """Requests waiting ahead of this one (0 = next to run), as fal defines `queue_position`."""
        try:
            return self.pending.index(record)
        except ValueError:
            return 0

    def cancel(self, request_id: str) -> CancelOutcome:
        """A queued request is completed as cancelled at once; a running one stops at its pipeline's next check."""
        record = self.records.get(request_id)
        if record is None:
            return "NOT_FOUND"
        if record.state == "COMPLETED":
            return "ALREADY_COMPLETED"
        if record.state == "IN_QUEUE":
            self.pending.remove(record)
            record.fail_cancelled("cancelled while queued")
            return "OK"
        if record.ctx is not None:
            record.ctx.cancel_event.set()
        record.add_log("cancellation requested")
        return "CANCELLATION_REQUESTED"

    @property
    def queue_length(self) -> int:
        """Requests waiting or running."""
        return len(self.pending) + len(self.running)

    # --- batching -----------------------------------------------------------------------------------

    def take_batch(self) -> list[RequestRecord]:
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
        """Run the runner and the reaper while the context is open."""
        tasks = [asyncio.create_task(self.run_forever(), name="worker-runner"),
                 asyncio.create_task(self.reap_forever(), name="worker-reaper")]
        try:
            yield
        finally:
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

    # --- running a batch ----------------------------------------------------------------------------

    async def run(self, batch: list[RequestRecord]) -> None:
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

    async def _prepare(self, record: RequestRecord, ctx: RunContext) -> PipelineJob | None:
        """Fetch, check and fit one request's inputs; a request that can't run is completed with its error."""
        try:
            job = await prepare_job(record.input, record.seed, self.config, http=self.http, safety=self.safety)
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

    async def _finish(self, record: RequestRecord, images: list[Image.Image]) -> None:
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


def _fail_crashed(record: RequestRecord, exc: Exception) -> None:
    record.add_log(f"internal error: {type(exc).__name__}: {exc}", "ERROR")
    record.fail_internal(exc)
