"""The worker's request queue: arrival order, one batch on the device at a time, cancel, results kept for a TTL.

Requests live in memory (the bot keeps the durable record and re-submits after a worker restart). Inference,
image decoding and encoding run in threads so the HTTP server stays responsive while a job runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
from PIL import Image

from services.images import ImageInputError, IntakeLimits, encode_image, prepare_inputs_async, to_data_uri
from services.schema import CancelOutcome, InpaintInput, InpaintOutput, OutputImage
from services.worker.config import WorkerConfig
from services.worker.inputs import RequestError, build_job, request_batch_key, resolve_seed
from services.worker.pipelines.base import Cancelled, Pipeline, PipelineJob, RunContext

log = logging.getLogger(__name__)

State = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}


class QueueFull(RuntimeError):
    pass


def _thread_logger(loop: asyncio.AbstractEventLoop, record: RequestRecord) -> Callable[[str], None]:
    """A log function a pipeline thread can call: the line is added on the event loop, in order."""
    def log_from_thread(message: str) -> None:
        loop.call_soon_threadsafe(record.add_log, message)

    return log_from_thread


@dataclass
class RequestRecord:
    id: str
    input: InpaintInput
    seed: int
    base_url: str
    state: State = "IN_QUEUE"
    logs: list[dict[str, Any]] = field(default_factory=list)
    created_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None
    inference_time: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None
    error_status: int = 500
    error_body: dict[str, Any] | None = None
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    ctx: RunContext | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add_log(self, message: str, level: str = "INFO") -> None:
        self.logs.append({"message": message, "level": level, "source": "USER",
                          "timestamp": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "")})
        self.notify()

    def notify(self) -> None:
        """Wake everyone waiting for a change (SSE streams, synchronous callers)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_changed(self, within_s: float) -> bool:
        """Wait until the record changes; False if nothing changed within `within_s` seconds."""
        event = self._changed
        try:
            await asyncio.wait_for(event.wait(), within_s)
        except TimeoutError:
            return False
        return True

    def fail(self, message: str, error_type: str, status: int, body: dict[str, Any] | None = None) -> None:
        self.error, self.error_type, self.error_status = message, error_type, status
        self.error_body = body or {"detail": message, "error_type": error_type}
        self.complete()

    def complete(self) -> None:
        self.state = "COMPLETED"
        self.finished_at = time.monotonic()
        self.notify()


class RequestQueue:
    """Holds requests and runs them one at a time through the pipeline."""

    def __init__(self, settings: WorkerConfig, http: httpx.AsyncClient) -> None:
        self.settings = settings
        self.http = http
        self.pipeline: Pipeline | None = None
        self.safety: Callable[[list[Image.Image]], list[bool]] | None = None
        self.records: dict[str, RequestRecord] = {}
        self.pending: deque[RequestRecord] = deque()
        self.running: list[RequestRecord] = []
        self.ready = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._limits = IntakeLimits(max_bytes=settings.max_image_bytes, min_side=8)

    # --- client-facing operations -------------------------------------------------------------------

    def submit(self, inp: InpaintInput, base_url: str) -> RequestRecord:
        if len(self.pending) >= self.settings.max_queue:
            raise QueueFull(f"the worker's queue is full ({self.settings.max_queue} requests waiting); "
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
        record = self.records.get(request_id)
        if record is None:
            return "NOT_FOUND"
        if record.state == "COMPLETED":
            return "ALREADY_COMPLETED"
        if record.state == "IN_QUEUE":
            self.pending.remove(record)
            record.add_log("cancelled while queued")
            record.fail("Request was cancelled", "cancelled", 400)
            return "OK"
        if record.ctx is not None:
            record.ctx.cancel_event.set()
        record.add_log("cancellation requested")
        return "CANCELLATION_REQUESTED"

    @property
    def queue_length(self) -> int:
        return len(self.pending) + len(self.running)

    # --- background tasks ---------------------------------------------------------------------------

    async def run_forever(self) -> None:
        await self.ready.wait()
        while True:
            while not self.pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = self._take_batch()
            self.running = batch
            try:
                await self._run(batch)
            finally:
                self.running = []

    def _take_batch(self) -> list[RequestRecord]:
        """The next request, plus the compatible ones behind it (same size, steps, strength, guidance) up to
        `max_batch_images`, when the pipeline can share a UNet batch between requests."""
        first = self.pending.popleft()
        batch = [first]
        key = request_batch_key(first.input)
        if key is None or self.pipeline is None or not self.pipeline.batches:
            return batch
        images = first.input.num_images
        for record in list(self.pending):
            if images + record.input.num_images > self.settings.max_batch_images:
                break
            if request_batch_key(record.input) == key:
                self.pending.remove(record)
                batch.append(record)
                images += record.input.num_images
        return batch

    async def reap_forever(self, interval: float | None = None) -> None:
        ttl = self.settings.result_ttl_s
        while True:
            await asyncio.sleep(interval if interval is not None else min(60.0, ttl / 2))
            self.reap()

    def reap(self) -> int:
        """Free completed requests older than the TTL (results and files); returns how many."""
        cutoff = time.monotonic() - self.settings.result_ttl_s
        expired = [rid for rid, r in self.records.items()
                   if r.state == "COMPLETED" and r.finished_at is not None and r.finished_at < cutoff]
        for rid in expired:
            del self.records[rid]
        return len(expired)

    # --- running one request ------------------------------------------------------------------------

    async def _run(self, batch: list[RequestRecord]) -> None:
        pipeline = self.pipeline
        assert pipeline is not None
        loop = asyncio.get_running_loop()
        for record in batch:
            record.state, record.started_at = "IN_PROGRESS", time.monotonic()
            record.ctx = RunContext(log=_thread_logger(loop, record))
            record.notify()
        prepared = await asyncio.gather(*(self._prepare(record) for record in batch))
        live = [(record, job) for record, job in zip(batch, prepared, strict=True) if job is not None]
        if not live:
            return
        together = f" (sharing a batch with {len(live) - 1} other request(s))" if len(live) > 1 else ""
        for record, job in live:
            record.add_log(f"running {pipeline.name} on {pipeline.device}: {job.image.width}×{job.image.height}, "
                           f"{job.num_images} image(s), seed {record.seed}{together}")
        jobs = [job for _, job in live]
        ctxs = [record.ctx for record, _ in live if record.ctx is not None]
        start = time.perf_counter()
        try:
            outputs = await asyncio.to_thread(pipeline.run_batch, jobs, ctxs)
        except Cancelled:
            for record, _ in live:
                record.add_log("cancelled between denoising steps")
                record.fail("Request was cancelled", "cancelled", 400)
            return
        except Exception as exc:
            log.exception("batch %s failed", [r.id for r, _ in live])
            for record, _ in live:
                record.add_log(f"internal error: {type(exc).__name__}: {exc}", "ERROR")
                record.fail(f"the worker failed: {type(exc).__name__}: {exc}", "runner_error", 500)
            return
        elapsed = time.perf_counter() - start
        for (record, _), images in zip(live, outputs, strict=True):
            record.inference_time = elapsed
            await self._finish(record, images)

    async def _prepare(self, record: RequestRecord) -> PipelineJob | None:
        """Fetch, check and fit one request's inputs; a request that can't run is completed with its error."""
        inp = record.input
        try:
            try:
                prepared = await prepare_inputs_async(inp.image_url, inp.mask_url, http=self.http,
                                                      limits=self._limits)
            except ImageInputError as exc:
                field = "mask_url" if exc.role == "mask" else "image_url"
                raise RequestError(field, exc.message, f"image_error.{exc.code}") from exc
            job = await asyncio.to_thread(build_job, inp, prepared, record.seed, self.settings)
            # the uploaded image too: nobody gets to launder an image through the bot
            if inp.enable_safety_checker and self.safety is not None and self.settings.check_inputs and (
                    await asyncio.to_thread(self.safety, [prepared.image]))[0]:
                raise RequestError("image_url", "the safety checker flagged the uploaded image",
                                   "content_policy_violation")
            assert record.ctx is not None
            record.ctx.check()
            return job
        except Cancelled:
            record.add_log("cancelled before inference")
            record.fail("Request was cancelled", "cancelled", 400)
        except RequestError as exc:
            record.add_log(f"request error: {exc}", "ERROR")
            error_type = exc.detail[0]["type"] if exc.detail[0]["type"] == "content_policy_violation" \
                else "validation_error"
            record.fail(str(exc), error_type, 422, {"detail": exc.detail})
        except Exception as exc:
            log.exception("request %s failed", record.id)
            record.add_log(f"internal error: {type(exc).__name__}: {exc}", "ERROR")
            record.fail(f"the worker failed: {type(exc).__name__}: {exc}", "runner_error", 500)
        return None

    async def _finish(self, record: RequestRecord, images: list[Image.Image]) -> None:
        """Safety check, encode and complete one request of a batch (unless it was cancelled meanwhile)."""
        if record.ctx is not None and record.ctx.cancel_event.is_set():
            record.add_log("cancelled: its images are discarded")
            record.fail("Request was cancelled", "cancelled", 400)
            return
        try:
            nsfw = [False] * len(images)
            if record.input.enable_safety_checker:
                nsfw, images = await self._check_safety(record, images)
            record.result = await asyncio.to_thread(self._encode, record, images, nsfw)
        except Exception as exc:
            log.exception("request %s failed", record.id)
            record.fail(f"the worker failed: {type(exc).__name__}: {exc}", "runner_error", 500)
            return
        assert record.started_at is not None
        record.add_log(f"done in {time.monotonic() - record.started_at:.2f} s")
        record.complete()

    async def _check_safety(self, record: RequestRecord,
                            images: list[Image.Image]) -> tuple[list[bool], list[Image.Image]]:
        assert self.safety is not None, "requests needing the checker are refused at submit without one"
        if record.input.safety_checker_version == "v2":
            record.add_log("safety checker v2 is not installed on this worker; using v1")
        flags = await asyncio.to_thread(self.safety, images)
        if any(flags):
            record.add_log(f"safety checker flagged {sum(flags)} of {len(flags)} image(s); replaced with black",
                           "WARN")
        checked = [Image.new("RGB", im.size, (0, 0, 0)) if flag else im for im, flag in zip(images, flags, strict=True)]
        return flags, checked

    def _encode(self, record: RequestRecord, images: list[Image.Image], nsfw: list[bool]) -> dict[str, Any]:
        fmt = record.input.format
        content_type = CONTENT_TYPES[fmt]
        outputs = []
        for i, image in enumerate(images):
            data = encode_image(image, fmt, quality=90)
            if record.input.sync_mode:
                url = to_data_uri(data, content_type)
            else:
                name = f"{i}.{'jpg' if fmt == 'jpeg' else 'png'}"
                record.files[name] = (data, content_type)
                url = f"{record.base_url}/files/{record.id}/{name}"
            outputs.append(OutputImage(url=url, width=image.width, height=image.height, content_type=content_type))
        assert record.started_at is not None
        timings = {"inference": record.inference_time or 0.0, "total": time.monotonic() - record.started_at}
        output = InpaintOutput(images=outputs, timings=timings, seed=record.seed, has_nsfw_concepts=nsfw,
                               prompt=record.input.prompt)
        return output.model_dump(mode="json")
