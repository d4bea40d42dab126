"""Benchmark: image+mask intake for a 1024² PNG pair, and the job store's round trip and transition rate.

    .venv/bin/python -m bench.intake [--runs 60]

Prints p50/p95 in ms. Targets (issue "Service core"): intake p50 ≤ 30 ms for 1024² on a 2-core machine;
store ≥ 500 job transitions/s.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.images import IntakeLimits, prepare_inputs, prepare_inputs_async
from services.job_state import JobStatus
from services.store import Store
from tests.helpers.imagegen import SHARED_EXAMPLES, box_mask, encode, photo

LIMITS = IntakeLimits()


def _pair() -> tuple[bytes, bytes, str]:
    """A 1024² photo PNG and its mask: the real example photo upscaled when ../shared is there."""
    source = SHARED_EXAMPLES / "overture-creations-5sI6fQgYIuo.png"
    if source.exists():
        from PIL import Image

        im = Image.open(source).convert("RGB").resize((1024, 1024), Image.Resampling.LANCZOS)
        mask = Image.open(source.with_name(source.stem + "_mask.png")).resize((1024, 1024))
        return encode(im, "PNG"), encode(mask, "PNG"), "shared example photo upscaled to 1024²"
    return encode(photo(1024, 1024), "PNG"), encode(box_mask((1024, 1024), (300, 300, 700, 760))), "synthetic 1024²"


def _pct(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return f"p50 {statistics.median(ms):6.2f} ms   p95 {p95:6.2f} ms   (n={len(ms)})"


async def _time(fn: Callable[[], Awaitable[object]], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - start)
    return samples


async def main(runs: int) -> None:
    image, mask, what = _pair()
    print(f"python {platform.python_version()} on {platform.machine()}, {__import__('os').cpu_count()} cores")
    print(f"input: {what}; image {len(image) / 1024:.0f} KiB, mask {len(mask) / 1024:.0f} KiB")

    for _ in range(3):
        prepare_inputs(image, mask, limits=LIMITS)
    sync_samples = []
    for _ in range(runs):
        start = time.perf_counter()
        prepare_inputs(image, mask, limits=LIMITS)
        sync_samples.append(time.perf_counter() - start)
    print(f"intake, in the calling thread:       {_pct(sync_samples)}")

    async def intake() -> object:
        return await prepare_inputs_async(image, mask, limits=LIMITS)
    print(f"intake, async (worker thread):       {_pct(await _time(intake, runs))}")

    prepared = prepare_inputs(image, mask, limits=LIMITS)
    with tempfile.TemporaryDirectory() as tmp:
        async with await Store.open(Path(tmp) / "bench.sqlite3") as db:
            store = db.jobs
            blobs = {"image": prepared.image_blob, "mask": prepared.mask_blob}

            async def round_trip() -> object:
                job = await store.create(user_id=1, guild_id=2, channel_id=3, backend="fal",
                                             input={"prompt": "p", "image_url": "blob:image"}, blobs=blobs)
                await store.transition(job.id, JobStatus.SUBMITTED, backend_request_id="r", status_url="s",
                                       response_url="r", cancel_url="c")
                await store.transition(job.id, JobStatus.RUNNING)
                await store.add_events(job.id, [("log", f"step {i}/23", None) for i in range(1, 24)])
                await store.transition(job.id, JobStatus.SUCCEEDED, result={"images": [], "seed": 1})
                await store.get(job.id)
                return await store.blobs(job.id)

            print(f"store round trip (create+3 transitions+23 logs+reads): {_pct(await _time(round_trip, runs))}")

            n = 400
            jobs = [await store.create(user_id=i, input={"i": i}, backend="fal") for i in range(n)]
            start = time.perf_counter()
            for job in jobs[: n // 2]:
                await store.transition(job.id, JobStatus.SUBMITTED)
                await store.transition(job.id, JobStatus.RUNNING)
                await store.transition(job.id, JobStatus.SUCCEEDED)
            seq = time.perf_counter() - start

            async def drive(job_id: int) -> None:
                await store.transition(job_id, JobStatus.SUBMITTED)
                await store.transition(job_id, JobStatus.RUNNING)
                await store.transition(job_id, JobStatus.SUCCEEDED)

            start = time.perf_counter()
            await asyncio.gather(*(drive(job.id) for job in jobs[n // 2:]))
            conc = time.perf_counter() - start
            print(f"store transitions, sequential:       {3 * (n // 2) / seq:8.0f} /s")
            print(f"store transitions, 200 tasks at once: {3 * (n // 2) / conc:8.0f} /s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=60)
    asyncio.run(main(parser.parse_args().runs))
