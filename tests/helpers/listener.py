"""A dispatcher listener that records what a presentation layer would be told, and can refuse to show a job."""

from __future__ import annotations

import asyncio
import dataclasses

from services.blob import Blob
from services.dispatch import JobImages
from services.job_state import Job
from services.progress import Progress
from services.schema import InpaintOutput


class RecordingListener:
    def __init__(self) -> None:
        self.done: dict[int, asyncio.Event] = {}
        self.queued: list[tuple[Job, JobImages, int | None]] = []
        self.succeeded: list[int] = []
        self.ended: list[Job] = []
        self.refuse_to_show: Exception | None = None  # raised from job_queued, as a channel refusing a post would
        self.show_delay_s = 0.0  # how long showing a job takes (a real post to Discord takes a while)
        self.progress: list[tuple[int, Progress]] = []  # every progress update, with its job id

    def event(self, job_id: int) -> asyncio.Event:
        """Set when job `job_id` has ended, with or without a result."""
        return self.done.setdefault(job_id, asyncio.Event())

    async def job_queued(self, job: Job, images: JobImages, position: int | None) -> None:
        if self.show_delay_s:
            await asyncio.sleep(self.show_delay_s)
        if self.refuse_to_show is not None:
            raise self.refuse_to_show
        self.queued.append((job, images, position))

    async def job_progress(self, job: Job, progress: Progress) -> None:
        self.progress.append((job.id, dataclasses.replace(progress)))

    def said(self, job_id: int) -> list[str]:
        """Every log line a job's progress showed, in order, without repeats."""
        lines: list[str] = []
        for jid, progress in self.progress:
            for line in progress.logs:
                if jid == job_id and line not in lines:
                    lines.append(line)
        return lines

    async def job_succeeded(self, job: Job, output: InpaintOutput, images: list[Blob], *,
                            spoiler: bool = False) -> None:
        self.succeeded.append(job.id)
        self.event(job.id).set()

    async def job_ended(self, job: Job) -> None:
        self.ended.append(job)
        self.event(job.id).set()
