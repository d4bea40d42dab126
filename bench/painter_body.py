"""What a huge submit costs the mask painter: a body of `--mib` MiB (default 200) POSTed chunked to a link's
/submit, from the page's own origin, while this process serves the painter. Prints the answer, what the client
sent, and the growth of this process's peak RSS (VmHWM, reset just before the request).

    python -m bench.painter_body [--mib 200]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from services.blob import Blob
from services.http_server import LoopServer
from services.painter.app import PainterConfig, create_painter_app
from services.painter.tokens import new_session_id, sign
from services.requester import Requester
from services.store import Store
from tests.helpers.imagegen import encode, photo

PUBLIC = "http://painter.example"
SECRET = b"bench-secret"


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM


async def main(mib: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with await Store.open(Path(tmp) / "painter.sqlite3") as store:
            async def on_submit(*args: object) -> int:
                return 1

            app = create_painter_app(PainterConfig(secret=SECRET, sessions=store.painter_sessions,
                                                   load_image=store.blobs.get, on_submit=on_submit,
                                                   public_url=PUBLIC))
            server = LoopServer(app)
            base = await server.start()
            session = await store.painter_sessions.create(
                new_session_id(), who=Requester(guild_id=1, channel_id=2, user_id=3),
                image=Blob(encode(photo(64, 48), "PNG"), "image/png"), params={"prompt": "x"},
                expires_at=time.time() + 600)
            url = f"{base}/paint/{sign(SECRET, session)}"
            total, chunk, sent = mib << 20, b" " * (1 << 20), [0]

            async def body() -> AsyncIterator[bytes]:
                while sent[0] < total:
                    sent[0] += len(chunk)
                    yield chunk

            async with httpx.AsyncClient(timeout=120) as client:
                await client.get(url)  # this browser claims the link
                await asyncio.sleep(0.2)
                _reset_peak()
                before = _rss_mib("VmRSS:")
                began = time.perf_counter()
                answer = await client.post(f"{url}/submit", content=body(), headers={"Origin": PUBLIC})
                took = time.perf_counter() - began
            print(f"status {answer.status_code}, client sent {sent[0] >> 20} MiB, peak RSS +"
                  f"{_rss_mib('VmHWM:') - before:.0f} MiB (after: +{_rss_mib('VmRSS:') - before:.0f} MiB), "
                  f"{took:.2f} s")
            await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=200)
    asyncio.run(main(parser.parse_args().mib))
