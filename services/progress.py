"""What a running job looks like to a user: queue position, denoising step, last log lines, elapsed time."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from services.job_state import JobStatus

_STEP = re.compile(r"\bstep (\d+)\s*/\s*(\d+)")
KEEP_LOGS = 4


@dataclass
class Progress:
    status: JobStatus
    started_at: float
    queue_position: int | None = None
    step: int | None = None
    total_steps: int | None = None
    logs: list[str] = field(default_factory=list)

    def add_log(self, message: str) -> None:
        """Record a backend log line, picking up "step i/N" progress from it."""
        match = _STEP.search(message)
        if match:
            self.step, self.total_steps = int(match.group(1)), int(match.group(2))
        self.logs = [*self.logs, message][-KEEP_LOGS:]

    def elapsed(self, now: float | None = None) -> float:
        return max(0.0, (now if now is not None else time.time()) - self.started_at)

    def bar(self, width: int = 12) -> str:
        """A text progress bar for the denoising steps, e.g. `▰▰▰▱▱▱ 12/23`."""
        if not self.step or not self.total_steps:
            return ""
        filled = round(width * min(self.step, self.total_steps) / self.total_steps)
        return f"{'▰' * filled}{'▱' * (width - filled)} {self.step}/{self.total_steps}"
