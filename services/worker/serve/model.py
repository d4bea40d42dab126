"""The model deployment: the worker's pipeline on N Ray Serve replicas, with Serve's dynamic batching.

Each replica loads the pipeline the configuration names (`load_pipeline`, the same loader as the single-process
worker: `from_pretrained` on MODEL_PATH) and warms it up before Serve routes anything to it. The ingress
(`services.worker.serve.ingress`) sends it one prepared job per call, as a stream:

    handle.options(stream=True, multiplexed_model_id=adapter_key(job)).generate.remote(job)
        → ("log", "step 3/23") … ("images", [PIL images])   |   ("cancelled", why)   |   ("error", what)

- **Batching**: `generate` hands its job to `_batched`, a `@serve.batch` method
  (https://docs.ray.io/en/latest/serve/advanced-guides/dyn-req-batch.html) counting images, not requests, up to
  `max_batch_images`; inside a Serve batch, jobs the pipeline can run together (same size, steps, strength,
  guidance, negative prompt or not; no adapters) share one `run_batch` call, the way the single worker's queue
  groups them. The single worker's own batching is off in this mode (the ingress sends jobs one by one).
- **Live logs**: the pipeline's log lines (from its thread) reach `generate` through an asyncio queue and go out
  as they come.
- **Cancel**: the ingress cancels the stream (`DeploymentResponseGenerator.cancel()`); `generate` then sets the
  job's cancel event, and the pipeline stops at its next denoising step (a batch stops when all of its requests
  are cancelled; a cancelled request's images are dropped). A job still waiting for its batch is taken out of it.
- **LoRA-affine routing**: `@serve.multiplexed` on the job's adapter set (`services.worker.serve.adapters`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from ray import serve

from services.worker.config import WorkerConfig
from services.worker.pipelines import load_pipeline
from services.worker.pipelines.base import Cancelled, LoraSpec, PipelineJob, RunContext
from services.worker.serve.adapters import SETS_PER_REPLICA, AdapterSet, adapter_key, read_adapter_set

log = logging.getLogger(__name__)

#: a fal request asks for at most 8 images; a Serve batch must hold at least one whole request
MAX_IMAGES_PER_REQUEST = 8


@dataclass
class _Item:
    """One job waiting for (or in) a Serve batch, with the way back to its `generate` call."""

    job: PipelineJob
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def log(self, line: str) -> None:
        """Called from the pipeline's thread."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, line)


@dataclass(frozen=True)
class _Outcome:
    images: list[Image.Image] | None = None
    cancelled: str | None = None
    error: str | None = None


def _images_in(items: list[_Item]) -> int:
    return sum(item.job.num_images for item in items)


def _chunks(groups: Iterable[list[int]], items: list[_Item], max_images: int) -> Iterator[list[int]]:
    """Each group cut into pipeline calls of at most `max_images` images (MAX_BATCH_IMAGES: what fits the GPU),
    in order; a request is never split, and one larger than the limit runs alone."""
    for group in groups:
        chunk: list[int] = []
        images = 0
        for index in group:
            n = items[index].job.num_images
            if chunk and images + n > max_images:
                yield chunk
                chunk, images = [], 0
            chunk.append(index)
            images += n
        if chunk:
            yield chunk


def _group_key(job: PipelineJob, index: int) -> tuple[object, ...]:
    """Jobs with equal keys can share one pipeline batch (as `services.worker.inputs.request_batch_key`)."""
    if job.loras or job.embeddings:
        return ("alone", index)
    return (job.image.size, job.steps, round(job.strength, 6), round(job.guidance_scale, 6),
            bool(job.negative_prompt))


@serve.deployment(name="InpaintModel", max_ongoing_requests=32, graceful_shutdown_timeout_s=30)
class InpaintModel:
    """The pipeline on one replica (`num_gpus`/`num_cpus`, replicas and autoscaling come from the Serve config)."""

    def __init__(self, config: WorkerConfig, batch_wait_s: float = 0.05) -> None:
        self.config = config
        self.pipeline = load_pipeline(config)
        if config.warmup:
            self.pipeline.warmup()
        self.max_batch_images = max(config.max_batch_images, MAX_IMAGES_PER_REQUEST)
        batched: Any = self._batched  # Serve's batch wrapper, with its setters
        batched.set_max_batch_size(self.max_batch_images)
        batched.set_batch_wait_timeout_s(batch_wait_s if self.pipeline.batches else 0.0)
        #: the LoRA files of each adapter set being asked for, with how many requests are asking (Serve calls
        #: `adapter_set` with the key alone; a set evicted meanwhile may be read again for a later asker)
        self._sets_wanted: dict[str, tuple[tuple[LoraSpec, ...], int]] = {}
        self.replica = serve.get_replica_context().replica_id.unique_id
        log.info("model replica %s ready: pipeline %s on %s", self.replica, self.pipeline.name, self.pipeline.device)

    def info(self) -> dict[str, Any]:
        """What the ingress reports in /health."""
        return {"name": self.pipeline.name, "device": self.pipeline.device, "model": self.pipeline.model,
                "batches": self.pipeline.batches, "max_batch_images": self.max_batch_images,
                "recompiles": getattr(getattr(self.pipeline, "fast", None), "recompiles", 0)}

    @serve.multiplexed(max_num_models_per_replica=SETS_PER_REPLICA)  # type: ignore[untyped-decorator]
    async def adapter_set(self, key: str) -> AdapterSet:
        """Read an adapter set's files once; Serve keeps the last `SETS_PER_REPLICA` sets of this replica."""
        loras, _ = self._sets_wanted[key]
        return await asyncio.to_thread(read_adapter_set, key, loras)

    async def generate(self, job: PipelineJob) -> AsyncIterator[tuple[str, Any]]:
        """Run one job (in a Serve batch), streaming its log lines, then its images; or why it didn't finish."""
        yield "log", f"on model replica {self.replica}"
        if job.loras:
            key = serve.get_multiplexed_model_id() or adapter_key(job)
            _, asking = self._sets_wanted.get(key, (job.loras, 0))
            self._sets_wanted[key] = (job.loras, asking + 1)
            try:
                job = (await self.adapter_set(key)).apply(job)
            finally:
                loras, asking = self._sets_wanted[key]
                if asking > 1:
                    self._sets_wanted[key] = (loras, asking - 1)
                else:
                    del self._sets_wanted[key]
        item = _Item(job, asyncio.get_running_loop())
        run = asyncio.ensure_future(self._batched(item))
        try:
            while not run.done():
                getter = asyncio.ensure_future(item.events.get())
                done, _ = await asyncio.wait({getter, run}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield "log", getter.result()
                else:
                    getter.cancel()
            while not item.events.empty():
                yield "log", item.events.get_nowait()
            outcome: _Outcome = run.result()
        finally:
            if not run.done():  # the caller cancelled the stream (or went away): stop at the next step
                item.cancel.set()
                run.cancel()
        if outcome.images is not None:
            yield "images", outcome.images
        elif outcome.cancelled is not None:
            yield "cancelled", outcome.cancelled
        else:
            yield "error", outcome.error or "the pipeline returned nothing"

    @serve.batch(max_batch_size=MAX_IMAGES_PER_REQUEST, batch_wait_timeout_s=0.05, batch_size_fn=_images_in)
    async def _batched(self, items: list[_Item]) -> list[_Outcome]:
        """A Serve batch: its compatible jobs share one pipeline call, each group in turn (in a thread)."""
        groups: dict[tuple[object, ...], list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault(_group_key(item.job, index), []).append(index)
        outcomes: list[_Outcome] = [_Outcome(error="not run")] * len(items)
        for indices in _chunks(groups.values(), items, self.config.max_batch_images):
            live = [i for i in indices if not items[i].cancel.is_set()]
            for i in set(indices) - set(live):
                outcomes[i] = _Outcome(cancelled="cancelled before inference")
            if not live:
                continue
            if len(live) > 1:
                for i in live:
                    items[i].log(f"sharing a batch with {len(live) - 1} other request(s)")
            ctxs = [RunContext(log=items[i].log, cancel_event=items[i].cancel) for i in live]
            try:
                results = await asyncio.to_thread(self.pipeline.run_batch, [items[i].job for i in live], ctxs)
            except Cancelled:
                for i in live:
                    outcomes[i] = _Outcome(cancelled="cancelled between denoising steps")
                continue
            except Exception as exc:
                log.exception("a batch of %d request(s) failed on replica %s", len(live), self.replica)
                for i in live:
                    outcomes[i] = _Outcome(error=f"{type(exc).__name__}: {exc}")
                continue
            for i, images in zip(live, results, strict=True):
                cancelled = items[i].cancel.is_set()
                outcomes[i] = _Outcome(cancelled="cancelled: its images are discarded") if cancelled else \
                    _Outcome(images=images)
        return outcomes
