"""Preparing inpainting requests ahead of the device, so that a fetch never holds the queue.

Preparing a request — fetching and decoding its image and mask, checking the upload, fitting both to the output
size — takes from milliseconds (a data URI) to as long as the fetch deadline allows (a slow server). The queue's
runner only ever runs requests already prepared: while batch N runs, the requests behind it are prepared, and the
next batch is made of those that are ready, in arrival order. A request whose image trickles in delays nobody but
itself; it joins a later batch once ready.

Two bounds keep memory flat whatever is queued: at most `concurrency` preparations run at once (each holds its
fetched bytes and decoded images), and at most `ahead` requests are being prepared or prepared and waiting for the
device (each of those holds its image and mask at the output size).

The `Preparer` only schedules; what preparing a request means (and how it fails) is the queue's `prepare` function,
which completes the request with its error and returns None when it can't be prepared.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

from services.worker.pipelines.base import PipelineJob
from services.worker.records import InpaintRecord


class Preparer:
    """Prepares waiting requests, in arrival order, within its two bounds; keeps the prepared jobs until taken."""

    def __init__(self, prepare: Callable[[InpaintRecord], Awaitable[PipelineJob | None]], *, concurrency: int,
                 ahead: int, on_prepared: Callable[[], None]) -> None:
        """`on_prepared` is called (on the event loop) whenever a preparation ends, prepared or not."""
        self._prepare = prepare
        self.concurrency = concurrency
        self.ahead = max(ahead, concurrency)
        self._on_prepared = on_prepared
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ready: dict[str, PipelineJob] = {}

    @property
    def in_flight(self) -> int:
        """Preparations running now."""
        return len(self._tasks)

    @property
    def prepared(self) -> int:
        """Prepared requests waiting for the device."""
        return len(self._ready)

    def is_ready(self, record: InpaintRecord) -> bool:
        return record.id in self._ready

    def is_preparing(self, record: InpaintRecord) -> bool:
        return record.id in self._tasks

    def fill(self, waiting: Iterable[InpaintRecord]) -> None:
        """Start preparing the first of `waiting` (in order) that are neither prepared nor being prepared, while
        both bounds allow."""
        for record in waiting:
            if len(self._tasks) >= self.concurrency or len(self._tasks) + len(self._ready) >= self.ahead:
                return
            if record.id not in self._tasks and record.id not in self._ready:
                self._start(record)

    async def job_for(self, record: InpaintRecord) -> PipelineJob | None:
        """`record`'s prepared job, taken: waiting for its preparation if under way, preparing it now (whatever
        the bounds) if it never started. None when it could not be prepared (the record is completed)."""
        if record.state == "COMPLETED" and record.id not in self._tasks:  # failed (or cancelled) meanwhile: its
            self._ready.pop(record.id, None)  # preparation ended, and its sources are gone; nothing to start again
            return None
        if record.id not in self._tasks and record.id not in self._ready:
            self._start(record)
        task = self._tasks.get(record.id)
        if task is not None:
            await asyncio.wait([task])  # not `await task`: a discarded preparation must not cancel the caller
        return self._ready.pop(record.id, None)

    def discard(self, record: InpaintRecord) -> None:
        """Forget `record` (cancelled while it waited): stop its preparation, drop its prepared job."""
        task = self._tasks.pop(record.id, None)
        if task is not None:
            task.cancel()
        self._ready.pop(record.id, None)

    async def close(self) -> None:
        """Stop every preparation and drop every prepared job."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._ready.clear()

    def _start(self, record: InpaintRecord) -> None:
        self._tasks[record.id] = asyncio.create_task(self._run(record), name=f"worker-prepare-{record.id}")

    async def _run(self, record: InpaintRecord) -> None:
        try:
            job = await self._prepare(record)
        finally:
            mine = self._tasks.get(record.id) is asyncio.current_task()
            if mine:
                del self._tasks[record.id]
        if mine and job is not None:
            self._ready[record.id] = job
        self._on_prepared()
