"""One request on the worker, from submit until its result expires: its fal state, the log lines clients see, its
result or error, and the image files it serves.

A record holds little: an inpainting request's image and mask sources wait in the worker's storage
(`services.worker.storage`) until the request is prepared, and are dropped then; result files, and output bodies too
large for memory, are kept there too (the record has their paths).

Every app the worker serves speaks the same queue protocol, so what the protocol needs lives in one base class,
`RequestRecord` (id, base URL, app id and its URL prefix, state, logs, result or error, files, change
notification); each app's record adds only what its requests carry: `InpaintRecord` for
`fal-ai/fast-sdxl/inpainting`, `CheckRecord` for `fal-ai/imageutils/nsfw`. The protocol functions
(`services.worker.protocol`) and the queue's client-facing operations work on the base.

Whoever follows a request (an SSE stream, a synchronous caller) waits with `wait_changed`; every change to a record
wakes them. The queue (`services.worker.queue`) owns the records and moves them from state to state.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from services.schema import INPAINT_APP_ID, NSFW_APP_ID, InpaintInput, NsfwCheckInput, QueueState
from services.worker.pipelines.base import RunContext
from services.worker.storage import WaitingSources


@dataclass(kw_only=True)
class RequestRecord:
    """One request of any app: where it stands and what came of it. Subclasses name their app (`app_id`)."""

    #: the app's full id (`owner/alias/path`); set by each subclass
    app_id: ClassVar[str]

    id: str
    #: the base URL the client reached us at: the request's status, result and file URLs start with it
    base_url: str
    state: QueueState = "IN_QUEUE"
    logs: list[dict[str, Any]] = field(default_factory=list)
    started_at: float | None = None  # time.monotonic()
    finished_at: float | None = None
    inference_time: float | None = None  # seconds in the model (shared by every request of an inpainting batch)
    result: dict[str, Any] | None = None  # the output body, once completed without error (unless in result_file)
    result_file: Path | None = None  # the output body (JSON) on disk, when too large to keep in memory
    error: str | None = None
    error_type: str | None = None
    error_status: int = 500
    error_body: dict[str, Any] | None = None
    files: dict[str, tuple[Path, str]] = field(default_factory=dict)  # name → (where on disk, content type)
    ctx: RunContext | None = None  # from `start()` on
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def has_result(self) -> bool:
        """Completed without error: the output is in `result` or `result_file`."""
        return self.result is not None or self.result_file is not None

    @property
    def url_prefix(self) -> str:
        """`owner/alias` of the app: fal's request URLs live under `/{owner}/{alias}/requests/{id}`."""
        owner, alias = self.app_id.split("/")[:2]
        return f"{owner}/{alias}"

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
        """IN_PROGRESS from now (call it on the event loop). Returns the context its run gets: log lines written
        from a worker thread are added here, in order, on the event loop."""
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


@dataclass(kw_only=True)
class InpaintRecord(RequestRecord):
    """A `fal-ai/fast-sdxl/inpainting` request: its input without the image and mask (`image_url` and
    `mask_url` are empty: they wait in `sources` until the request is prepared, then are dropped), its seed
    (resolved at submit) and, when the request asked for `expand_prompt`, the expanded prompt the pipeline ran
    with."""

    app_id: ClassVar[str] = INPAINT_APP_ID

    input: InpaintInput
    seed: int
    sources: WaitingSources | None = None
    expanded_prompt: str | None = None

    @property
    def prompt(self) -> str:
        """The prompt the images were made from: the expanded one when there is one (the output's `prompt`)."""
        return self.expanded_prompt if self.expanded_prompt is not None else self.input.prompt


@dataclass(kw_only=True)
class CheckRecord(RequestRecord):
    """A `fal-ai/imageutils/nsfw` request: one image to estimate (stored until the check runs)."""

    app_id: ClassVar[str] = NSFW_APP_ID

    input: NsfwCheckInput  # its `image_url` is empty except while the check runs: it waits in `waiting`
    waiting: WaitingSources | None = None
