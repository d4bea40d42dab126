"""One request on the worker, from submit until its result expires: its fal state, the log lines clients see, its
result or error, and the image files it serves.

Whoever follows a request (an SSE stream, a synchronous caller) waits with `wait_changed`; every change to a record
wakes them. The queue (`services.worker.queue`) owns the records and moves them from state to state.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from services.schema import InpaintInput, QueueState
from services.worker.pipelines.base import RunContext


@dataclass
class RequestRecord:
    """One request: what was asked, where it stands, and what came of it."""

    id: str
    input: InpaintInput
    seed: int
    #: the base URL the client reached us at: the request's status, result and file URLs start with it
    base_url: str
    state: QueueState = "IN_QUEUE"
    logs: list[dict[str, Any]] = field(default_factory=list)
    started_at: float | None = None  # time.monotonic()
    finished_at: float | None = None
    inference_time: float | None = None  # seconds in the pipeline (shared by every request of its batch)
    result: dict[str, Any] | None = None  # the output body, once completed without error
    error: str | None = None
    error_type: str | None = None
    error_status: int = 500
    error_body: dict[str, Any] | None = None
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # name → (data, content type)
    ctx: RunContext | None = None  # from `start()` on
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

    def start(self) -> RunContext:
        """IN_PROGRESS from now (call it on the event loop). Returns the context its pipeline run gets: log lines
        the pipeline writes from its thread are added here, in order, on the event loop."""
        loop = asyncio.get_running_loop()

        def log_from_thread(message: str) -> None:
            loop.call_soon_threadsafe(self.add_log, message)

        self.state, self.started_at = "IN_PROGRESS", time.monotonic()
        self.ctx = RunContext(log=log_from_thread)
        self.notify()
        return self.ctx

    @property
    def cancel_requested(self) -> bool:
        return self.ctx is not None and self.ctx.cancel_event.is_set()

    def running_for_s(self) -> float:
        """Seconds since `start()`."""
        assert self.started_at is not None, "the request has not started"
        return time.monotonic() - self.started_at

    def complete(self) -> None:
        self.state = "COMPLETED"
        self.finished_at = time.monotonic()
        self.notify()

    def fail(self, message: str, error_type: str, status: int, body: dict[str, Any] | None = None) -> None:
        """Complete with an error: `status` and `body` are what fetching the result answers."""
        self.error, self.error_type, self.error_status = message, error_type, status
        self.error_body = body or {"detail": message, "error_type": error_type}
        self.complete()

    def fail_cancelled(self, why: str) -> None:
        """Complete as cancelled (fal's 400 `cancelled`), after a last log line saying `why`."""
        self.add_log(why)
        self.fail("Request was cancelled", "cancelled", 400)

    def fail_internal(self, exc: Exception) -> None:
        """Complete with the worker's own failure (fal's 500 `runner_error`)."""
        self.fail(f"the worker failed: {type(exc).__name__}: {exc}", "runner_error", 500)
