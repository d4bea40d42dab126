"""Benchmark: what the dispatcher adds per job, and the fair queue's cost.

    .venv/bin/python -m bench.dispatch [--jobs 200] [--users 10]

200 queued jobs from 10 users run through the real Dispatcher (store, fair queue, caps, result storage) against
the fal-protocol test server on 127.0.0.1, which finishes each request at its first status poll. Jobs run one
at a time so each is timed on its own. Per job: the time from the previous job's end to this job's end, minus
the time spent inside the backend client's own calls (submit, status, result over HTTP). What remains is the
dispatcher's work: scheduling, the state transitions and events in SQLite, and downloading and storing the
output. Target (issue "Moderation and fairness"): p50 ≤ 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from services.backends.fal_queue import FalQueueClient, QueueUpdate
from services.blob import Blob
from services.config import BotConfig
from services.container import build_services
from services.dispatch import QuietListener
from services.fairqueue import FairQueue, QueuedJob
from services.job_state import Job
from services.schema import InpaintOutput
from tests.helpers.fal_server import FalTestServer
from tests.helpers.imagegen import box_mask, encode, photo


class TimedBackend:
    """Wraps the real client's calls (`submit`, and `follow_as`, which `follow` goes through), adding up the time
    spent in them (to subtract from the dispatcher's)."""

    def __init__(self, client: FalQueueClient) -> None:
        self.spent = 0.0
        submit, follow_as = client.submit, client.follow_as

        async def timed_submit(body: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await submit(body, **kwargs)
            finally:
                self.spent += time.perf_counter() - start

        async def timed_follow_as(handle: Any, model: Any,
                                  on_update: Callable[[QueueUpdate], Awaitable[None]] | None = None) -> Any:
            start = time.perf_counter()
            try:
                return await follow_as(handle, model, on_update)
            finally:
                self.spent += time.perf_counter() - start

        client.submit = timed_submit  # type: ignore[method-assign]
        client.follow_as = timed_follow_as  # type: ignore[method-assign]


class Clock(QuietListener):
    def __init__(self, backend: TimedBackend, total: int) -> None:
        self.backend = backend
        self.total = total
        self.last = time.perf_counter()
        self.overheads: list[float] = []
        self.done = asyncio.Event()

    async def job_succeeded(self, job: Job, output: InpaintOutput, images: list[Blob], *,
                            spoiler: bool = False) -> None:
        now = time.perf_counter()
        self.overheads.append(now - self.last - self.backend.spent)
        self.backend.spent = 0.0
        self.last = now
        if len(self.overheads) == self.total:
            self.done.set()

    async def job_ended(self, job: Job) -> None:
        raise RuntimeError(f"job {job.id} ended without a result: {job.error}")


def _pct(samples: list[float], unit: float = 1000, name: str = "ms") -> str:
    values = sorted(s * unit for s in samples)
    p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    return f"p50 {statistics.median(values):7.3f} {name}   p95 {p95:7.3f} {name}   (n={len(values)})"


async def dispatcher_overhead(jobs: int, users: int) -> list[float]:
    async with FalTestServer(key=None, queue_polls=0, progress_logs=0) as server:
        with tempfile.TemporaryDirectory() as tmp:
            config = BotConfig(_env_file=None, worker_url=server.base_url, database_path=Path(tmp) / "bench.sqlite3",
                               backend_poll_interval_s=0.001, dispatch_concurrency=1, painter_enabled=False)
            async with build_services(config) as services:
                store = services.store
                await store.server_settings.save(1, {"user_concurrent": 2, "server_concurrent": 4})
                blobs = {"image": Blob(encode(photo(64, 64)), "image/png"),
                         "mask": Blob(encode(box_mask((64, 64), (8, 8, 40, 40))), "image/png")}
                for n in range(jobs):
                    await store.jobs.create(user_id=n // (jobs // users), guild_id=1, channel_id=2, backend="worker",
                                            blobs=blobs, input={"prompt": "x", "image_url": "blob:image",
                                                                "mask_url": "blob:mask", "image_size": "square"})
                clock = Clock(TimedBackend(services.backend), jobs)
                clock.last = time.perf_counter()
                await services.dispatcher.start(clock)  # recovery picks up the queued jobs
                await asyncio.wait_for(clock.done.wait(), 300)
                return clock.overheads[5:]  # the first few warm up connections and caches


def fair_queue_pop(jobs: int, users: int) -> list[float]:
    samples = []
    queue = FairQueue()
    for n in range(jobs):
        queue.push(QueuedJob(n, n % users, 1))
    running: dict[int, int] = {}
    while len(queue):
        start = time.perf_counter()
        item = queue.pop(lambda q: running.get(q.user_id, 0) < 2)
        samples.append(time.perf_counter() - start)
        assert item is not None
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--users", type=int, default=10)
    args = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores")
    print(f"dispatcher overhead per job ({args.jobs} jobs, {args.users} users): "
          f"{_pct(asyncio.run(dispatcher_overhead(args.jobs, args.users)))}")
    print(f"fair queue pop ({args.jobs} queued, {args.users} users): "
          f"{_pct(fair_queue_pop(args.jobs, args.users), 1e6, 'µs')}")


if __name__ == "__main__":
    main()
