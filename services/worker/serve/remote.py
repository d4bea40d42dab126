"""The ingress's pipeline: the model deployment's replicas, reached through a Ray Serve deployment handle.

To the worker's request queue (`services.worker.queue`) this is a pipeline like any other, except that it runs
its work elsewhere: the queue awaits `run_batch_async` and keeps `concurrent_batches` requests in flight at once
(the replicas and Serve's batching decide what runs together). Each request goes to the model deployment as a
stream (`services.worker.serve.model.InpaintModel.generate`), with its adapter set as the multiplexed model id:

- its log lines reach the request's record as they come (so `?logs=1` and the SSE stream work as in one process);
- a cancel (the request's `cancel_event`, set by `PUT …/cancel`) cancels the stream, whichever replica runs it;
- a replica that dies (or is unreachable) mid-request: the job is sent again, to a replica Serve still has, up to
  `attempts` times; then the request fails with a message saying so;
- no replica takes the job within `replica_wait_s` (the deployment has none running: Serve's router would hold
  the call until one appears): the request fails saying so. Nothing waits forever: the stream ends with images, a
  cancellation, an error, Ray's error for the lost replica, or that deadline;
- `ready` (what the ingress's `/health` reports) says whether a model replica answered lately (`watch_replicas`),
  so a backend pool sends its jobs elsewhere while the model deployment has no replica.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

from PIL import Image
from ray import exceptions as ray_exceptions
from ray.serve import exceptions as serve_exceptions
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from services.worker.pipelines.base import Cancelled, PipelineJob, RunContext
from services.worker.serve.adapters import adapter_key

log = logging.getLogger(__name__)

#: how often a running request's cancel flag is looked at (the flag is a threading.Event, set by the handler)
CANCEL_POLL_S = 0.1

#: how often the model deployment is asked whether a replica answers, and how long an answer may take
WATCH_EVERY_S = 5.0
WATCH_TIMEOUT_S = 5.0

#: what Ray raises when the replica running a request died or can't be reached
REPLICA_LOST: tuple[type[BaseException], ...] = (
    ray_exceptions.RayActorError, ray_exceptions.ActorUnavailableError, serve_exceptions.ReplicaUnavailableError,
)


class ReplicaLost(RuntimeError):
    """Every attempt at a request lost its model replica."""


class NoReplica(RuntimeError):
    """No model replica took a request in time."""


class RemotePipeline:
    """A `Pipeline` whose `run_batch_async` sends each job to the model deployment."""

    batches = False  # the queue sends jobs one by one; Serve's `@serve.batch` groups them on the replicas

    def __init__(self, handle: DeploymentHandle[Any], info: Mapping[str, Any], *, concurrent_batches: int,
                 attempts: int = 3, replica_wait_s: float = 300.0) -> None:
        """`info`: the model deployment's `info()` (its pipeline's name, device, model)."""
        self.handle = handle
        self.name = str(info.get("name", "unknown"))
        self.device = str(info.get("device", "unknown"))
        self.model = str(info.get("model", ""))
        self.recompiles = int(info.get("recompiles", 0))
        self.concurrent_batches = concurrent_batches
        self.attempts = attempts
        self.replica_wait_s = replica_wait_s
        self.ready = True

    async def watch_replicas(self) -> None:
        """Keep `ready` up to date: whether a model replica answers `info` within `WATCH_TIMEOUT_S` (forever)."""
        while True:
            response = self.handle.info.remote()
            try:
                async with asyncio.timeout(WATCH_TIMEOUT_S):
                    await response
                ready = True
            except Exception as exc:
                response.cancel()  # type: ignore[no-untyped-call]
                ready = False
                if self.ready:
                    log.warning("no model replica answers (%s): /health says not ready", type(exc).__name__)
            if ready and not self.ready:
                log.info("a model replica answers again: /health says ready")
            self.ready = ready
            await asyncio.sleep(WATCH_EVERY_S)

    @functools.cached_property
    def local_device(self) -> str:
        """Where the ingress runs its own models (safety checker, prompt expander): its device, not the
        replicas'."""
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def warmup(self) -> None:
        """Nothing: each model replica warms itself up before Serve routes to it."""

    def run(self, job: PipelineJob, ctx: RunContext) -> list[Image.Image]:
        raise NotImplementedError("the Ray Serve ingress runs jobs through run_batch_async")

    def run_batch(self, jobs: list[PipelineJob], ctxs: list[RunContext]) -> list[list[Image.Image]]:
        raise NotImplementedError("the Ray Serve ingress runs jobs through run_batch_async")

    async def run_batch_async(self, jobs: list[PipelineJob], ctxs: list[RunContext]) -> list[list[Image.Image]]:
        """Each job on a model replica; raises `Cancelled` when every one of them was cancelled (as a pipeline
        does), and a request error when one failed (the queue fails the whole call's requests: it sends one)."""
        results = await asyncio.gather(*(self.run_one(job, ctx) for job, ctx in zip(jobs, ctxs, strict=True)))
        return list(results)

    async def run_one(self, job: PipelineJob, ctx: RunContext) -> list[Image.Image]:
        # only LoRA sets are multiplexed ids: an id no replica holds would steer plain requests away from the
        # replicas holding sets (Serve's router prefers the replicas with the fewest models for an unknown id)
        options: dict[str, Any] = {"stream": True}
        if job.loras:
            options["multiplexed_model_id"] = adapter_key(job)
        for attempt in range(1, self.attempts + 1):
            stream = cast(DeploymentResponseGenerator[tuple[str, Any]],
                          self.handle.options(**options).generate.remote(job))
            watcher = asyncio.create_task(_cancel_when_asked(ctx, stream))
            finished = False
            try:
                async for kind, payload in _first_within(stream, self.replica_wait_s):
                    finished = kind != "log"
                    if kind == "log":
                        ctx.log(str(payload))
                    elif kind == "images":
                        return list(payload)
                    elif kind == "cancelled":
                        raise Cancelled(str(payload))
                    else:
                        raise RuntimeError(f"the model replica failed: {payload}")
                raise RuntimeError("the model replica's stream ended without a result")
            except serve_exceptions.RequestCancelledError as exc:
                raise Cancelled("cancelled") from exc
            except REPLICA_LOST as exc:
                if ctx.cancel_event.is_set():
                    raise Cancelled("cancelled") from exc
                log.warning("a model replica was lost mid-request (attempt %d of %d): %s", attempt, self.attempts,
                            type(exc).__name__)
                if attempt == self.attempts:
                    raise ReplicaLost(f"the model replica running this request stopped, {self.attempts} times; "
                                      "the cluster may be short of healthy replicas") from exc
                ctx.log(f"the model replica running this request stopped; trying again "
                        f"(attempt {attempt + 1} of {self.attempts})")
            finally:
                watcher.cancel()
                if not finished:  # cancelled here (the ingress stopping), or failed: stop the replica's work too
                    stream.cancel()  # type: ignore[no-untyped-call]
        raise AssertionError("unreachable")


async def _first_within(stream: DeploymentResponseGenerator[tuple[str, Any]],
                        wait_s: float) -> AsyncIterator[tuple[str, Any]]:
    """The stream's items; the first must come within `wait_s` (a replica yields one as soon as it takes the job),
    else `NoReplica`."""
    iterator = stream.__aiter__()
    try:
        async with asyncio.timeout(wait_s):
            first = await anext(iterator)
    except StopAsyncIteration:
        return
    except TimeoutError as exc:
        raise NoReplica(f"no model replica took this request within {wait_s:g} s: the model deployment has no "
                        "running replica (see the cluster's Serve status)") from exc
    yield first
    async for item in iterator:
        yield item


async def _cancel_when_asked(ctx: RunContext, stream: DeploymentResponseGenerator[Any]) -> None:
    """Cancel the stream (wherever it runs) once the request's cancel flag is set."""
    # a threading.Event (set from handlers and pipeline threads alike): polled, not waited on in a thread, so
    # requests in flight hold no thread each
    while not ctx.cancel_event.is_set():  # noqa: ASYNC110
        await asyncio.sleep(CANCEL_POLL_S)
    stream.cancel()  # type: ignore[no-untyped-call]
