"""One async client for fal's HTTP queue protocol (https://docs.fal.ai/model-apis/model-endpoints/queue).

It talks to hosted fal (`https://queue.fal.run`) and to our own worker alike: submit to `{base}/{app_id}`,
then follow only the `status_url` / `response_url` / `cancel_url` the server returned.

- Auth: `Authorization: Key <FAL_KEY>`, sent only to the base URL's origin; the key is never logged and is
  redacted from every error message (even when a server echoes it back).
- Retries with exponential backoff and jitter on transport errors, 408/409/429 and 502/503/504
  (honouring `Retry-After`); never on validation errors (422 → `FalValidationError` with fal's `detail`).
- A submit (POST) is retried only where it cannot have reached the server: a connection never made, 408, 429 or 503.
  After anything else (a read timeout, a dropped connection, 502/504) the server may hold the request, so the
  client raises `FalSubmitUncertain` instead of sending it twice. A submit may carry an `Idempotency-Key`
  (IETF draft-ietf-httpapi-idempotency-key-header): our worker answers a repeated key with the request it already
  has, so a caller that recorded the key can send it again safely.
- Unknown status strings and malformed bodies are `FalProtocolError`s; a whole run has a total timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, SecretStr, TypeAdapter, ValidationError

from services.schema import (
    INPAINT_APP_ID,
    CancelOutcome,
    CompletedStatus,
    ErrorBody,
    InpaintInput,
    InpaintOutput,
    InProgressStatus,
    InQueueStatus,
    QueueHandle,
    QueueStatus,
    RequestLog,
)

log = logging.getLogger(__name__)

RETRY_STATUSES: frozenset[int] = frozenset({408, 409, 429, 502, 503, 504})
#: answers after which a submit is known not to have been taken: it is sent again
SUBMIT_RETRY_STATUSES: frozenset[int] = frozenset({408, 429, 503})
#: transport errors raised before any byte of the request was sent
_UNSENT_ERRORS: tuple[type[httpx.TransportError], ...] = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_KNOWN_STATES = frozenset({"IN_QUEUE", "IN_PROGRESS", "COMPLETED"})
_status_adapter: TypeAdapter[QueueStatus] = TypeAdapter(QueueStatus)
_M = TypeVar("_M", bound=BaseModel)
_CANCEL_OUTCOMES: dict[Any, CancelOutcome] = {
    o: o for o in ("OK", "CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND")}


# --- errors -------------------------------------------------------------------------------------------

class FalError(Exception):
    """Base of every error this client raises. `str()` never contains the key."""

    #: Whether trying the same request again later might succeed (the dispatcher uses this).
    retryable: bool = False


class FalHTTPError(FalError):
    """A non-2xx answer that we do not retry (or stopped retrying)."""

    def __init__(self, message: str, *, status_code: int, detail: Any = None, error_type: str | None = None,
                 request_id: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail
        self.error_type = error_type
        self.request_id = request_id
        self.retryable = status_code in RETRY_STATUSES or status_code >= 500


class FalValidationError(FalHTTPError):
    """422: the backend refused the input. `field_errors` lists (field, message)."""

    @property
    def field_errors(self) -> list[tuple[str, str]]:
        if not isinstance(self.detail, list):
            return [("", str(self.detail))]
        return [(".".join(str(p) for p in item.get("loc", [])[1:]) or "body", str(item.get("msg", "")))
                for item in self.detail if isinstance(item, dict)]


class FalAuthError(FalHTTPError):
    """401/403: the key is missing, wrong, or lacks permission."""


class FalNotFoundError(FalHTTPError):
    """404: the backend does not know this request (e.g. a worker restarted and lost its queue).

    Retryable in the sense that matters: submitting the job again from its stored inputs can succeed.
    """

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retryable = True


class FalUnavailableError(FalError):
    """The backend could not be reached, or kept answering with retryable errors until retries ran out."""

    retryable = True


class FalSubmitUncertain(FalUnavailableError):
    """A submit failed in a way that leaves it unknown whether the backend received it (the connection broke
    after the request was sent, or a gateway answered 502/504). Sending it again may run it twice, unless the
    backend honours the submit's `Idempotency-Key`."""


class FalProtocolError(FalError):
    """The backend answered something that isn't fal's protocol (malformed JSON, unknown status, …)."""


class FalRequestFailed(FalError):
    """The request ran and failed on the backend (COMPLETED with `error`)."""

    def __init__(self, message: str, *, error_type: str | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.retryable = error_type in {"runner_disconnected", "runner_scheduling_failure",
                                        "runner_connection_timeout", "startup_timeout"}


class FalTimeoutError(FalError):
    """The whole run took longer than the total timeout (the request was cancelled, best effort)."""

    retryable = True


# --- updates ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QueueUpdate:
    """Something new about a running request, in the order it was observed."""

    kind: Literal["queued", "started", "log", "completed"]
    position: int | None = None
    log: RequestLog | None = None
    metrics: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    base_delay_s: float = 0.25
    max_delay_s: float = 8.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Delay before retry number `attempt` (1-based): exponential, capped, with ±50% jitter."""
        backoff: float = min(self.base_delay_s * 2 ** (attempt - 1), self.max_delay_s) * random.uniform(0.5, 1.5)
        if retry_after is not None:
            return float(min(max(retry_after, backoff), self.max_delay_s))
        return backoff


# --- the client ---------------------------------------------------------------------------------------

class FalQueueClient:
    """Submit, follow, fetch and cancel requests on a fal-protocol queue (hosted fal or our worker)."""

    def __init__(self, *, base_url: str, key: SecretStr | str | None = None,
                 app_id: str = INPAINT_APP_ID, http: httpx.AsyncClient | None = None,
                 retry: RetryPolicy = RetryPolicy(), poll_interval_s: float = 0.5,
                 total_timeout_s: float = 600.0, request_timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.app_id = app_id.strip("/")
        self._key = key.get_secret_value() if isinstance(key, SecretStr) else key
        self._origin = _origin(self.base_url)
        self._own_http = http is None
        self._http = http or httpx.AsyncClient(timeout=httpx.Timeout(request_timeout_s, connect=10.0))
        self._timeout = httpx.Timeout(request_timeout_s, connect=min(10.0, request_timeout_s))
        self.retry = retry
        self.poll_interval_s = poll_interval_s
        self.total_timeout_s = total_timeout_s

    def __repr__(self) -> str:
        return f"FalQueueClient(base_url={self.base_url!r}, app_id={self.app_id!r}, key={'set' if self._key else None})"

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> FalQueueClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- protocol operations ------------------------------------------------------------------------

    async def submit(self, body: InpaintInput | Mapping[str, Any], *, app_id: str | None = None,
                     idempotency_key: str | None = None) -> QueueHandle:
        """POST the input to `{base}/{app_id}` (this client's app unless another is named); returns the handle with
        the URLs to follow. Retried only where the request cannot have arrived; `FalSubmitUncertain` otherwise.
        `idempotency_key` is sent as `Idempotency-Key` (a backend that honours it returns the request it already
        has for the key)."""
        payload = body.wire() if isinstance(body, InpaintInput) else dict(body)
        extra = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        resp = await self._request("POST", f"{self.base_url}/{(app_id or self.app_id).strip('/')}", json=payload,
                                   extra_headers=extra, submit=True)
        handle = self._parse(resp, QueueHandle, "submit")
        log.info("submitted request %s to %s", handle.request_id, self.base_url)
        return handle

    async def status(self, handle: QueueHandle, *, logs: bool = True) -> QueueStatus:
        """One status poll (`?logs=1`): IN_QUEUE with position, IN_PROGRESS or COMPLETED with logs."""
        resp = await self._request("GET", handle.status_url, params={"logs": "1" if logs else "0"})
        data = self._json(resp, "status")
        state = data.get("status") if isinstance(data, dict) else None
        if state not in _KNOWN_STATES:
            raise FalProtocolError(self._redact(f"backend sent an unknown request status {state!r}"))
        try:
            return _status_adapter.validate_python(data)
        except ValidationError as exc:
            raise FalProtocolError(self._redact(f"malformed {state} status from backend: {_brief(exc)}")) from exc

    async def result(self, handle: QueueHandle) -> InpaintOutput:
        """GET the response URL: the model output, or the backend's stored error raised as a `FalError`."""
        return await self.result_as(handle, InpaintOutput)

    async def result_as(self, handle: QueueHandle, model: type[_M]) -> _M:
        """`result` for another app's output model."""
        resp = await self._request("GET", handle.response_url)
        if resp.status_code == 202:
            raise FalProtocolError("backend returned the result before the request completed")
        return self._parse(resp, model, "result")

    async def cancel(self, handle: QueueHandle) -> CancelOutcome:
        """PUT the cancel URL. Returns fal's outcome; never raises for 'already completed' or 'not found'."""
        resp = await self._request("PUT", handle.cancel_url, ok_statuses=frozenset({400, 404}))
        data = self._json(resp, "cancel") if resp.content else {}
        outcome = data.get("status") if isinstance(data, dict) else None
        if outcome in _CANCEL_OUTCOMES:
            return _CANCEL_OUTCOMES[outcome]
        if resp.status_code == 404:
            return "NOT_FOUND"
        if resp.status_code == 400:
            return "ALREADY_COMPLETED"
        if isinstance(data, dict) and data.get("success") is True:  # fal's OpenAPI shape
            return "OK"
        raise FalProtocolError(self._redact(f"unexpected cancel answer {outcome!r} (HTTP {resp.status_code})"))

    async def updates(self, handle: QueueHandle) -> AsyncIterator[QueueUpdate]:
        """Poll status until COMPLETED, yielding queue positions, the start, each new log line, the end.

        Raises `FalRequestFailed` when the request completed with an error.
        """
        seen_logs = 0
        last_position: int | None = None
        started = False
        while True:
            st = await self.status(handle, logs=True)
            if isinstance(st, InQueueStatus):
                if st.queue_position != last_position:
                    last_position = st.queue_position
                    yield QueueUpdate("queued", position=st.queue_position)
            else:
                if not started:
                    started = True
                    yield QueueUpdate("started")
                logs = st.logs or []
                if len(logs) < seen_logs:  # the backend restarted its log list: don't skip what is new
                    seen_logs = 0
                for entry in logs[seen_logs:]:
                    yield QueueUpdate("log", log=entry)
                seen_logs = len(logs)
                if isinstance(st, CompletedStatus):
                    if st.error:
                        raise FalRequestFailed(self._redact(st.error), error_type=st.error_type)
                    yield QueueUpdate("completed", metrics=st.metrics)
                    return
                assert isinstance(st, InProgressStatus)
            await asyncio.sleep(self.poll_interval_s)

    async def follow(self, handle: QueueHandle,
                     on_update: Callable[[QueueUpdate], Awaitable[None]] | None = None) -> InpaintOutput:
        """Follow an already-submitted request to its result (also used to resume after a restart).

        A request that completed with an error raises `FalRequestFailed`, or `FalValidationError` with the
        field details when the backend stored a 422 for it (e.g. an image it could not read).
        """
        return await self.follow_as(handle, InpaintOutput, on_update)

    async def follow_as(self, handle: QueueHandle, model: type[_M],
                        on_update: Callable[[QueueUpdate], Awaitable[None]] | None = None) -> _M:
        """`follow` for another app's output model."""
        try:
            async for update in self.updates(handle):
                if on_update is not None:
                    await on_update(update)
        except FalRequestFailed as failed:
            try:
                await self.result_as(handle, model)
            except FalValidationError as detailed:
                raise detailed from failed
            except FalError:
                pass
            raise
        return await self.result_as(handle, model)

    async def run(self, body: InpaintInput | Mapping[str, Any], *,
                  on_submitted: Callable[[QueueHandle], Awaitable[None]] | None = None,
                  on_update: Callable[[QueueUpdate], Awaitable[None]] | None = None,
                  total_timeout_s: float | None = None) -> InpaintOutput:
        """Submit, follow and fetch, within a total timeout (on expiry the request is cancelled)."""
        limit = self.total_timeout_s if total_timeout_s is None else total_timeout_s
        handle: QueueHandle | None = None
        try:
            async with asyncio.timeout(limit):
                handle = await self.submit(body)
                if on_submitted is not None:
                    await on_submitted(handle)
                return await self.follow(handle, on_update)
        except TimeoutError as exc:
            if handle is not None:
                await self._cancel_quietly(handle)
            raise FalTimeoutError(f"the backend did not finish within {limit:g} s") from exc

    async def _cancel_quietly(self, handle: QueueHandle) -> None:
        try:
            async with asyncio.timeout(5):
                await self.cancel(handle)
        except (FalError, TimeoutError) as exc:
            log.warning("could not cancel timed-out request %s: %s", handle.request_id, exc)

    # --- HTTP plumbing ------------------------------------------------------------------------------

    def _headers(self, url: str) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "inpaint-bot/0.1"}
        if self._key:
            if _origin(url) == self._origin:
                headers["Authorization"] = f"Key {self._key}"
            else:
                log.warning("not sending the key to %s: it is not the configured backend's origin", _origin(url))
        return headers

    async def _request(self, method: str, url: str, *, json: Any = None, params: Mapping[str, str] | None = None,
                       ok_statuses: frozenset[int] = frozenset(), extra_headers: Mapping[str, str] | None = None,
                       submit: bool = False) -> httpx.Response:
        """Send one request with retries; returns a 2xx (or `ok_statuses`) response or raises a `FalError`.
        A `submit` is retried only after failures that prove the server did not take it."""
        headers = {**self._headers(url), **(extra_headers or {})}
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            try:
                resp = await self._http.request(method, url, json=json, params=params, headers=headers,
                                                timeout=self._timeout)
            except httpx.TransportError as exc:
                failure = f"{type(exc).__name__} talking to the backend"
                if submit and not isinstance(exc, _UNSENT_ERRORS):
                    raise FalSubmitUncertain(f"the submit may or may not have reached the backend: {failure}") from exc
                last: FalError = FalUnavailableError(f"backend unreachable: {failure} ({method} {_path(url)})")
            else:
                if resp.is_success or resp.status_code in ok_statuses:
                    return resp
                if resp.status_code not in RETRY_STATUSES:
                    raise self._http_error(resp)
                failure = f"HTTP {resp.status_code}"
                err = self._http_error(resp)
                if submit and resp.status_code not in SUBMIT_RETRY_STATUSES:
                    raise FalSubmitUncertain(f"the submit may or may not have reached the backend: {err}")
                retry_after = _retry_after(resp)
                last = FalUnavailableError(f"backend busy or unavailable: {err}")
            if attempt >= self.retry.attempts:
                raise last
            delay = self.retry.delay(attempt, retry_after)
            log.warning("%s %s: %s; retry %d/%d in %.2f s", method, _path(url), failure, attempt,
                        self.retry.attempts - 1, delay)
            await asyncio.sleep(delay)

    def _http_error(self, resp: httpx.Response) -> FalHTTPError:
        body: Any
        try:
            body = resp.json()
        except ValueError:
            body = None
        detail: Any = None
        error_type = resp.headers.get("x-fal-error-type")
        if isinstance(body, dict):
            try:
                parsed = ErrorBody.model_validate(body)
                detail = [item.model_dump() for item in parsed.detail] if isinstance(parsed.detail, list) \
                    else parsed.detail
                error_type = parsed.error_type or error_type
            except ValidationError:
                detail = body.get("detail")
        text = _describe_detail(detail) if detail is not None else _snippet(resp.text)
        code = resp.status_code
        request_id = resp.headers.get("x-fal-request-id")
        if code == 422:
            message = f"the backend rejected the request: {text}"
            return FalValidationError(self._redact(message), status_code=code, detail=detail,
                                      error_type=error_type, request_id=request_id)
        if code in (401, 403):
            message = f"the backend refused our credentials (HTTP {code}): {text}"
            return FalAuthError(self._redact(message), status_code=code, detail=detail, error_type=error_type)
        if code == 404:
            return FalNotFoundError(self._redact(f"the backend does not know this request (HTTP 404): {text}"),
                                    status_code=code, detail=detail, error_type=error_type)
        suffix = f" [{error_type}]" if error_type else ""
        return FalHTTPError(self._redact(f"HTTP {code}: {text}{suffix}"), status_code=code, detail=detail,
                            error_type=error_type, request_id=request_id)

    def _json(self, resp: httpx.Response, what: str) -> Any:
        try:
            return resp.json()
        except ValueError as exc:
            raise FalProtocolError(self._redact(
                f"backend sent malformed JSON for {what} (HTTP {resp.status_code}): {_snippet(resp.text)}")) from exc

    def _parse(self, resp: httpx.Response, model: type[_M], what: str) -> _M:
        data = self._json(resp, what)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise FalProtocolError(self._redact(f"backend sent an invalid {what} body: {_brief(exc)}")) from exc

    def _redact(self, text: str) -> str:
        if self._key:
            text = text.replace(self._key, "[redacted]")
            for part in self._key.split(":"):
                if len(part) >= 6:
                    text = text.replace(part, "[redacted]")
        return text


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def _path(url: str) -> str:
    return urlsplit(url).path


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _snippet(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def _describe_detail(detail: Any) -> str:
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
        return "; ".join(parts) or "invalid request"
    if isinstance(detail, str):
        return _snippet(detail)
    return _snippet(json.dumps(detail))


def _brief(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3])
