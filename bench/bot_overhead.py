"""Benchmark: the bot's own overhead per job, with an instant backend.

    .venv/bin/python -m bench.bot_overhead [--jobs 40] [--size 512]

Drives `/inpaint` through discord.py's real interaction handling (the in-memory Discord of
tests/discord_harness.py) against the fal-protocol test server on 127.0.0.1, configured to complete every
request on its first status poll. Measured per job: from the interaction arriving to the result message
posted in the channel. That covers the attachment downloads, image intake, the preview, the SQLite writes,
building the request from the stored blobs, the HTTP round trips to the backend (submit, one status poll,
result), downloading and storing the output, and posting the result. Inference is zero.
Target (issue "The Discord bot"): p50 ≤ 30 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bot import InpaintBot
from services.config import BotConfig
from services.container import build_services
from tests.helpers.discord_harness import Driver, FakeDiscord, Place, user
from tests.helpers.fal_server import FalTestServer
from tests.helpers.imagegen import box_mask, encode, photo

KEY = "bench-id:bench-secret"


def _pct(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return f"p50 {statistics.median(ms):6.1f} ms   p95 {p95:6.1f} ms   min {ms[0]:6.1f} ms   (n={len(ms)})"


async def run(jobs: int, side: int, output: str) -> list[float]:
    async with FalTestServer(key=KEY, queue_polls=0, progress_logs=0) as server:
        with tempfile.TemporaryDirectory() as tmp:
            config = BotConfig(_env_file=None, discord_token="bench", fal_key=KEY, fal_queue_base=server.base_url,
                               database_path=Path(tmp) / "bench.sqlite3", backend_poll_interval_s=0.01,
                               painter_port=0, channel_budget_ops=10_000, channel_budget_s=1.0)
            fake = FakeDiscord()
            place = Place(guild_id=1, channel_id=2)
            image = encode(photo(side, side), "PNG")
            mask = encode(box_mask((side, side), (side // 4, side // 4, side // 2, side // 2)), "PNG")
            with fake.installed():
                async with build_services(config) as services, InpaintBot(config, services) as bot:
                    await bot.login("bench")
                    driver = Driver(fake, bot, place)
                    samples = []
                    posted = asyncio.Event()
                    fake.on_create = lambda m: posted.set() if any("reroll" in c for c in m.custom_ids()) else None
                    for i in range(jobs + 3):
                        uploads: dict[str, Any] = {"image": fake.upload(2, "photo.png", image, "image/png"),
                                                   "mask": fake.upload(2, "mask.png", mask, "image/png")}
                        posted.clear()
                        start = time.perf_counter()
                        # the driver waits for the ephemeral reply on its own; the clock stops at the result post
                        reply = asyncio.create_task(driver.slash(user(10, "bench"), "inpaint", **uploads,
                                                                 prompt="bench", size=output, format="png"))
                        await posted.wait()
                        elapsed = time.perf_counter() - start
                        await reply
                        if i >= 3:  # warm-up
                            samples.append(elapsed)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=40)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores")
    for side, output in ((512, "square"), (1024, "square_hd")):
        samples = asyncio.run(run(args.jobs, side, output))
        print(f"{side}² PNG in, {output} out: {_pct(samples)}")


if __name__ == "__main__":
    main()
