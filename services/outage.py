"""How long a backend has been unreachable for one job, and how long to wait before trying it again: exponential
backoff from 0.5 s, at most 10 s a wait, for at most `limit_s` in all (the dispatcher's BACKEND_OUTAGE_S)."""

from __future__ import annotations

import time
from collections.abc import Callable


class Outage:
    """How long the backend has been unreachable for one job, and how long to wait before trying again."""

    def __init__(self, limit_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit_s = limit_s
        self._clock = clock
        self._since: float | None = None
        self._tries = 0

    @property
    def tries(self) -> int:
        """How many waits this outage has had."""
        return self._tries

    def over(self) -> None:
        """The backend answered."""
        self._since, self._tries = None, 0

    def next_delay(self) -> float | None:
        """Seconds to wait before trying again, or None when the outage has lasted `limit_s`."""
        now = self._clock()
        if self._since is None:
            self._since = now
        waited = now - self._since
        if waited >= self.limit_s:
            return None
        self._tries += 1
        return float(min(0.5 * 2 ** (self._tries - 1), 10.0, self.limit_s - waited))
