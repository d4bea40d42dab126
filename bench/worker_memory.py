"""Benchmark: the worker's resident memory under a deep queue and under hostile inputs (issue 13, item 2).

    .venv/bin/python -m bench.worker_memory [--scenario queued|hostile|both] [--queued 200] [--hostile 30]
                                            [--concurrency 8] [--hostile-concurrency 4]

Starts the real worker (`python -m services.worker`, classic pipeline, on 127.0.0.1, in a subprocess with its own
temporary WORKER_DATA_DIR), submits one load over HTTP, samples the worker process's RSS every 50 ms (psutil when
installed, else /proc/<pid>/status), waits until every request has completed and its result was fetched, and
prints baseline (after a warm-up request), peak and after (2 s after the queue emptied) figures. Each scenario gets
a fresh worker.

- queued: `--queued` 1024×1024 requests (a noisy 1024² PNG, 3 MiB, as a data URI, and a small mask), submitted
  as fast as the client can (`--concurrency` at once), so that nearly all of them wait in the queue together.
- hostile: `--hostile` requests each carrying a 20 MiB PNG (random pixels: every byte must be decoded) as a data
  URI, `--hostile-concurrency` uploads at once.

Target (issue 13): RSS grows by at most about 300 MiB, and comes back to (near) the baseline once they end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
APP = "fal-ai/fast-sdxl/inpainting"
MiB = 1024 * 1024


def rss_reader(pid: int) -> Callable[[], int]:
    """Bytes resident for `pid`: psutil when installed, else /proc/<pid>/status."""
    try:
        import psutil  # type: ignore[import-untyped]

        process = psutil.Process(pid)
        return lambda: int(process.memory_info().rss)
    except ImportError:
        status = Path(f"/proc/{pid}/status")

        def read() -> int:
            for line in status.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
            raise RuntimeError("no VmRSS line")

        return read


class Sampler:
    """Samples RSS every `interval_s` in a thread; `peak` is the highest seen since `reset()`."""

    def __init__(self, read: Callable[[], int], interval_s: float = 0.05) -> None:
        self.read, self.interval_s = read, interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def reset(self) -> None:
        self.peak = self.read()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.peak = max(self.peak, self.read())
            except (OSError, RuntimeError):
                return


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def small_mask(size: tuple[int, int]) -> bytes:
    mask = Image.new("L", size, 0)
    mask.paste(255, (size[0] // 2 - 32, size[1] // 2 - 32, size[0] // 2 + 32, size[1] // 2 + 32))
    return png(mask)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path


def start_worker(folder: Path, **settings: str) -> Worker:
    """`python -m services.worker` with the classic pipeline, reading no .env (it runs in `folder`)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    env |= {"PYTHONPATH": str(REPO), "PIPELINE": "classic", "HOST": "127.0.0.1", "PORT": str(port),
            "WORKER_DATA_DIR": str(folder / "data"), "RESULT_TTL_S": "3600", **settings}
    log_path = folder / "worker.log"
    process = subprocess.Popen([sys.executable, "-m", "services.worker"], cwd=folder, env=env,
                               stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the worker exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return Worker(process, base, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the worker did not start")


async def submit_all(http: httpx.AsyncClient, bodies: list[dict[str, Any]], concurrency: int) -> list[dict[str, Any]]:
    """Submit every body (`concurrency` at once); the handles, in order. A 503 is retried after its Retry-After."""
    slots = asyncio.Semaphore(concurrency)

    async def one(body: dict[str, Any]) -> dict[str, Any]:
        async with slots:
            while True:
                resp = await http.post(f"/{APP}", json=body)
                if resp.status_code == 503:
                    await asyncio.sleep(float(resp.headers.get("retry-after", "1")))
                    continue
                resp.raise_for_status()
                handle: dict[str, Any] = resp.json()
                return handle

    return list(await asyncio.gather(*(one(body) for body in bodies)))


async def wait_idle(http: httpx.AsyncClient) -> None:
    """Poll /health (the worker's only signal across processes) until nothing waits or runs."""
    for _ in range(36_000):
        if not (await http.get("/health")).json()["queue_length"]:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("the worker never emptied its queue")


async def fetch_results(http: httpx.AsyncClient, handles: list[dict[str, Any]]) -> tuple[int, int]:
    """Fetch every result (and its first image file); (succeeded, failed) requests."""
    ok = failed = 0
    for handle in handles:
        resp = await http.get(handle["response_url"])
        if resp.status_code != 200:
            failed += 1
            continue
        ok += 1
        url = resp.json()["images"][0]["url"]
        if not url.startswith("data:"):
            (await http.get(url)).raise_for_status()
    return ok, failed


async def measure(name: str, bodies: list[dict[str, Any]], concurrency: int, settings: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-worker-memory-") as tmp:
        worker = start_worker(Path(tmp), **settings)
        try:
            read = rss_reader(worker.process.pid)
            async with httpx.AsyncClient(base_url=worker.base_url, timeout=600,
                                         limits=httpx.Limits(max_connections=concurrency + 4)) as http:
                warm = dict(bodies[0], image_size={"width": 64, "height": 64})
                warm |= {"image_url": data_uri(png(noise(64, 64, 0))), "mask_url": data_uri(small_mask((64, 64)))}
                await submit_all(http, [warm], 1)
                await wait_idle(http)
                await asyncio.sleep(2)
                baseline = read()
                with Sampler(read) as sampler:
                    sampler.reset()
                    start = time.perf_counter()
                    handles = await submit_all(http, bodies, concurrency)
                    submitted = time.perf_counter() - start
                    await wait_idle(http)
                    ran = time.perf_counter() - start
                    ok, failed = await fetch_results(http, handles)
                    peak = sampler.peak
                await asyncio.sleep(2)
                after = read()
        finally:
            worker.process.terminate()
            worker.process.wait(30)
    print(f"{name}: {len(bodies)} requests ({ok} completed, {failed} failed), submitted in {submitted:.1f} s, "
          f"all done in {ran:.1f} s")
    print(f"  RSS baseline {baseline / MiB:7.1f} MiB   peak {peak / MiB:7.1f} MiB (+{(peak - baseline) / MiB:.1f})   "
          f"after {after / MiB:7.1f} MiB (+{(after - baseline) / MiB:.1f})")


def queued_bodies(count: int) -> list[dict[str, Any]]:
    image = data_uri(png(noise(1024, 1024, 1)))
    mask = data_uri(small_mask((1024, 1024)))
    print(f"queued: each request carries a {len(image) / MiB:.1f} MiB image data URI (1024² noise PNG) and a "
          f"{len(mask) / 1024:.1f} KiB mask")
    return [{"image_url": image, "mask_url": mask, "prompt": "a red door", "image_size": "square_hd",
             "enable_safety_checker": False, "seed": i} for i in range(count)]


def hostile_bodies(count: int) -> list[dict[str, Any]]:
    im = noise(2560, 2730, 2)  # ≈ 20 MiB of incompressible pixels
    data = png(im)
    image = data_uri(data)
    mask = data_uri(small_mask(im.size))
    print(f"hostile: each request carries a {len(data) / MiB:.1f} MiB PNG ({im.width}×{im.height}) as a "
          f"{len(image) / MiB:.1f} MiB data URI")
    return [{"image_url": image, "mask_url": mask, "prompt": "x", "enable_safety_checker": False, "seed": i}
            for i in range(count)]


async def main(args: argparse.Namespace) -> None:
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; worker: classic pipeline, "
          f"PREPARE_CONCURRENCY={args.prepare_concurrency}")
    common = {"PREPARE_CONCURRENCY": str(args.prepare_concurrency), "MAX_IMAGE_BYTES": str(25 * MiB)}
    if args.scenario in ("queued", "both"):
        await measure("queued", queued_bodies(args.queued), args.concurrency,
                      common | {"MAX_QUEUE": str(args.queued + 8)})
    if args.scenario in ("hostile", "both"):
        await measure("hostile", hostile_bodies(args.hostile), args.hostile_concurrency,
                      common | {"MAX_QUEUE": str(args.hostile + 8)})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=("queued", "hostile", "both"), default="both")
    parser.add_argument("--queued", type=int, default=200)
    parser.add_argument("--hostile", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=8, help="uploads at once (queued)")
    parser.add_argument("--hostile-concurrency", type=int, default=4, help="uploads at once (hostile)")
    parser.add_argument("--prepare-concurrency", type=int, default=2)
    asyncio.run(main(parser.parse_args()))
