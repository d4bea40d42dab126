"""Benchmark: what the bot-wide spending budget adds to admission, with a long history.

    .venv/bin/python -m bench.spend_budget [--history 100000] [--today 2000] [--rounds 500]

A store with `--history` jobs spread over the previous 100 days, each with its ledger row (as the launcher writes
them), plus `--today` jobs today, one in ten cancelled before submission. Timed: the admission check (the day's
running total: one row) and a reservation (the total, the ledger row and the new total in one write transaction,
then tied to its job). Neither the history nor the day's volume should matter. Also timed once: the day's total
recounted job by job from the ledger (what the running total replaces; it must agree). Target (issue 13,
admission checks at 100k jobs): ≤ 2 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

from services.modlog import ModerationLog
from services.spend import DAY_S, SpendBudget, SpendPolicy, utc_day
from services.store import Store


async def _fill(store: Store, history: int, today: int, now: float) -> None:
    rng = random.Random(13)
    day = utc_day(now)
    rows: list[tuple[float, int, str, int]] = []  # created_at, day, status, attempts
    for _ in range(history):
        ago = rng.randrange(1, 101)
        rows.append(((day - ago) * DAY_S + rng.random() * DAY_S, day - ago, "succeeded", 1))
    for n in range(today):
        status, attempts = ("cancelled", 0) if n % 10 == 0 else ("succeeded", 1)
        rows.append((day * DAY_S + rng.random() * (now - day * DAY_S), day, status, attempts))
    async with store.db.transaction() as conn:
        for created, row_day, status, attempts in rows:  # (written as they end up: the trigger isn't exercised)
            cur = await conn.execute(
                "INSERT INTO jobs (guild_id, channel_id, user_id, status, backend, input_json, created_at, "
                "updated_at, attempts, cost) VALUES (?, 1, ?, ?, 'fal', '{}', ?, ?, ?, 25)",
                (rng.randrange(50), rng.randrange(2000), status, created, created, attempts))
            await conn.execute("INSERT INTO spend (day, units, job_id, guild_id, created_at) VALUES (?, ?, ?, ?, ?)",
                               (row_day, 26.2144, cur.lastrowid, 1, created))
        await conn.execute("DELETE FROM spend_days")
        await conn.execute(
            "INSERT INTO spend_days (day, units) SELECT s.day, SUM(s.units) FROM spend AS s JOIN jobs AS j "
            "ON j.id = s.job_id WHERE NOT (j.status = 'cancelled' AND j.attempts = 0) GROUP BY s.day")


def _ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    return (f"p50 {statistics.median(ordered) * 1000:.3f} ms, p95 {ordered[int(len(ordered) * 0.95)] * 1000:.3f} ms, "
            f"max {ordered[-1] * 1000:.3f} ms")


async def main(history: int, today: int, rounds: int) -> None:
    now = time.time()
    with tempfile.TemporaryDirectory() as folder:
        async with await Store.open(Path(folder) / "bench.sqlite3") as store:
            await _fill(store, history, today, now)
            budget = SpendBudget(store.spend, SpendPolicy(daily_units=1e12), ModerationLog(store.modlog))
            checks, reserves = [], []
            for _ in range(rounds):
                t0 = time.perf_counter()
                await budget.check(1, 26.2144)
                checks.append(time.perf_counter() - t0)
            job = await store.jobs.create(user_id=1, guild_id=1, input={}, backend="fal")
            for _ in range(rounds):
                t0 = time.perf_counter()
                hold = await budget.reserve(1, 26.2144)
                await hold.attach(job.id)
                reserves.append(time.perf_counter() - t0)
            used = (await budget.today()).used
            t0 = time.perf_counter()
            recounted = await store.spend.recount(utc_day(now))
            recount_s = time.perf_counter() - t0
            assert abs(recounted - used) < 1e-6 * used, (recounted, used)
    print(f"{platform.python_implementation()} {platform.python_version()}, {history:,} jobs in the history, "
          f"{today:,} today ({used:,.0f} megapixel-steps counted), {rounds} rounds")
    print(f"admission check (the day's total): {_ms(checks)}")
    print(f"reservation + tie to the job:      {_ms(reserves)}")
    print(f"(the day recounted job by job:      {recount_s * 1000:.3f} ms, once)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--history", type=int, default=100_000)
    parser.add_argument("--today", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=500)
    args = parser.parse_args()
    asyncio.run(main(args.history, args.today, args.rounds))
