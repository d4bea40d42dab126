"""A real HTTP server on 127.0.0.1 that speaks fal's queue protocol (https://docs.fal.ai/model-apis/model-endpoints/queue),
and misbehaves on demand.

Each request moves through the queue as it is polled: `queue_polls` polls IN_QUEUE (position counting
down), then one new log line per poll while IN_PROGRESS, then COMPLETED. Faults are injected per operation
(`submit`, `status`, `result`, `cancel`, `file`) for a number of hits: slow answers (`slow` waits before
handling the request, `late` handles it and then waits before answering), any HTTP status,
dropped connections, malformed JSON, unknown status strings, an echo of the Authorization header.

It also serves files (`/files/{name}`) so image intake can be tested over real HTTP, and fal's NSFW estimator
`fal-ai/imageutils/nsfw` (operation `check`: every request under `/fal-ai/imageutils/`), which flags a picture
holding `nsfw_marker`-coloured pixels; `serve_nsfw = False` makes it an unknown app (404), as on a backend without it.
"""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from PIL import Image
from pydantic import ValidationError

from services.images import parse_data_uri, to_data_uri
from services.schema import NSFW_APP_ID, InpaintInput, NsfwCheckInput

Op = Literal["submit", "status", "result", "cancel", "file", "check"]
NSFW_OWNER_ALIAS = NSFW_APP_ID.rsplit("/", 1)[0]
#: how many pixels of the marker colour make a picture NSFW to the test estimator
MARKER_PIXELS = 64
#: what the server adds to a prompt it is asked to expand
EXPANSION = ", intricate, highly detailed, golden hour"
FaultKind = Literal["status", "drop", "slow", "late", "malformed", "unknown_status", "echo_auth", "foreign_urls"]


@dataclass
class Fault:
    op: Op
    kind: FaultKind
    times: int = 1  # how many hits it applies to; -1 = forever
    code: int = 503
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]


@dataclass
class FakeRequest:
    id: str
    input: InpaintInput
    queue_polls_left: int
    logs_total: int
    logs: list[dict[str, Any]] = field(default_factory=list)
    state: Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"] = "IN_QUEUE"
    error: str | None = None
    error_type: str | None = None
    cancel_requested: bool = False


class FalTestServer:
    """`async with FalTestServer() as server:` then point a client at `server.base_url`."""

    def __init__(self, *, key: str | None = "test-key-id:test-key-secret", queue_polls: int = 2,
                 progress_logs: int = 3, owner_alias: str = "fal-ai/fast-sdxl", port: int = 0) -> None:
        """`port`: where to listen (0: any free port)."""
        self.key = key
        self.queue_polls = queue_polls
        self.progress_logs = progress_logs
        self.owner_alias = owner_alias
        self.faults: list[Fault] = []
        self.recorded: list[RecordedRequest] = []
        self.requests: dict[str, FakeRequest] = {}
        self.files: dict[str, tuple[bytes, str]] = {}
        self.fail_next: tuple[str, str] | None = None
        self.flag_outputs = False  # the safety checker flags every output (images come back black, as on fal)
        self.flag_inputs = False  # the safety checker flags every uploaded image (a 422 content_policy_violation)
        self.serve_nsfw = True  # serve fal-ai/imageutils/nsfw
        self.nsfw_marker: tuple[int, int, int] | None = None  # the estimator flags pictures holding this colour
        self.checks: dict[str, float] = {}  # the estimator's requests: id → the probability it answers
        self.health: dict[str, Any] | None = None  # served at /health (as our worker does) when set
        #: answer a repeated `Idempotency-Key` with the request it created (as our worker does; hosted fal doesn't)
        self.honour_keys = False
        #: serve result images as files under this base URL (its `/files/…`), as hosted fal serves them from its CDN,
        #: instead of data URIs; None: data URIs
        self.results_at: str | None = None
        self.keys: dict[str, str] = {}
        self._outputs: dict[tuple[int, int, bool], str] = {}  # encoded result image per size: the server is "instant"
        self.base_url = ""
        self.port = port
        self._runner: web.AppRunner | None = None

    # --- lifecycle ------------------------------------------------------------------------------------

    async def __aenter__(self) -> FalTestServer:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None)
        assert sockets
        self.port = sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def inject(self, op: Op, kind: FaultKind, **kwargs: Any) -> Fault:
        fault = Fault(op=op, kind=kind, **kwargs)
        self.faults.append(fault)
        return fault

    def hits(self, op: Op) -> list[RecordedRequest]:
        return [r for r in self.recorded if _op_of(r.method, r.path) == op]

    # --- routing --------------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.recorded.append(RecordedRequest(request.method, request.path, dict(request.query),
                                             {k.lower(): v for k, v in request.headers.items()}))
        if request.path == "/health" and self.health is not None:
            return self._json(self.health, 200)
        op = _op_of(request.method, request.path)
        if op is None:
            return self._json({"detail": "Not Found"}, 404)
        fault = self._take_fault(op)
        if fault is not None:
            response = await self._apply_fault(fault, request)
            if response is not None:
                return response
        if op == "file":
            return self._serve_file(request)
        if self.key is not None and request.headers.get("Authorization") != f"Key {self.key}":
            return self._json({"detail": "No user found for Key ID and Secret"}, 401)
        if op == "check":
            return await self._check(request)
        parts = request.path.strip("/").split("/")
        if op == "submit":
            answer = await self._submit(request, foreign=fault is not None and fault.kind == "foreign_urls")
            if fault is not None and fault.kind == "late":  # taken, but the answer comes too late for the client
                await asyncio.sleep(fault.delay_s)
            return answer
        rid = parts[parts.index("requests") + 1]
        job = self.requests.get(rid)
        if job is None:
            return self._json({"detail": f"Request {rid} not found"}, 404)
        if op == "status":
            state = self._advance(job)
            if fault is not None and fault.kind == "unknown_status":
                state = dict(state, status="FROBNICATING")
            logs_wanted = request.query.get("logs", "0").lower() in ("1", "true")
            if "logs" in state and not logs_wanted:
                state["logs"] = None
            return self._json(state, 200 if job.state == "COMPLETED" else 202, rid)
        if op == "result":
            return self._result(job)
        return self._cancel(job)

    def _take_fault(self, op: Op) -> Fault | None:
        for fault in self.faults:
            if fault.op == op and fault.times != 0:
                if fault.times > 0:
                    fault.times -= 1
                return fault
        return None

    async def _apply_fault(self, fault: Fault, request: web.Request) -> web.StreamResponse | None:
        if fault.kind == "slow":
            await asyncio.sleep(fault.delay_s)
            return None
        if fault.kind == "status":
            body = fault.body if fault.body is not None else {"detail": f"injected {fault.code}"}
            text = body if isinstance(body, str) else json.dumps(body)
            return web.Response(status=fault.code, text=text, content_type="application/json",
                                headers=fault.headers)
        if fault.kind == "drop":
            transport = request.transport
            assert transport is not None
            transport.abort()
            await asyncio.sleep(0.05)
            raise asyncio.CancelledError  # aiohttp treats this as a vanished client: nothing is written
        if fault.kind == "malformed":
            return web.Response(status=200, text='{"status": "IN_QUEUE", "queue_position": ',
                                content_type="application/json")
        if fault.kind == "echo_auth":
            return self._json({"detail": f"upstream said: bad header {request.headers.get('Authorization')}"},
                              500)
        return None  # unknown_status / foreign_urls act inside the normal handlers

    # --- protocol -------------------------------------------------------------------------------------

    def _urls(self, rid: str, *, foreign: bool = False, owner_alias: str | None = None) -> dict[str, str]:
        host = f"http://localhost:{self.port}" if foreign else self.base_url
        base = f"{host}/{owner_alias or self.owner_alias}/requests/{rid}"
        return {"request_id": rid, "response_url": base, "status_url": f"{base}/status",
                "cancel_url": f"{base}/cancel"}

    async def _submit(self, request: web.Request, *, foreign: bool) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return self._json({"detail": [{"loc": ["body"], "msg": "invalid JSON", "type": "json_invalid"}]}, 422)
        try:
            inp = InpaintInput.model_validate(body)
        except ValidationError as exc:
            detail = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
            return self._json({"detail": detail}, 422)
        key = request.headers.get("Idempotency-Key")
        if self.honour_keys and key in self.keys:
            known = self.requests[self.keys[key]]
            return self._json({**self._urls(known.id, foreign=foreign), "status": known.state,
                               "queue_position": 0}, 200, known.id)
        rid = str(uuid.uuid4())
        if key is not None:
            self.keys[key] = rid
        job = FakeRequest(rid, inp, self.queue_polls, self.progress_logs)
        if self.fail_next is not None:
            job.error, job.error_type = self.fail_next
            self.fail_next = None
        elif self.flag_inputs and inp.enable_safety_checker:
            job.error, job.error_type = "the safety checker flagged the uploaded image", "content_policy_violation"
        self.requests[rid] = job
        ahead = sum(1 for j in self.requests.values() if j.state == "IN_QUEUE") - 1
        return self._json({**self._urls(rid, foreign=foreign), "status": "IN_QUEUE", "queue_position": ahead},
                          200, rid)

    def _advance(self, job: FakeRequest) -> dict[str, Any]:
        """One poll's worth of progress, returned as the status body."""
        if job.state == "IN_QUEUE":
            if job.queue_polls_left > 0:
                job.queue_polls_left -= 1
                return {**self._urls(job.id), "status": "IN_QUEUE", "queue_position": job.queue_polls_left}
            job.state = "IN_PROGRESS"
        if job.state == "IN_PROGRESS":
            if job.cancel_requested:
                job.state, job.error, job.error_type = "COMPLETED", "Request was cancelled", "cancelled"
            elif len(job.logs) < job.logs_total:
                n = len(job.logs) + 1
                job.logs.append({"message": f"step {n}/{job.logs_total}", "level": "INFO", "source": "USER",
                                 "timestamp": "2026-11-25T00:00:00.000000"})
                return {**self._urls(job.id), "status": "IN_PROGRESS", "logs": list(job.logs), "metrics": {}}
            else:
                job.state = "COMPLETED"
        body: dict[str, Any] = {**self._urls(job.id), "status": "COMPLETED", "logs": list(job.logs),
                                "metrics": {"inference_time": 0.01}}
        if job.error:
            body.update(error=job.error, error_type=job.error_type)
        return body

    def _result(self, job: FakeRequest) -> web.Response:
        if job.state != "COMPLETED":
            return self._json({**self._urls(job.id), "status": job.state}, 202, job.id)
        if job.error_type == "content_policy_violation":
            return self._json({"detail": [{"loc": ["body", "image_url"], "msg": job.error,
                                           "type": "content_policy_violation"}]}, 422, job.id)
        if job.error:
            return self._json({"detail": job.error, "error_type": job.error_type}, 500, job.id)
        width, height = job.input.size_pixels()
        flagged = self.flag_outputs and job.input.enable_safety_checker
        key = (width, height, flagged)
        if key not in self._outputs:
            buf = io.BytesIO()
            Image.new("RGB", (width, height), (0, 0, 0) if flagged else (40, 120, 200)).save(buf, format="PNG")
            self._outputs[key] = to_data_uri(buf.getvalue(), "image/png")
        url = self._outputs[key]
        if self.results_at is not None:
            name = f"result-{width}x{height}-{int(flagged)}.png"
            self.files[name] = (parse_data_uri(url, max_bytes=64 << 20), "image/png")
            url = f"{self.results_at}/files/{name}"
        images = [{"url": url, "width": width, "height": height,
                   "content_type": "image/png"} for _ in range(job.input.num_images)]
        seed = job.input.seed if job.input.seed is not None else 17454220438242315174
        prompt = job.input.prompt + (EXPANSION if job.input.expand_prompt else "")  # as fal returns an expanded one
        return self._json({"images": images, "timings": {"inference": 0.01}, "seed": seed,
                           "has_nsfw_concepts": [flagged] * job.input.num_images, "prompt": prompt}, 200, job.id)

    async def _check(self, request: web.Request) -> web.Response:
        """fal-ai/imageutils/nsfw: answered at once (the first status poll is COMPLETED)."""
        if not self.serve_nsfw:
            return self._json({"detail": "Application not found"}, 404)
        parts = request.path.strip("/").split("/")
        if request.method == "POST" and request.path.strip("/") == NSFW_APP_ID:
            try:
                inp = NsfwCheckInput.model_validate(await request.json())
                picture = Image.open(io.BytesIO(parse_data_uri(inp.image_url, max_bytes=64 * 1024 * 1024)))
            except (ValueError, ValidationError, OSError) as exc:
                return self._json({"detail": [{"loc": ["body", "image_url"], "msg": str(exc)[:200],
                                               "type": "value_error"}]}, 422)
            rid = str(uuid.uuid4())
            self.checks[rid] = self._nsfw_probability(picture)
            return self._json({**self._urls(rid, owner_alias=NSFW_OWNER_ALIAS), "status": "IN_QUEUE",
                               "queue_position": 0}, 200, rid)
        rid = parts[parts.index("requests") + 1] if "requests" in parts else ""
        if rid not in self.checks:
            return self._json({"detail": f"Request {rid} not found"}, 404)
        if parts[-1] == "status":
            return self._json({**self._urls(rid, owner_alias=NSFW_OWNER_ALIAS), "status": "COMPLETED", "logs": [],
                               "metrics": {"inference_time": 0.001}}, 200, rid)
        if parts[-1] == "cancel":
            return self._json({"status": "ALREADY_COMPLETED"}, 400, rid)
        return self._json({"nsfw_probability": self.checks[rid]}, 200, rid)

    def _nsfw_probability(self, picture: Image.Image) -> float:
        if self.nsfw_marker is None:
            return 0.01
        import numpy as np

        pixels = np.asarray(picture.convert("RGB")).reshape(-1, 3)
        marked = int(np.all(pixels == np.array(self.nsfw_marker), axis=1).sum())
        return 0.98 if marked >= MARKER_PIXELS else 0.01

    def _cancel(self, job: FakeRequest) -> web.Response:
        if job.state == "COMPLETED":
            return self._json({"status": "ALREADY_COMPLETED"}, 400, job.id)
        if job.state == "IN_QUEUE":
            job.state, job.error, job.error_type = "COMPLETED", "Request was cancelled", "cancelled"
            return self._json({"status": "OK"}, 200, job.id)
        job.cancel_requested = True
        return self._json({"status": "CANCELLATION_REQUESTED"}, 202, job.id)

    def _serve_file(self, request: web.Request) -> web.Response:
        name = request.path.removeprefix("/files/")
        if name not in self.files:
            return web.Response(status=404, text="no such file")
        data, content_type = self.files[name]
        return web.Response(body=data, content_type=content_type)

    def _json(self, body: Any, status: int, rid: str | None = None) -> web.Response:
        headers = {"x-fal-request-id": rid or str(uuid.uuid4())}
        return web.Response(status=status, text=json.dumps(body), content_type="application/json",
                            headers=headers)


def _op_of(method: str, path: str) -> Op | None:
    if path.startswith(f"/{NSFW_OWNER_ALIAS}/"):
        return "check"
    parts = path.strip("/").split("/")
    if parts and parts[0] == "files" and method == "GET":
        return "file"
    if "requests" in parts:
        tail = parts[parts.index("requests") + 1:]
        if method == "GET" and len(tail) == 2 and tail[1] == "status":
            return "status"
        if method == "GET" and len(tail) == 1:
            return "result"
        if method == "PUT" and len(tail) == 2 and tail[1] == "cancel":
            return "cancel"
        return None
    if method == "POST" and len(parts) >= 2:
        return "submit"
    return None
