"""fal's queue protocol on the wire, as the worker speaks it (https://docs.fal.ai/model-apis/model-endpoints/queue):
the bodies its routes answer with (a request's URLs, its status, its result or stored error, 422 details), JSON
responses carrying `x-fal-request-id`, and the middleware every route runs behind (trailing slashes ignored, the
`Authorization: Key …` check, a request id on every response). The bodies take the base `RequestRecord`: every app
the worker serves answers the same way."""

from __future__ import annotations

import hmac
import uuid
from typing import Any

from pydantic import ValidationError
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.worker.queue import RequestQueue
from services.worker.records import RequestRecord

REQUEST_ID_HEADER = "x-fal-request-id"


def request_urls(record: RequestRecord) -> dict[str, str]:
    """The request id and the URLs a client follows it at (under its app's `/{owner}/{alias}`, as fal's are)."""
    root = f"{record.base_url}/{record.url_prefix}/requests/{record.id}"
    return {"request_id": record.id, "response_url": root, "status_url": f"{root}/status",
            "cancel_url": f"{root}/cancel"}


def status_body(record: RequestRecord, queue: RequestQueue, logs: list[dict[str, Any]] | None) -> dict[str, Any]:
    """A status response: `logs` is null unless the client asked for them."""
    body: dict[str, Any] = {"status": record.state, **request_urls(record), "logs": logs}
    if record.state == "IN_QUEUE":
        body["queue_position"] = queue.position(record)
    else:
        body["metrics"] = {}
    if record.state == "COMPLETED":
        body["metrics"] = {"inference_time": record.inference_time}
        if record.error:
            body.update(error=record.error, error_type=record.error_type)
    return body


def result_response(record: RequestRecord, queue: RequestQueue) -> Response:
    """The output (200; from disk when it was too large to keep in memory), the stored error (its own status,
    `x-fal-error-type`), or 202 and the status."""
    if record.state != "COMPLETED":
        return json_response(status_body(record, queue, None), 202, record.id)
    if record.error is not None:
        return json_response(record.error_body, record.error_status, record.id,
                             headers={"x-fal-error-type": record.error_type or ""})
    if record.result_file is not None:
        return FileResponse(record.result_file, media_type="application/json",
                            headers={REQUEST_ID_HEADER: record.id})
    return json_response(record.result, 200, record.id)


def validation_detail(exc: ValidationError) -> list[dict[str, Any]]:
    """pydantic's errors as fal's 422 `detail` list (locations start at `body`)."""
    return [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]


def json_response(body: Any, status: int, request_id: str | None = None,
                  headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON response; without `request_id` the middleware gives it a fresh one."""
    all_headers = {REQUEST_ID_HEADER: request_id} if request_id else {}
    return JSONResponse(body, status_code=status, headers={**all_headers, **(headers or {})})


class FalProtocolMiddleware:
    """Trailing slashes ignored; `Authorization: Key …` checked when a key is set (not for /health and /files/,
    which clients reach without one, like fal's CDN); `x-fal-request-id` on every response."""

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

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == REQUEST_ID_HEADER.encode() for name, _ in headers):
                    headers.append((REQUEST_ID_HEADER.encode(), str(uuid.uuid4()).encode()))
                message["headers"] = headers
            await send(message)

        # the path under the app's mount point (Ray Serve mounts an application at its route prefix)
        root: str = scope.get("root_path", "")
        route = path[len(root):] if root and path.startswith(root) else path
        if self.key and not route.startswith(("/health", "/files/")) and not self._authorized(scope):
            response = json_response({"detail": "No user found for Key ID and Secret"}, 401)
            await response(scope, receive, send_with_id)
            return
        await self.app(scope, receive, send_with_id)

    def _authorized(self, scope: Scope) -> bool:
        assert self.key is not None
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                scheme, _, given = value.decode("latin-1").partition(" ")
                return scheme.lower() in ("key", "bearer") and hmac.compare_digest(given.strip(), self.key)
        return False
