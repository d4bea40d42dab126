"""Soak: 100 jobs while the bot is killed with SIGKILL again and again, then 100 jobs while the backend is killed
and kept down for up to a minute. Prints, for each, jobs done / failed / stuck / lost / posted twice / run twice
/ orphaned at the backend — all zero but done.

    python -m bench.soak [--jobs 100] [--bot-kills 6] [--outage-s 60]

Three processes, all real, on loopback:
- the backend: the fal-protocol test server (`tests/helpers/fal_server.py`) in its own process, answering a
  repeated Idempotency-Key with the request it has (as our worker does); it writes what it holds to a file, so the
  orphans can be counted;
- the bot: the dispatcher on the SQLite store (`services/dispatch.py`, as the bot builds it), with a "channel" that
  is an append-only file: a result is posted (a line, fsync'd) and then recorded in the store, in the order the
  Discord layer does it;
- this driver, which queues the jobs in the store, kills and restarts the other two, and counts.

What the figures mean: "lost" is a job that succeeded but whose result never reached the channel; "posted twice"
a job with two lines in the channel; "run twice" a job the backend holds two requests for at once; "orphaned" a
request at the backend that no job follows (it would run, and cost, for nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

BOT_POLL_S = 0.1


# --- the backend process ------------------------------------------------------------------------------

async def backend_main(port: int, state: Path, queue_polls: int, progress_logs: int) -> None:
    from tests.helpers.fal_server import FalTestServer

    async with FalTestServer(key=None, queue_polls=queue_polls, progress_logs=progress_logs, port=port) as server:
        server.honour_keys = True
        server.health = {"status": "ok", "pipeline": "classic", "safety_checker": False, "idempotency_keys": True}
        while True:
            key_of = {rid: key for key, rid in server.keys.items()}
            held = {rid: {"state": r.state, "key": key_of.get(rid)} for rid, r in server.requests.items()}
            tmp = state.with_suffix(".tmp")
            tmp.write_text(json.dumps(held))
            tmp.replace(state)
            await asyncio.sleep(0.1)


# --- the bot process ----------------------------------------------------------------------------------

async def bot_main(database: Path, backend_url: str, channel: Path, concurrency: int) -> None:
    import httpx

    from services.backend_select import BackendChoice, CapabilityProbe
    from services.backends.fal_queue import FalQueueClient, RetryPolicy
    from services.blob import Blob
    from services.dispatch import Dispatcher, QuietListener
    from services.job_state import Job
    from services.modlog import ModerationLog
    from services.schema import InpaintOutput
    from services.store import Store

    class FileChannel(QuietListener):
        """Posts a result as one fsync'd line, then records it, as the Discord layer posts and then records."""

        def __init__(self, store: Store) -> None:
            self.store = store

        async def job_succeeded(self, job: Job, output: InpaintOutput, images: list[Blob], *,
                                spoiler: bool = False) -> None:
            if (await self.store.jobs.get(job.id)).result_message_id is not None:
                return
            with channel.open("a") as f:
                f.write(json.dumps({"job": job.id, "images": len(images)}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            await self.store.jobs.set_result_message(job.id, job.id)

    async with await Store.open(database) as store, httpx.AsyncClient() as http:
        backend = FalQueueClient(base_url=backend_url, http=http, poll_interval_s=BOT_POLL_S,
                                 retry=RetryPolicy(3, 0.1, 0.5), request_timeout_s=5.0)
        probe = CapabilityProbe(BackendChoice("worker", backend_url, None), backend_url, http)

        async def keys_honoured() -> bool | None:
            return (await probe.current(recheck_unknown=True)).idempotency_keys

        dispatcher = Dispatcher(store, backend, http, ModerationLog(store.modlog), concurrency=concurrency,
                                outage_s=120.0, keys_honoured=keys_honoured)
        await dispatcher.start(FileChannel(store))
        await asyncio.Event().wait()


# --- the driver ---------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process of this module, started again after each kill."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.soak", *self.args, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        self.starts += 1

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()


async def _queue_jobs(database: Path, n: int) -> None:
    from services.blob import Blob
    from services.store import Store
    from tests.helpers.imagegen import box_mask, encode, photo

    inputs = {"image": Blob(encode(photo(64, 64)), "image/png"),
              "mask": Blob(encode(box_mask((64, 64), (8, 8, 40, 40))), "image/png")}
    async with await Store.open(database) as store:
        await store.server_settings.save(1, {"user_concurrent": 2, "server_concurrent": 8})
        for i in range(n):
            await store.jobs.create(user_id=i % 10, guild_id=1, channel_id=2, backend="worker", blobs=inputs,
                                    input={"prompt": f"soak {i}", "image_url": "blob:image", "mask_url": "blob:mask",
                                           "image_size": "square", "enable_safety_checker": False})


def _jobs(database: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(
            "SELECT id, status, backend_request_id, result_message_id, attempts, error FROM jobs")]
    finally:
        conn.close()


async def _until_all_ended(database: Path, within_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        try:
            if all(j["status"] in ("succeeded", "failed", "cancelled", "blocked") and
                   (j["status"] != "succeeded" or j["result_message_id"] is not None) for j in _jobs(database)):
                return time.monotonic() - start
        except sqlite3.OperationalError:
            pass
        await asyncio.sleep(0.25)
    return time.monotonic() - start


def _count(database: Path, channel: Path, state: Path) -> dict[str, int]:
    jobs = _jobs(database)
    posts = Counter(json.loads(line)["job"] for line in channel.read_text().splitlines()) if channel.exists() \
        else Counter()
    held: dict[str, dict[str, Any]] = json.loads(state.read_text()) if state.exists() else {}
    followed = {j["backend_request_id"] for j in jobs if j["backend_request_id"]}
    per_job = Counter(str(h["key"]).split("-")[1] for h in held.values() if h["key"])
    done = [j for j in jobs if j["status"] == "succeeded" and posts[j["id"]] == 1]
    return {
        "jobs": len(jobs),
        "done": len(done),
        "failed": sum(1 for j in jobs if j["status"] in ("failed", "cancelled", "blocked")),
        "stuck": sum(1 for j in jobs if j["status"] in ("queued", "submitted", "running")),
        "lost": sum(1 for j in jobs if j["status"] == "succeeded" and posts[j["id"]] == 0),
        "posted_twice": sum(1 for n in posts.values() if n > 1),
        "run_twice": sum(1 for n in per_job.values() if n > 1),
        "orphaned_at_backend": sum(1 for rid in held if rid not in followed),
        "resubmitted": sum(1 for j in jobs if j["attempts"] > 1),
    }


async def soak(jobs: int, bot_kills: int, outage_s: float, seed: int) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        root = Path(tmp)
        for phase in ("bot", "backend"):
            folder = root / phase
            folder.mkdir()
            database, channel, state = folder / "bot.sqlite3", folder / "channel.jsonl", folder / "backend.json"
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            backend = Proc("backend", "--port", str(port), "--state", str(state))
            bot = Proc("bot", "--database", str(database), "--backend", url, "--channel", str(channel))
            await _queue_jobs(database, jobs)
            await backend.start()
            await asyncio.sleep(1.0)
            await bot.start()
            started = time.monotonic()
            if phase == "bot":
                for _ in range(bot_kills):
                    await asyncio.sleep(rng.uniform(1.5, 4.0))
                    await bot.kill()
                    await bot.start()
            else:
                await asyncio.sleep(3.0)  # jobs in flight at the backend
                await backend.kill()
                state.unlink(missing_ok=True)
                await asyncio.sleep(outage_s)
                await backend.start()
            await _until_all_ended(database, within_s=600)
            await asyncio.sleep(1.0)  # the backend's last state written
            elapsed = time.monotonic() - started
            await bot.kill()
            await backend.kill()
            figures = _count(database, channel, state)
            what = (f"bot killed (SIGKILL) {bot_kills} times" if phase == "bot"
                    else f"backend killed and kept down {outage_s:g} s")
            print(json.dumps({"phase": what, "seconds": round(elapsed, 1), "bot_starts": bot.starts,
                              "backend_starts": backend.starts, **figures}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="role")
    b = sub.add_parser("backend")
    b.add_argument("--port", type=int, required=True)
    b.add_argument("--state", type=Path, required=True)
    b.add_argument("--queue-polls", type=int, default=5)
    b.add_argument("--progress-logs", type=int, default=5)
    c = sub.add_parser("bot")
    c.add_argument("--database", type=Path, required=True)
    c.add_argument("--backend", required=True)
    c.add_argument("--channel", type=Path, required=True)
    c.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--bot-kills", type=int, default=6)
    parser.add_argument("--outage-s", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    if args.role == "backend":
        asyncio.run(backend_main(args.port, args.state, args.queue_polls, args.progress_logs))
    elif args.role == "bot":
        asyncio.run(bot_main(args.database, args.backend, args.channel, args.concurrency))
    else:
        asyncio.run(soak(args.jobs, args.bot_kills, args.outage_s, args.seed))


if __name__ == "__main__":
    main()
