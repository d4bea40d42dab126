"""Benchmark: what the URL policy (`services.url_fetch`) costs per download, and how long a trickling server holds
a download before and after the total deadline.

    .venv/bin/python -m bench.url_fetch [--runs 50]

1. A 1 MiB file from a keep-alive server on loopback: the old path (one shared `httpx.AsyncClient`, redirects
   followed, no address check) against `fetch_url` (a connection pool per download, the name resolved and
   checked, the socket connected to the checked address). Prints p50/p95 in ms.
2. A server sending one byte every 0.5 s of a declared 30: the old path (a per-read timeout of 20 s) against
   `fetch_url` with a 3 s total deadline. Prints the seconds each held the download.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import platform
import statistics
import time
from collections.abc import Awaitable, Callable

import httpx
from aiohttp import web

from services.url_fetch import FetchError, fetch_policy, fetch_url

SIZE = 1024 * 1024
CAP = 64 * 1024 * 1024


async def _old_download(http: httpx.AsyncClient, url: str, timeout_s: float) -> bytes:
    """The download as `services.images._download` did it before the policy (per-read timeout)."""
    async with http.stream("GET", url, timeout=timeout_s, follow_redirects=True) as resp:
        return b"".join([chunk async for chunk in resp.aiter_bytes()])


async def _timings(runs: int, once: Callable[[], Awaitable[bytes]]) -> tuple[float, float]:
    for _ in range(3):
        await once()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        assert len(await once()) == SIZE
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1]


async def main(runs: int) -> None:
    body = bytes(range(256)) * (SIZE // 256)

    async def file(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="image/png")

    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "30"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):  # the client gave up
            for _ in range(30):
                await resp.write(b"x")
                await asyncio.sleep(0.5)
        return resp

    app = web.Application()
    app.router.add_get("/file.png", file)
    app.router.add_get("/slow.png", trickle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    policy = fetch_policy("127.0.0.1")
    print(f"{platform.node()}: {platform.machine()}, Python {platform.python_version()}; {runs} runs, 1 MiB each")
    try:
        async with httpx.AsyncClient() as http:
            old = await _timings(runs, lambda: _old_download(http, f"{base}/file.png", 20.0))
        new = await _timings(runs, lambda: fetch_url(f"{base}/file.png", policy=policy, max_bytes=CAP,
                                                     deadline_s=20.0))
        print(f"old shared client, no checks:  p50 {old[0]:.2f} ms  p95 {old[1]:.2f} ms")
        print(f"fetch_url, checked, own pool:  p50 {new[0]:.2f} ms  p95 {new[1]:.2f} ms")

        start = time.perf_counter()
        async with httpx.AsyncClient() as http:
            await _old_download(http, f"{base}/slow.png", 20.0)
        print(f"trickle, old per-read timeout 20 s: held {time.perf_counter() - start:.1f} s, then succeeded")
        start = time.perf_counter()
        try:
            await fetch_url(f"{base}/slow.png", policy=policy, max_bytes=CAP, deadline_s=3.0)
        except FetchError as exc:
            print(f"trickle, fetch_url deadline 3 s:    held {time.perf_counter() - start:.1f} s, then failed ({exc})")
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    asyncio.run(main(parser.parse_args().runs))
