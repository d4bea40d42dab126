"""The ingress's pipeline: the model deployment's replicas, reached through a Ray Serve deployment handle.

To the worker's request queue (`services.worker.queue`) this is a pipeline like any other, except that it runs
its work elsewhere: the queue awaits `run_batch_async` and keeps `concurrent_batches` requests in flight at once
(the replicas and Serve's batching decide what runs together). Each request goes to the model deployment as a
stream (`services.worker.serve.model.InpaintModel.generate`), with its adapter set as the multiplexed model id:

- its log lines reach the request's record as they come (so `?logs=1` and the SSE stream work as in one process);
- a cancel (the request's `cancel_event`, set by `PUT …/cancel`) cancels the stream, whichever replica runs it;
- a replica that dies (or is unreachable) mid-request: the job is sent again, to a replica Serve still has, up to
  `attempts` times; then the request fails with a message saying so. Nothing waits forever: the stream ends with
  images, a cancellation, an error, or Ray's error for the lost replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
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

#: what Ray raises when the replica running a request died or can't be reached
REPLICA_LOST: tuple[type[BaseException], ...] = (
    ray_exceptions.RayActorError, ray_exceptions.ActorUnavailableError, serve_exceptions.ReplicaUnavailableError,
)


class ReplicaLost(RuntimeError):
    """Every attempt at a request lost its model replica."""


class RemotePipeline:
    """A `Pipeline` whose `run_batch_async` sends each job to the model deployment."""

    batches = False  # the queue sends jobs one by one; Serve's `@serve.batch` groups them on the replicas

    def __init__(self, handle: DeploymentHandle[Any], info: Mapping[str, Any], *, concurrent_batches: int,
                 attempts: int = 3) -> None:
        """`info`: the model deployment's `info()` (its pipeline's name, device, model)."""
        self.handle = handle
        self.name = str(info.get("name", "unknown"))
        self.device = str(info.get("device", "unknown"))
        self.model = str(info.get("model", ""))
        self.recompiles = int(info.get("recompiles", 0))
        self.concurrent_batches = concurrent_batches
        self.attempts = attempts

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
        for attempt in range(1, self.attempts + 1):
            stream = cast(DeploymentResponseGenerator[tuple[str, Any]], self.handle.options(
                stream=True, multiplexed_model_id=adapter_key(job)).generate.remote(job))
            watcher = asyncio.create_task(_cancel_when_asked(ctx, stream))
            try:
                async for kind, payload in stream:
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
        raise AssertionError("unreachable")


async def _cancel_when_asked(ctx: RunContext, stream: DeploymentResponseGenerator[Any]) -> None:
    """Cancel the stream (wherever it runs) once the request's cancel flag is set."""
    # a threading.Event (set from handlers and pipeline threads alike): polled, not waited on in a thread, so
    # requests in flight hold no thread each
    while not ctx.cancel_event.is_set():  # noqa: ASYNC110
        await asyncio.sleep(CANCEL_POLL_S)
    stream.cancel()  # type: ignore[no-untyped-call]
