"""A running job's backend updates, written to its history in batches rather than one row per poll.

A backend is polled every half second; writing a row for each queue position and log line it reports made a
stuck backend fill the database (thousands of rows a minute). Here queue positions are kept to the latest and
written at most once per `interval_s`; the log lines that arrived since the last write are written as one `log`
row (the lines joined by newlines: `log_lines` splits them again), at most once per `interval_s`; and a run
stores at most `max_lines` log lines (the rest are counted in one note at its end). What the user sees live is
not delayed: this is only the stored history.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from services.job_state import JobEvent
from services.store.jobs import Jobs


def log_lines(events: list[JobEvent]) -> list[str]:
    """The backend's log lines among a job's events, one per line, in order."""
    return [line for e in events if e.kind == "log" for line in e.message.split("\n")]


class EventBuffer:
    """One job's pending history lines; `flush()` writes them in one transaction."""

    def __init__(self, jobs: Jobs, job_id: int, *, interval_s: float = 2.0, max_lines: int = 500,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.jobs, self.job_id = jobs, job_id
        self.interval_s, self.max_lines = interval_s, max_lines
        self._clock = clock
        self._flushed_at = clock()
        self._position: int | None = None
        self._stored_position: int | None = None
        self._lines: list[str] = []
        self._levels: set[str] = set()
        self._stored_lines = 0
        self._dropped = 0

    def position(self, position: int | None) -> None:
        """The backend's queue position now (only the latest is kept)."""
        self._position = position

    def log(self, message: str, level: str | None = None) -> None:
        """A new backend log line."""
        if self._stored_lines + len(self._lines) >= self.max_lines:
            self._dropped += 1
            return
        self._lines.append(" ".join(message.split("\n")))
        if level and level not in ("INFO", "DEBUG"):
            self._levels.add(level)

    async def maybe_flush(self) -> None:
        """Write what is pending when the last write is `interval_s` old."""
        if self._clock() - self._flushed_at >= self.interval_s:
            await self.flush()

    async def flush(self, *, final: bool = False) -> None:
        """Write everything pending now (before a state change; `final` at the end of a run, with the count of
        lines not stored)."""
        events: list[tuple[str, str, dict[str, Any] | None]] = []
        if self._position is not None and self._position != self._stored_position:
            events.append(("queue", f"queue position {self._position}", {"position": self._position}))
        if self._lines:
            data: dict[str, Any] = {"lines": len(self._lines)}
            if self._levels:
                data["levels"] = sorted(self._levels)
            events.append(("log", "\n".join(self._lines), data))
        if final and self._dropped:
            events.append(("note", f"{self._dropped} more log line(s) from the backend were not stored", None))
        if events:
            await self.jobs.add_events(self.job_id, events)
        self._stored_position = self._position
        self._stored_lines += len(self._lines)
        self._lines = []
        self._levels = set()
        if final:
            self._dropped = 0
        self._flushed_at = self._clock()
