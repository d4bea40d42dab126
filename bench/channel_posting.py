"""Benchmark: 20 jobs finishing in one Discord channel at 1.5 jobs/s, against Discord's per-channel budget.

    .venv/bin/python -m bench.channel_posting [--jobs 20] [--rate 1.5] [--scale 1]

The bot runs through discord.py's real HTTP client against the in-memory Discord of tests/helpers, which keeps
Discord's budget of 5 message operations (posts and edits together) per 5 seconds per channel and answers 429 with
Retry-After and bucket headers past it; the backend is the fal-protocol test server on 127.0.0.1. Four users
start the jobs together; once all are at the backend (their progress messages posted, queue positions being
shown), the backend finishes them at `--rate` per second. Measured per job: from its end (the "succeeded" state
in the store) to the channel message carrying its result; and the 429 answers Discord gave.

Two configurations: the posting queue as shipped (`paced`: cogs/posting.py keeping 5 per 5 s), and the same
bot with the queue bypassed (`unpaced`: every operation sent as soon as it is asked for, concurrently, with only
discord.py's own rate-limit handling, as before the queue existed; progress edits are still throttled per job).
`--scale 5` runs everything five times faster (budget, rate, progress interval) for a quick look; figures are
reported in real-scale seconds.
Target (issue "Ready for real Discord"): every result within 5 s of its job's end, zero 429s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import platform
import statistics
import tempfile
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot import InpaintBot
from services.config import BotConfig
from services.container import build_services
from tests.helpers.bot_env import results_by_job
from tests.helpers.discord_harness import Driver, FakeDiscord, Place, user
from tests.helpers.fal_server import FalTestServer
from tests.helpers.imagegen import box_mask, encode, photo
from tests.helpers.waits import wait_until

KEY = "bench-id:bench-secret"
PLACE = Place(guild_id=1, channel_id=2)
BUDGET = (5, 5.0)


@dataclass
class Outcome:
    latencies: list[float]  # real-scale seconds from job end to its result in the channel
    not_started: int  # jobs refused at the start (their progress message couldn't be posted)
    missing: int  # started jobs whose result never arrived (within the bench's deadline)
    throttled: int  # 429 answers
    result_messages: int
    operations: int  # channel operations Discord accepted (posts and edits)


async def run(jobs: int, rate: float, scale: float, *, paced: bool) -> Outcome:
    per = BUDGET[1] / scale
    async with FalTestServer(key=KEY, queue_polls=10**9, progress_logs=2) as server:
        with tempfile.TemporaryDirectory() as tmp:
            config = BotConfig(_env_file=None, discord_token="bench", fal_key=KEY, fal_queue_base=server.base_url,
                               database_path=Path(tmp) / "bench.sqlite3", backend_poll_interval_s=0.05 / scale,
                               painter_port=0, channel_budget_ops=BUDGET[0], channel_budget_s=per,
                               progress_edit_interval_s=2.0 / scale, dispatch_concurrency=jobs)
            fake = FakeDiscord()
            fake.channel_budget = (BUDGET[0], per)
            image, mask = encode(photo(512, 384), "PNG"), encode(box_mask((512, 384), (128, 96, 256, 192)), "PNG")
            with fake.installed():
                async with build_services(config) as services, InpaintBot(config, services) as bot:
                    if not paced:
                        bot.posting.submit = _at_once  # type: ignore[method-assign]
                    await bot.login("bench")
                    await services.store.server_settings.save(PLACE.guild_id, {"user_concurrent": jobs,
                                                                               "server_concurrent": jobs})
                    driver = Driver(fake, bot, PLACE)
                    driver.patience_s = 60 * jobs / scale  # "Queued as job #n" comes once its progress message is up
                    people = [user(100 + i, f"artist{i}") for i in range(4)]
                    await asyncio.gather(*(driver.slash(
                        people[i % 4], "inpaint", prompt=f"job {i}",
                        image=fake.upload(PLACE.channel_id, "photo.png", image, "image/png"),
                        mask=fake.upload(PLACE.channel_id, "mask.png", mask, "image/png")) for i in range(jobs)))
                    with contextlib.suppress(AssertionError):  # a job whose progress message failed never starts
                        await wait_until(lambda: len(server.requests) == jobs, what="all jobs at the backend",
                                         within_s=10 / scale)
                    started = len(server.requests)
                    for request in list(server.requests.values()):
                        request.queue_polls_left = 0
                        await asyncio.sleep(1 / (rate * scale))
                    with contextlib.suppress(AssertionError):  # what never arrives is counted as missing
                        await wait_until(lambda: len(results_by_job(fake, PLACE.channel_id)) == started,
                                         what="results", within_s=300 / scale)
                    posted = results_by_job(fake, PLACE.channel_id)
                    latencies = []
                    for job_id in posted:
                        events = await services.store.jobs.events(job_id)
                        ended = next(e.created_at for e in events if e.kind == "state" and e.message == "succeeded")
                        latencies.append((posted[job_id].created_at - ended) * scale)
                    return Outcome(latencies, jobs - started, started - len(posted), len(fake.rate_limited),
                                   len({m.id for m in posted.values()}), len(fake.channel_log))


def _at_once(channel_id: int, op: Callable[[], Awaitable[Any]], *, priority: int, key: Hashable | None = None,
             merge: Any = None) -> asyncio.Future[Any]:
    """`ChannelPosting.submit` bypassed: the operation starts now."""
    return asyncio.ensure_future(op())


def _summary(name: str, outcome: Outcome) -> str:
    s = sorted(outcome.latencies) or [float("nan")]
    p95 = s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]
    return (f"{name:8s} result after job end: min {s[0]:5.2f} s  p50 {statistics.median(s):5.2f} s  p95 {p95:5.2f} s  "
            f"max {s[-1]:5.2f} s | not started {outcome.not_started} | missing {outcome.missing} | "
            f"429s {outcome.throttled} | result messages {outcome.result_messages} | "
            f"channel operations {outcome.operations}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--rate", type=float, default=1.5, help="jobs finishing per second (real scale)")
    parser.add_argument("--scale", type=float, default=1.0, help="run this many times faster")
    parser.add_argument("--only", choices=("paced", "unpaced"))
    args = parser.parse_args()
    logging.disable(logging.ERROR)
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores; "
          f"{args.jobs} jobs at {args.rate}/s, budget {BUDGET[0]} per {BUDGET[1]} s, scale {args.scale}")
    for name in ("paced", "unpaced"):
        if args.only in (None, name):
            print(_summary(name, asyncio.run(run(args.jobs, args.rate, args.scale, paced=name == "paced"))))


if __name__ == "__main__":
    main()
