"""The worker's HTTP app: fal's queue protocol (https://docs.fal.ai/model-apis/model-endpoints/queue) on Starlette.

It serves two fal apps (`{app id}` below), through the same routes and the same protocol:

- `fal-ai/fast-sdxl/inpainting`: inpainting with the configured pipeline (`InpaintInput` → `InpaintOutput`);
- `fal-ai/imageutils/nsfw`: fal's NSFW estimator, answered by the safety checker (`NsfwCheckInput` →
  `NsfwCheckOutput`; `services.worker.checks`). Without a checker its submit is refused (422 naming
  SAFETY_CHECKER_PATH).

Routes (each with or without a trailing slash; `{app}` is the app id's `owner/alias` — `fal-ai/fast-sdxl`,
`fal-ai/imageutils` — and the full app id is accepted before `/requests/` too; a request is found only under its
own app):

    POST /{app id}                                     submit → 200 {request_id, *_url, status, queue_position};
                                                       with `Idempotency-Key`, a known key's request instead
    GET  /{app}/requests/{id}/status?logs=1           202 while queued/running, 200 when completed
    GET  /{app}/requests/{id}/status/stream?logs=1    SSE: status events with new logs, ": ping", closes at the end
    GET  /{app}/requests/{id}                          the output (200), the stored error, or 202 + status
    PUT  /{app}/requests/{id}/cancel                   OK 200 | CANCELLATION_REQUESTED 202 | ALREADY_COMPLETED 400
                                                       | NOT_FOUND 404
    POST /sync/{app id}                                synchronous: waits and returns the output
    GET  /files/{id}/{name}                            result images (when sync_mode is false), from disk
    GET  /health                                       readiness, pipeline, model, device, queue length, which
                                                       optional models are loaded (safety checker, prompt expander)

The handlers are plain functions of the request. What they share — the configuration and the request queue — is
the app's lifespan state (`WorkerState`): the lifespan loads the pipeline, starts the queue and yields the state, and
Starlette hands every request a copy as `request.state`. Nothing is served before the lifespan has yielded, so every
handler sees a loaded pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypedDict

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from services.schema import INPAINT_APP_ID, NSFW_APP_ID, CancelOutcome, InpaintInput, NsfwCheckInput
from services.worker.config import WorkerConfig
from services.worker.cost import check_cost
from services.worker.expander import PromptExpander, load_prompt_expander
from services.worker.idempotency import HEADER as IDEMPOTENCY_HEADER
from services.worker.idempotency import IdempotencyScope, caller_of, parse_key
from services.worker.inputs import RequestError, check_request
from services.worker.pipelines import load_pipeline
from services.worker.pipelines.base import Pipeline
from services.worker.protocol import (
    REQUEST_ID_HEADER,
    FalProtocolMiddleware,
    json_response,
    request_urls,
    result_response,
    status_body,
    validation_detail,
)
from services.worker.queue import QueueFull, RequestQueue
from services.worker.records import RequestRecord
from services.worker.request_body import BodyError, max_body_bytes, read_json_body
from services.worker.safety import SafetyChecker, load_safety_checker

log = logging.getLogger(__name__)

#: submit bodies larger than this (data URIs) are read a few at a time (`_body_slot`); smaller ones at once
LARGE_BODY_BYTES = 1024 * 1024
LARGE_BODIES_AT_ONCE = 2
#: the longest a submit body may take to arrive (it holds a slot meanwhile): a client that stops sending is answered
#: 408 and frees its slot (enough for the largest body at about 1 MB/s)
BODY_READ_S = 60.0
#: how long a large submit waits for its turn before it is answered 503 (Retry-After)
BODY_SLOT_WAIT_S = 30.0

#: how long a client refused with 503 (a full queue) is asked to wait before trying again, in seconds
RETRY_AFTER_S = 5

_CANCEL_STATUS: dict[CancelOutcome, int] = {"OK": 200, "CANCELLATION_REQUESTED": 202, "ALREADY_COMPLETED": 400,
                                           "NOT_FOUND": 404}


class WorkerState(TypedDict):
    """The lifespan state every handler reads from `request.state`."""

    config: WorkerConfig
    queue: RequestQueue
    large_bodies: asyncio.Semaphore  # submits with a large body read at once (`_body_slot`)


def create_app(config: WorkerConfig, *, pipeline: Pipeline | None = None, safety: SafetyChecker | None = None,
               expander: PromptExpander | None = None) -> Starlette:
    """The worker app. Without `pipeline`, the one the configuration chooses is loaded (and warmed up) at startup;
    without `safety`, the checker at SAFETY_CHECKER_PATH is, when that is set; without `expander`, the prompt
    expander at PROMPT_EXPANDER_PATH is, when that is set."""
    key = config.worker_key.get_secret_value() if config.worker_key else None
    return Starlette(routes=_ROUTES, middleware=[Middleware(FalProtocolMiddleware, key=key)],
                     lifespan=functools.partial(lifespan, config=config, pipeline=pipeline, safety=safety,
                                                expander=expander))


@contextlib.asynccontextmanager
async def lifespan(app: Starlette, *, config: WorkerConfig, pipeline: Pipeline | None, safety: SafetyChecker | None,
                   expander: PromptExpander | None) -> AsyncIterator[WorkerState]:
    """Load the models, then run the queue (its runner and reaper) for as long as the app serves."""
    models = await load_models(config, pipeline, safety, expander)
    queue = RequestQueue(config, models.pipeline, models.safety, models.expander)
    async with queue.background_tasks():
        yield {"config": config, "queue": queue, "large_bodies": asyncio.Semaphore(LARGE_BODIES_AT_ONCE)}


@dataclasses.dataclass(frozen=True)
class Models:
    """What the worker runs requests with: the pipeline, and the optional safety checker and prompt expander."""

    pipeline: Pipeline
    safety: SafetyChecker | None
    expander: PromptExpander | None


async def load_models(config: WorkerConfig, pipeline: Pipeline | None, safety: SafetyChecker | None,
                      expander: PromptExpander | None = None) -> Models:
    """The models given, or those the configuration names, loaded (on the pipeline's device) and warmed up in
    threads."""
    loaded = pipeline if pipeline is not None else await asyncio.to_thread(load_pipeline, config)
    # the checker and expander run in this process: on the pipeline's device, or, for a pipeline that runs
    # elsewhere (Ray Serve's model replicas), on the device this process has (`local_device`)
    device = str(getattr(loaded, "local_device", loaded.device))
    if safety is None and config.safety_checker_path is not None:
        safety = await asyncio.to_thread(load_safety_checker, config.safety_checker_path, device,
                                         None if config.dtype == "auto" else config.dtype)
    if expander is None and config.prompt_expander_path is not None:
        expander = await asyncio.to_thread(load_prompt_expander, config.prompt_expander_path, device)
    if config.warmup:
        await asyncio.to_thread(loaded.warmup)
    log.info("worker ready: pipeline %s, model %s, device %s, safety checker %s, prompt expander %s", loaded.name,
             loaded.model, loaded.device, "on" if safety else "off", "on" if expander else "off")
    return Models(loaded, safety, expander)


# --- handlers -------------------------------------------------------------------------------------------

async def submit(request: Request[WorkerState]) -> Response:
    """Queue a request; the handle answers with its status (IN_QUEUE, unless an `Idempotency-Key` named a
    request that has moved on since)."""
    async with _body_slot(request) as refused:
        record = refused or await _accept(request)
    if isinstance(record, Response):
        return record
    queue = request.state["queue"]
    log.info("queued %s for %s (queue length %d)", record.id, record.app_id, queue.queue_length)
    handle: dict[str, Any] = {**request_urls(record), "status": record.state}
    if record.state == "IN_QUEUE":
        handle["queue_position"] = queue.position(record)
    return json_response(handle, 200, record.id)


async def status(request: Request[WorkerState]) -> Response:
    record = _record_or_404(request)
    if isinstance(record, Response):
        return record
    logs = list(record.logs) if _wants_logs(request) else None
    return json_response(status_body(record, request.state["queue"], logs),
                         200 if record.state == "COMPLETED" else 202, record.id)


async def stream(request: Request[WorkerState]) -> Response:
    record = _record_or_404(request)
    if isinstance(record, Response):
        return record
    events = _status_events(record, request.state["queue"], with_logs=_wants_logs(request),
                            ping_s=request.state["config"].sse_ping_s)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={REQUEST_ID_HEADER: record.id, "Cache-Control": "no-cache"})


async def _status_events(record: RequestRecord, queue: RequestQueue, *, with_logs: bool,
                         ping_s: float) -> AsyncIterator[str]:
    """A status event whenever the status changes or new log lines arrive (each line sent once), `: ping` after
    `ping_s` seconds of nothing; the last event is the completed status."""
    sent_logs = 0
    last: str | None = None
    while True:
        logs = record.logs[sent_logs:] if with_logs else None
        text = json.dumps(status_body(record, queue, logs))
        if text != last or logs:
            yield f"data: {text}\n\n"
            last = text
            sent_logs += len(logs or [])
        if record.state == "COMPLETED":
            return
        if not await record.wait_changed(ping_s):
            yield ": ping\n\n"


async def result(request: Request[WorkerState]) -> Response:
    record = _record_or_404(request)
    if isinstance(record, Response):
        return record
    return result_response(record, request.state["queue"])


async def cancel(request: Request[WorkerState]) -> Response:
    rid = request.path_params["rid"]
    queue = request.state["queue"]
    record = queue.get(rid)
    outcome: CancelOutcome = queue.cancel(rid) if record and _under_its_app(request, record) else "NOT_FOUND"
    return json_response({"status": outcome}, _CANCEL_STATUS[outcome], rid)


async def sync_run(request: Request[WorkerState]) -> Response:
    async with _body_slot(request) as refused:
        record = refused or await _accept(request)
    if isinstance(record, Response):
        return record
    queue = request.state["queue"]
    while record.state != "COMPLETED":
        if not await record.wait_changed(0.5) and await request.is_disconnected():
            queue.cancel(record.id)  # the caller hung up: nobody wants this result
            return json_response({"detail": "client disconnected"}, 499, record.id)
    return result_response(record, queue)


async def files(request: Request[WorkerState]) -> Response:
    """A result image, streamed from the worker's storage."""
    record = request.state["queue"].get(request.path_params["rid"])
    item = record.files.get(request.path_params["name"]) if record else None
    if item is None:
        return json_response({"detail": "file not found (results are kept for a limited time)"}, 404)
    path, content_type = item
    return FileResponse(path, media_type=content_type, headers={"Cache-Control": "private, max-age=3600"})


async def health(request: Request[WorkerState]) -> Response:
    """Ready once the lifespan has loaded and warmed up the pipeline (nothing is served before); under Ray Serve,
    while a model replica answers (`ready: false` and 503 otherwise). Also what
    the worker can do (safety checker, prompt expansion, Idempotency-Key) and how many times the compiled UNet
    compiled after its warm-up (`recompiles`: 0 unless a shape outside the warmed grid slipped through)."""
    queue = request.state["queue"]
    pipeline = queue.pipeline
    # a pipeline elsewhere (Ray Serve's model replicas) may have none running: then not ready (503), so a backend
    # pool sends its jobs to its next backend
    ready = bool(getattr(pipeline, "ready", True))
    return json_response({"ready": ready, "pipeline": pipeline.name, "model": pipeline.model,
                          "device": pipeline.device, "queue_length": queue.queue_length,
                          "safety_checker": queue.safety is not None, "expand_prompt": queue.expander is not None,
                          "recompiles": getattr(getattr(pipeline, "fast", None), "recompiles", 0),
                          # a repeated submit's Idempotency-Key is answered with the request it made (the bot relies
                          # on this to send a submit again after a crash without running it twice)
                          "idempotency_keys": True},
                         200 if ready else 503)


# --- helpers --------------------------------------------------------------------------------------------

async def _submit_inpaint(request: Request[WorkerState], body: Any) -> RequestRecord:
    """Validate an inpainting request, refuse what this worker can't serve (or what would cost it too much), and
    queue it; or, for a known `Idempotency-Key`, the request made with it."""
    scope = _idempotency(request, INPAINT_APP_ID)
    inp = InpaintInput.model_validate(body)
    config, queue = request.state["config"], request.state["queue"]
    check_request(inp, config, safety_available=queue.safety is not None,
                  expander_available=queue.expander is not None)
    check_cost(inp, queue.pipeline, config.max_request_cost)
    return await queue.submit(inp, _base_url(request), scope)


async def _submit_check(request: Request[WorkerState], body: Any) -> RequestRecord:
    """Validate an NSFW check and start it; refused when this worker has no safety checker to answer it with."""
    scope = _idempotency(request, NSFW_APP_ID)
    inp = NsfwCheckInput.model_validate(body)
    queue = request.state["queue"]
    if queue.safety is None:
        raise RequestError("", f"{NSFW_APP_ID} needs a safety checker and this worker has none configured "
                           "(set SAFETY_CHECKER_PATH)")
    return await queue.submit_check(inp, _base_url(request), scope)


def _idempotency(request: Request[WorkerState], app_id: str) -> IdempotencyScope | None:
    """The request's `Idempotency-Key`, filed under its caller and app; None without one (422 when malformed)."""
    key = parse_key(request.headers.get(IDEMPOTENCY_HEADER))
    if key is None:
        return None
    return IdempotencyScope(caller_of(request.headers.get("authorization")), app_id, key)


#: the apps this worker serves: app id → how a submitted body becomes a queued request (raising pydantic's
#: `ValidationError` or `RequestError` for a 422, `QueueFull` for a 503)
_APPS: dict[str, Callable[[Request[WorkerState], Any], Awaitable[RequestRecord]]] = {
    INPAINT_APP_ID: _submit_inpaint, NSFW_APP_ID: _submit_check}


async def _accept(request: Request[WorkerState]) -> RequestRecord | Response:
    """Check the app id, validate the body and queue it; or the error response to send instead."""
    p = request.path_params
    submit_to = _APPS.get(f"{p['owner']}/{p['alias']}/{p['sub']}")
    if submit_to is None:
        return json_response({"detail": f"unknown app; this worker serves {' and '.join(_APPS)}"}, 404)
    try:
        async with asyncio.timeout(BODY_READ_S):
            body = await read_json_body(request, max_bytes=max_body_bytes(request.state["config"].max_image_bytes))
    except BodyError as exc:
        return json_response({"detail": exc.detail}, 422)
    except TimeoutError:
        return json_response({"detail": f"the request body didn't arrive within {BODY_READ_S:g} s"}, 408)
    try:
        return await submit_to(request, body)
    except ValidationError as exc:
        return json_response({"detail": validation_detail(exc)}, 422)
    except RequestError as exc:
        return json_response({"detail": exc.detail}, 422)
    except QueueFull as exc:
        return json_response({"detail": str(exc), "error_type": "queue_full"}, 503,
                             headers={"Retry-After": str(RETRY_AFTER_S)})


@contextlib.asynccontextmanager
async def _body_slot(request: Request[WorkerState]) -> AsyncIterator[Response | None]:
    """Hold one of the `LARGE_BODIES_AT_ONCE` slots while a large submit body (over `LARGE_BODY_BYTES`, or of
    unknown length) is read, parsed and queued: each holds its data URIs two or three times over meanwhile, so
    without a bound, many uploads at once would take memory without limit. Small bodies (URLs) never wait. A body
    waiting for its slot is not read yet (the client's upload waits in the network buffers). Yields None, or the
    503 to answer when no slot came free within `BODY_SLOT_WAIT_S`."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) <= LARGE_BODY_BYTES:
        yield None
        return
    slots = request.state["large_bodies"]
    try:
        await asyncio.wait_for(slots.acquire(), BODY_SLOT_WAIT_S)
    except TimeoutError:
        yield json_response({"detail": "the worker is busy receiving other uploads; try again shortly",
                             "error_type": "queue_full"}, 503, headers={"Retry-After": str(RETRY_AFTER_S)})
        return
    try:
        yield None
    finally:
        slots.release()


def _record_or_404(request: Request[WorkerState]) -> RequestRecord | Response:
    """The request the path names, if it exists under the app the path names."""
    rid = request.path_params["rid"]
    record = request.state["queue"].get(rid)
    if record is None or not _under_its_app(request, record):
        return json_response({"detail": f"Request {rid} not found"}, 404, rid)
    return record


def _under_its_app(request: Request[WorkerState], record: RequestRecord) -> bool:
    """Whether the path's `{owner}/{alias}` (and `{sub}`, in the full-id form) are the record's app's."""
    p = request.path_params
    if f"{p['owner']}/{p['alias']}" != record.url_prefix:
        return False
    return "sub" not in p or f"{p['owner']}/{p['alias']}/{p['sub']}" == record.app_id


def _base_url(request: Request[WorkerState]) -> str:
    return (request.state["config"].public_url or str(request.base_url)).rstrip("/")


def _wants_logs(request: Request[WorkerState]) -> bool:
    return request.query_params.get("logs", "0").strip().lower() in ("1", "true", "yes")


def _routes() -> list[BaseRoute]:
    """Every route; those under `/requests/` for both forms of the app id (`{owner}/{alias}` and the full id)."""
    app_routes: list[BaseRoute] = []
    for prefix in ("/{owner}/{alias}", "/{owner}/{alias}/{sub}"):
        app_routes += [
            Route(prefix + "/requests/{rid}/status/stream", stream, methods=["GET"]),
            Route(prefix + "/requests/{rid}/status", status, methods=["GET"]),
            Route(prefix + "/requests/{rid}/cancel", cancel, methods=["PUT"]),
            Route(prefix + "/requests/{rid}", result, methods=["GET"]),
        ]
    return [
        Route("/health", health, methods=["GET"]),
        Route("/files/{rid}/{name}", files, methods=["GET"]),
        Route("/sync/{owner}/{alias}/{sub}", sync_run, methods=["POST"]),
        *app_routes,
        Route("/{owner}/{alias}/{sub}", submit, methods=["POST"]),
    ]


_ROUTES = _routes()
