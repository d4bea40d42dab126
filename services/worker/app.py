"""The worker's HTTP app: fal's queue protocol (`spec/fal-protocol.md` §1, §5) on Starlette.

Routes (each with or without a trailing slash; `{app}` is `fal-ai/fast-sdxl`, and the full id
`fal-ai/fast-sdxl/inpainting` is accepted before `/requests/` too):

    POST /fal-ai/fast-sdxl/inpainting                 submit → 200 {request_id, *_url, status, queue_position}
    GET  /{app}/requests/{id}/status?logs=1           202 while queued/running, 200 when completed
    GET  /{app}/requests/{id}/status/stream?logs=1    SSE: status events with new logs, ": ping", closes at the end
    GET  /{app}/requests/{id}                          the output (200), the stored error, or 202 + status
    PUT  /{app}/requests/{id}/cancel                   OK 200 | CANCELLATION_REQUESTED 202 | ALREADY_COMPLETED 400
                                                       | NOT_FOUND 404
    POST /sync/fal-ai/fast-sdxl/inpainting            synchronous: waits and returns the output
    GET  /files/{id}/{name}                            result images (when sync_mode is false)
    GET  /health                                       readiness, pipeline, model, device, queue length
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import httpx
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from services.schema import INPAINT_APP_ID, InpaintInput
from services.worker.config import WorkerConfig
from services.worker.inputs import RequestError, check_request
from services.worker.jobs import QueueFull, RequestQueue, RequestRecord
from services.worker.pipelines import load_pipeline
from services.worker.pipelines.base import Pipeline

log = logging.getLogger(__name__)

OWNER, ALIAS, SUBPATH = INPAINT_APP_ID.split("/")
_CANCEL_STATUS = {"OK": 200, "CANCELLATION_REQUESTED": 202, "ALREADY_COMPLETED": 400, "NOT_FOUND": 404}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def create_app(settings: WorkerConfig, *, pipeline: Pipeline | None = None,
               safety: Callable[[list[Any]], list[bool]] | None = None) -> Starlette:
    """The worker app. Without `pipeline`, the one the settings choose is loaded (and warmed up) at startup."""
    state: dict[str, Any] = {}

    def queue() -> RequestQueue:
        q: RequestQueue = state["queue"]
        return q

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=10.0)) as http:
            q = RequestQueue(settings, http)
            state["queue"] = q
            tasks = [asyncio.create_task(q.run_forever(), name="worker-runner"),
                     asyncio.create_task(q.reap_forever(), name="worker-reaper")]
            try:
                await _load(q)
                yield
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _load(q: RequestQueue) -> None:
        loaded: Pipeline = pipeline if pipeline is not None else await asyncio.to_thread(load_pipeline, settings)
        q.pipeline = loaded
        q.safety = safety
        if q.safety is None and settings.safety_checker_path is not None:
            from services.worker.safety import load_safety_checker

            q.safety = await asyncio.to_thread(load_safety_checker, settings.safety_checker_path, loaded.device)
        if settings.warmup:
            await asyncio.to_thread(loaded.warmup)
        q.ready.set()
        log.info("worker ready: pipeline %s, model %s, device %s, safety checker %s", loaded.name, loaded.model,
                 loaded.device, "on" if q.safety else "off")

    def base_url(request: Request) -> str:
        return (settings.public_url or str(request.base_url)).rstrip("/")

    def urls(record: RequestRecord) -> dict[str, str]:
        root = f"{record.base_url}/{OWNER}/{ALIAS}/requests/{record.id}"
        return {"request_id": record.id, "response_url": root, "status_url": f"{root}/status",
                "cancel_url": f"{root}/cancel"}

    def status_body(record: RequestRecord, logs: list[dict[str, Any]] | None) -> dict[str, Any]:
        body: dict[str, Any] = {"status": record.state, **urls(record), "logs": logs}
        if record.state == "IN_QUEUE":
            body["queue_position"] = queue().position(record)
        else:
            body["metrics"] = {}
        if record.state == "COMPLETED":
            body["metrics"] = {"inference_time": record.inference_time}
            if record.error:
                body.update(error=record.error, error_type=record.error_type)
        return body

    def record_or_404(request: Request) -> RequestRecord | JSONResponse:
        rid = request.path_params["rid"]
        record = queue().get(rid)
        if record is None:
            return _json({"detail": f"Request {rid} not found"}, 404, rid)
        return record

    async def parse_input(request: Request) -> InpaintInput | JSONResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _json({"detail": [{"loc": ["body"], "msg": "the body is not valid JSON", "type": "json_invalid"}]},
                         422)
        try:
            inp = InpaintInput.model_validate(body)
            check_request(inp, settings, safety_available=_safety_available())
        except ValidationError as exc:
            return _json({"detail": _detail(exc)}, 422)
        except RequestError as exc:
            return _json({"detail": exc.detail}, 422)
        return inp

    def _safety_available() -> bool:
        q = state.get("queue")
        return bool(safety or settings.safety_checker_path or (q is not None and q.safety))

    async def accept(request: Request) -> RequestRecord | JSONResponse:
        """Check the app id, validate the body and queue it; or the error response to send instead."""
        if not _is_inpaint(request):
            return _json({"detail": f"unknown app; this worker serves {INPAINT_APP_ID}"}, 404)
        inp = await parse_input(request)
        if isinstance(inp, Response):
            return inp
        try:
            return queue().submit(inp, base_url(request))
        except QueueFull as exc:
            return _json({"detail": str(exc), "error_type": "queue_full"}, 503)

    async def submit(request: Request) -> Response:
        record = await accept(request)
        if isinstance(record, Response):
            return record
        log.info("queued %s (%d waiting)", record.id, len(queue().pending))
        return _json({**urls(record), "status": "IN_QUEUE", "queue_position": queue().position(record)}, 200,
                     record.id)

    async def status(request: Request) -> Response:
        record = record_or_404(request)
        if isinstance(record, Response):
            return record
        logs = list(record.logs) if _wants_logs(request) else None
        return _json(status_body(record, logs), 200 if record.state == "COMPLETED" else 202, record.id)

    async def stream(request: Request) -> Response:
        record = record_or_404(request)
        if isinstance(record, Response):
            return record
        with_logs = _wants_logs(request)

        async def events() -> AsyncIterator[str]:
            sent_logs = 0
            last: str | None = None
            while True:
                logs = record.logs[sent_logs:] if with_logs else None
                body = status_body(record, logs)
                text = json.dumps(body)
                if text != last or logs:
                    yield f"data: {text}\n\n"
                    last = text
                    sent_logs += len(logs or [])
                if record.state == "COMPLETED":
                    return
                if not await record.wait_changed(settings.sse_ping_s):
                    yield ": ping\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"x-fal-request-id": record.id, "Cache-Control": "no-cache"})

    async def result(request: Request) -> Response:
        record = record_or_404(request)
        if isinstance(record, Response):
            return record
        return _result_response(record, status_body)

    async def cancel(request: Request) -> Response:
        rid = request.path_params["rid"]
        outcome = queue().cancel(rid)
        return _json({"status": outcome}, _CANCEL_STATUS[outcome], rid)

    async def sync_run(request: Request) -> Response:
        record = await accept(request)
        if isinstance(record, Response):
            return record
        while record.state != "COMPLETED":
            if not await record.wait_changed(0.5) and await request.is_disconnected():
                queue().cancel(record.id)  # the caller hung up: nobody wants this result
                return _json({"detail": "client disconnected"}, 499, record.id)
        return _result_response(record, status_body)

    async def files(request: Request) -> Response:
        record = queue().get(request.path_params["rid"])
        item = record.files.get(request.path_params["name"]) if record else None
        if item is None:
            return _json({"detail": "file not found (results are kept for a limited time)"}, 404)
        data, content_type = item
        return Response(data, media_type=content_type, headers={"Cache-Control": "private, max-age=3600"})

    async def health(request: Request) -> Response:
        q = state.get("queue")
        ready = q is not None and q.ready.is_set() and q.pipeline is not None
        body: dict[str, Any] = {"ready": ready, "pipeline": settings.pipeline, "model": None, "device": None,
                                "queue_length": q.queue_length if q else 0,
                                "safety_checker": bool(q and q.safety)}
        if q is not None and q.pipeline is not None:
            body.update(pipeline=q.pipeline.name, model=q.pipeline.model, device=q.pipeline.device)
        return _json(body, 200 if ready else 503)

    app_routes = []
    for prefix in ("/{owner}/{alias}", "/{owner}/{alias}/{sub}"):
        app_routes += [
            Route(prefix + "/requests/{rid}/status/stream", stream, methods=["GET"]),
            Route(prefix + "/requests/{rid}/status", status, methods=["GET"]),
            Route(prefix + "/requests/{rid}/cancel", cancel, methods=["PUT"]),
            Route(prefix + "/requests/{rid}", result, methods=["GET"]),
        ]
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/files/{rid}/{name}", files, methods=["GET"]),
        Route("/sync/{owner}/{alias}/{sub}", sync_run, methods=["POST"]),
        *app_routes,
        Route("/{owner}/{alias}/{sub}", submit, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    key = settings.worker_key.get_secret_value() if settings.worker_key else None
    app.add_middleware(_FalProtocolMiddleware, key=key)
    return app


def _result_response(record: RequestRecord,
                     status_body: Callable[[RequestRecord, list[dict[str, Any]] | None], dict[str, Any]]) -> Response:
    if record.state != "COMPLETED":
        return _json(status_body(record, None), 202, record.id)
    if record.error is not None:
        return _json(record.error_body, record.error_status, record.id,
                     headers={"x-fal-error-type": record.error_type or ""})
    return _json(record.result, 200, record.id)


def _is_inpaint(request: Request) -> bool:
    p = request.path_params
    return (p["owner"], p["alias"], p["sub"]) == (OWNER, ALIAS, SUBPATH)


def _wants_logs(request: Request) -> bool:
    return request.query_params.get("logs", "0").strip().lower() in ("1", "true", "yes")


def _detail(exc: ValidationError) -> list[dict[str, Any]]:
    return [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]


def _json(body: Any, status: int, request_id: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    all_headers = {"x-fal-request-id": request_id or str(uuid.uuid4()), **(headers or {})}
    return JSONResponse(body, status_code=status, headers=all_headers)


class _FalProtocolMiddleware:
    """Trailing slashes ignored; `Authorization: Key …` checked when a key is set; `x-fal-request-id` always."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app = app
        self.key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            scope = dict(scope, path=path.rstrip("/"), raw_path=path.rstrip("/").encode())
            path = scope["path"]
        if self.key and not path.startswith(("/health", "/files/")) and not self._authorized(scope):
            response = _json({"detail": "No user found for Key ID and Secret"}, 401)
            await response(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"x-fal-request-id" for name, _ in headers):
                    headers.append((b"x-fal-request-id", str(uuid.uuid4()).encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)

    def _authorized(self, scope: Scope) -> bool:
        assert self.key is not None
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                scheme, _, given = value.decode("latin-1").partition(" ")
                return scheme.lower() in ("key", "bearer") and hmac.compare_digest(given.strip(), self.key)
        return False
