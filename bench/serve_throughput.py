"""The worker on Ray Serve vs the single process: throughput with 1 and 2 model replicas, and what Serve adds to
one request's latency (issue 15).

    python -m bench.serve_throughput [--requests 48] [--concurrency 8] [--side 512] [--runs 20]

Everything runs on this machine, on loopback, with the classic pipeline (OpenCV's fill: CPU work, no model):

1. latency: `--runs` requests one after the other (sync_mode, `/sync/…`), first on the single-process worker
   (uvicorn in this process's thread, as `python -m services.worker` serves it), then on the Serve application
   (1 model replica) on a local Ray cluster (2 CPUs, no dashboard): the median difference is what the Serve path
   adds per request (the proxy, the ingress, the hop to the model replica and back, the stream);
2. throughput: `--requests` requests, `--concurrency` at a time, through the queue protocol (submit, poll,
   result), against the Serve application with 1 model replica, then with 2, in the same run (each replica gets
   `--replica-cpus` logical CPUs; the ingress 0.25).

It prints one line per measurement, and a table last.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import time
from typing import Any

import httpx

from services.backends.fal_queue import FalQueueClient
from services.worker.app import create_app
from services.worker.config import WorkerConfig
from tests.helpers.imagegen import image_pair_uris
from tests.helpers.worker_harness import serve

APP = "fal-ai/fast-sdxl/inpainting"


def _body(side: int, seed: int, *, sync: bool) -> dict[str, Any]:
    image, mask = image_pair_uris((side, side))
    return {"image_url": image, "mask_url": mask, "prompt": "x", "image_size": {"width": side, "height": side},
            "enable_safety_checker": False, "seed": seed, "sync_mode": sync, "format": "jpeg"}


async def latency(base: str, side: int, runs: int) -> list[float]:
    """Seconds per request, one at a time, through the sync endpoint (2 warm-up requests first)."""
    times = []
    async with httpx.AsyncClient(timeout=120) as http:
        for i in range(runs + 2):
            start = time.perf_counter()
            resp = await http.post(f"{base}/sync/{APP}", json=_body(side, i, sync=True))
            resp.raise_for_status()
            if i >= 2:
                times.append(time.perf_counter() - start)
    return times


async def throughput(base: str, side: int, requests: int, concurrency: int) -> float:
    """Requests per second through the queue protocol, `concurrency` at a time."""
    slots = asyncio.Semaphore(concurrency)
    async with FalQueueClient(base_url=base, key=None, poll_interval_s=0.02) as client:
        await client.run(_body(side, 0, sync=True))  # warm

        async def one(seed: int) -> None:
            async with slots:
                await client.run(_body(side, seed, sync=True))

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        return requests / (time.perf_counter() - start)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def main_async(args: argparse.Namespace) -> None:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray import serve as ray_serve

    from services.worker.serve.app import build_app

    rows: list[tuple[str, str]] = []
    config = WorkerConfig(_env_file=None, pipeline="classic")
    async with serve(create_app(config)) as base:
        single = await latency(base, args.side, args.runs)
        single_rps = await throughput(base, args.side, args.requests, args.concurrency)
    print(f"single process: p50 {statistics.median(single) * 1000:.1f} ms, {single_rps:.1f} requests/s", flush=True)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = _free_port()
    ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        measured: dict[int, tuple[list[float], float]] = {}
        for replicas in (1, 2):
            app = build_app({"model_replicas": replicas, "model_num_cpus": args.replica_cpus,
                             "ingress_num_cpus": 0.25, "worker": {"pipeline": "classic"}})
            await asyncio.to_thread(ray_serve.run, app, name=f"r{replicas}", route_prefix=f"/r{replicas}")
            base = f"http://127.0.0.1:{port}/r{replicas}"
            lat = await latency(base, args.side, args.runs) if replicas == 1 else []
            rps = await throughput(base, args.side, args.requests, args.concurrency)
            measured[replicas] = (lat, rps)
            print(f"serve, {replicas} replica(s): {rps:.1f} requests/s", flush=True)
            await asyncio.to_thread(ray_serve.delete, f"r{replicas}")
    finally:
        ray_serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
    serve_lat = measured[1][0]
    added = statistics.median(serve_lat) - statistics.median(single)
    rows += [
        ("single process, one request at a time: p50", f"{statistics.median(single) * 1000:.1f} ms"),
        ("Serve (1 replica), one request at a time: p50", f"{statistics.median(serve_lat) * 1000:.1f} ms"),
        ("Serve's added latency per request (p50 difference)", f"{added * 1000:.1f} ms"),
        (f"single process, {args.concurrency} at a time", f"{single_rps:.1f} requests/s"),
        (f"Serve, 1 model replica, {args.concurrency} at a time", f"{measured[1][1]:.1f} requests/s"),
        (f"Serve, 2 model replicas, {args.concurrency} at a time", f"{measured[2][1]:.1f} requests/s"),
    ]
    print(f"\nclassic pipeline, {args.side}², {args.requests} requests, {os.cpu_count()} CPU cores")
    print("| measurement | figure |\n|---|---|")
    for name, figure in rows:
        print(f"| {name} | {figure} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--replica-cpus", type=float, default=0.5)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
