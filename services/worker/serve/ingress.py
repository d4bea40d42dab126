"""The ingress deployment: the single worker's Starlette app (`services.worker.app`), unchanged, on Ray Serve.

Every route, response and limit of fal's queue protocol is the single worker's own code: this deployment builds
the same app (`create_app`) around a `RemotePipeline` (the model deployment's replicas) instead of a local one.

**Where request state lives: in this one ingress replica** (`num_replicas: 1`), in the app's `RequestQueue`, not
in a Ray actor. Every protocol call (status polls, the SSE stream, cancel, results, files) reads or changes a
request's record, and a poll is answered from memory in microseconds; behind an actor, each of them would be a Ray
call (milliseconds, and a second process to lose). The ingress does no heavy work (inputs are fetched and decoded
in threads, inference runs on the model replicas), so one replica serves many GPUs' worth of requests; the model
deployment is what scales. Result files are on the ingress's disk, which the `/files/…` route serves. If the
ingress replica dies, Serve starts a new one with an empty queue, the same thing as a single worker restarting:
the bot sees 404s for its requests and sends them again with their Idempotency-Keys (services/dispatch.py).

Starlette's lifespan state (`request.state`) is carried by the ASGI server; Serve runs the lifespan through
uvicorn's `LifespanOn` but does not copy its state into each request's scope, so `_LifespanState` does.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Receive, Scope, Send

from services.worker.app import create_app
from services.worker.config import WorkerConfig
from services.worker.serve.remote import RemotePipeline

log = logging.getLogger(__name__)


class _LifespanState:
    """Give each HTTP request a copy of the lifespan's state, as uvicorn does for a server of its own."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.state: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            scope = {**scope, "state": self.state}
        elif scope["type"] in ("http", "websocket"):
            scope = {**scope, "state": dict(self.state)}
        await self.app(scope, receive, send)


@serve.deployment(name="WorkerIngress", num_replicas=1, max_ongoing_requests=1000, max_queued_requests=-1,
                  graceful_shutdown_timeout_s=30)
@serve.ingress()
class WorkerIngress:
    """fal's queue protocol for the model deployment (state in this single replica: see the module docstring)."""

    async def __init__(self, model: DeploymentHandle[Any], config: WorkerConfig, in_flight: int,  # type: ignore[misc]
                       attempts: int, replica_wait_s: float) -> None:
        """`in_flight`: requests sent to the model replicas at once (enough to fill their batches); `attempts`:
        sends of a request whose replica died."""
        info: dict[str, Any] = await model.info.remote()
        pipeline = RemotePipeline(model, info, concurrent_batches=in_flight, attempts=attempts,
                                  replica_wait_s=replica_wait_s)
        self._watcher = asyncio.create_task(pipeline.watch_replicas(), name="model-replicas-watch")
        # the lifespan loads the safety checker and prompt expander, as for one process (on `local_device`: give
        # the ingress a GPU share in the Serve config for them)
        self._protocol_app = _LifespanState(create_app(config, pipeline=pipeline))
        log.info("ingress ready: %s on %s, %d requests in flight at most", pipeline.name, pipeline.device, in_flight)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return self._protocol_app

