"""The bot-wide daily spending budget (`services/spend.py`): the unit, on by default with hosted fal and off with a
worker, refusals past it with the reset time, money, the once-a-day mod-log entry, what counts (only jobs that
reached a backend), a restart, and concurrent admissions at the edge."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cogs.wording import refusal_text
from services.backend_select import choose_backend
from services.config import BotConfig
from services.job_state import JobStatus
from services.modlog import ModerationLog
from services.refusals import Refused, SpendBudgetReached
from services.schema import InpaintInput
from services.spend import (
    DAY_S,
    DEFAULT_HOSTED_DAILY_UNITS,
    MODLOG_ACTION,
    SpendBudget,
    SpendDay,
    SpendPolicy,
    estimated_units,
    request_units,
    units,
    utc_day,
)
from services.store import Store
from services.store.database import MIGRATIONS

NOON = 1_800_000_000 - 1_800_000_000 % DAY_S + DAY_S / 2  # 12:00 UTC on some day
KEY = "key-id:key-secret"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with await Store.open(tmp_path / "spend.sqlite3") as s:
        yield s


def _budget(store: Store, daily: float | None, *, price: float | None = None, now: list[float] | None = None
            ) -> SpendBudget:
    clock = now if now is not None else [NOON]
    return SpendBudget(store.spend, SpendPolicy(daily_units=daily, price_per_unit=price), ModerationLog(store.modlog),
                       clock=lambda: clock[0])


async def _job(store: Store, budget: SpendBudget, cost: float, *, guild_id: int | None = 1,
               status: JobStatus | None = JobStatus.SUBMITTED) -> int:
    """A job admitted as the launcher admits one: reserve, create, attach; then moved to `status`."""
    hold = await budget.reserve(guild_id, cost)
    job = await store.jobs.create(user_id=7, guild_id=guild_id, input={}, backend="fal")
    await hold.attach(job.id)
    if status is not None:
        await store.jobs.transition(job.id, status)
    return job.id


def test_the_unit_is_megapixels_times_steps_times_images() -> None:
    assert units(1000, 1000, 25, 1) == 25.0
    assert units(1024, 1024, 25, 1) == pytest.approx(26.2144)
    request = InpaintInput(image_url="a", mask_url="b", prompt="x", image_size={"width": 512, "height": 768},
                           num_inference_steps=30, num_images=2)
    assert request_units(request) == pytest.approx(0.512 * 0.768 * 30 * 2)
    # admission, before validation: fal's defaults (square_hd, 25 steps, 1 image) for what isn't given
    assert estimated_units({}) == pytest.approx(26.2144)
    assert estimated_units({"image_size": "square", "num_images": 4}) == pytest.approx(0.262144 * 25 * 4)
    assert estimated_units({"image_size": {"width": 2000, "height": 1000}, "num_inference_steps": 10}) == 20.0
    assert estimated_units({"image_size": "huge", "num_inference_steps": "many"}) == pytest.approx(26.2144)


def test_on_by_default_with_fal_key_off_with_a_worker_and_settable() -> None:
    def policy(**values: object) -> SpendPolicy:
        config = BotConfig(_env_file=None, **values)  # type: ignore[arg-type]
        return SpendPolicy.from_config(config, hosted=choose_backend(config).name == "fal")

    assert policy(fal_key=KEY).daily_units == DEFAULT_HOSTED_DAILY_UNITS
    assert policy(fal_key=KEY, worker_url="http://127.0.0.1:8000").daily_units == DEFAULT_HOSTED_DAILY_UNITS
    assert policy(worker_url="http://127.0.0.1:8000").daily_units is None
    assert policy().daily_units is None  # the embedded worker
    assert policy(fal_key=KEY, spend_daily_budget=500).daily_units == 500
    assert policy(fal_key=KEY, spend_daily_budget=0).daily_units is None  # 0 turns it off
    assert policy(worker_url="http://127.0.0.1:8000", spend_daily_budget=800).daily_units == 800
    priced = policy(fal_key=KEY, spend_price_per_unit=0.0001, spend_currency="EUR")
    assert (priced.price_per_unit, priced.currency) == (0.0001, "EUR")


async def test_a_job_past_the_budget_is_refused_with_the_reset_time(store: Store) -> None:
    budget = _budget(store, 100)
    await _job(store, budget, 60)
    await budget.check(1, 40)  # exactly the rest fits
    with pytest.raises(Refused) as refused:
        await budget.check(1, 41)
    reason = refused.value.reason
    midnight = (utc_day(NOON) + 1) * DAY_S
    assert reason == SpendBudgetReached(needed=41, left=40, limit=100, resets_at=midnight)
    assert reason.plain() == ("This job needs 41 megapixel-steps (megapixels × steps × images) but the bot has only "
                              "40 of its daily 100 left for all servers; try a smaller size, fewer steps or "
                              "images, or after the reset at 00:00 UTC.")
    assert refusal_text(reason).endswith(f"or after the reset <t:{int(midnight)}:R>.")
    await _job(store, budget, 40)
    with pytest.raises(Refused) as refused:
        await budget.reserve(2, 1)  # another server: the budget is the bot's
    assert refusal_text(refused.value.reason) == ("The bot's daily budget (for all servers together) is used up; it "
                                                  f"resets <t:{int(midnight)}:R>.")


async def test_the_day_resets_at_utc_midnight(store: Store) -> None:
    now = [(utc_day(NOON) + 1) * DAY_S - 1.0]  # 23:59:59 UTC
    budget = _budget(store, 50, now=now)
    await _job(store, budget, 50)
    with pytest.raises(Refused):
        await budget.check(1, 1)
    now[0] += 1  # midnight
    await budget.check(1, 50)
    assert (await budget.today()).used == 0


async def _used(store: Store, budget: SpendBudget) -> float:
    """The day's running total, checked against the ledger summed job by job."""
    used = (await budget.today()).used
    assert used == pytest.approx(await store.spend.recount(utc_day(budget.clock())))
    return used


async def test_jobs_that_never_reached_a_backend_cost_nothing(store: Store) -> None:
    budget = _budget(store, 100)
    await _job(store, budget, 30, status=JobStatus.CANCELLED)  # cancelled while waiting
    await _job(store, budget, 30, status=JobStatus.FAILED)  # failed before its submission
    await _job(store, budget, 30, status=JobStatus.BLOCKED)  # blocked by moderation (its upload)
    assert await _used(store, budget) == 0
    hold = await budget.reserve(1, 30)  # its job never came to be (e.g. the upload was refused)
    await hold.release()
    await hold.release()  # twice is once
    assert await _used(store, budget) == 0
    queued = await _job(store, budget, 10, status=None)  # waiting in the queue: counted, it may run
    running = await _job(store, budget, 20)
    await store.jobs.transition(running, JobStatus.CANCELLED)  # cancelled at the backend: it may have been billed
    flagged = await _job(store, budget, 5)
    await store.jobs.transition(flagged, JobStatus.BLOCKED)  # its result was flagged: it ran, so it counts
    assert await _used(store, budget) == 35
    await store.jobs.transition(queued, JobStatus.CANCELLED)  # cancelled before it was submitted
    assert await _used(store, budget) == 25
    maybe = await _job(store, budget, 15, status=None)
    await store.jobs.begin_submit(maybe, "job-key")  # its submit's answer was lost: it may be at the backend
    await store.jobs.transition(maybe, JobStatus.FAILED)
    assert await _used(store, budget) == 40
    forgotten = await _job(store, budget, 15, status=None)
    await store.jobs.begin_submit(forgotten, "job-key-2")
    await store.jobs.forget_submit(forgotten, "connection refused")  # it certainly never arrived
    await store.jobs.transition(forgotten, JobStatus.FAILED)
    assert await _used(store, budget) == 40
    assert await store.spend.units_of(running) == 20
    # a job that ended before its reservation was tied to it (not the launcher's order, but it can't count either)
    late = await budget.reserve(1, 40)
    job = await store.jobs.create(user_id=7, guild_id=1, input={}, backend="fal")
    await store.jobs.transition(job.id, JobStatus.CANCELLED)
    await late.attach(job.id)
    await late.release()  # tied to a job: nothing to give back
    assert await _used(store, budget) == 40


async def test_a_budget_off_still_records_and_never_refuses(store: Store) -> None:
    budget = _budget(store, None)
    await _job(store, budget, 1e9)
    await budget.check(1, 1e9)
    today = await budget.today()
    assert (today.used, today.limit, today.left) == (1e9, None, None)


async def test_money_is_shown_with_a_price() -> None:
    priced = SpendPolicy(daily_units=25_000, price_per_unit=0.0000954, currency="USD")
    day = SpendDay(used=1234.5, limit=25_000, resets_at=0, policy=priced)
    assert day.summary() == "1,234 of 25,000 megapixel-steps used (0.118 of 2.39 USD)"
    assert SpendDay(used=0, limit=25_000, resets_at=0, policy=priced).summary() == \
        "0 of 25,000 megapixel-steps used (0.00 of 2.39 USD)"
    unpriced = SpendPolicy(daily_units=25_000)
    assert SpendDay(used=26.2, limit=25_000, resets_at=0, policy=unpriced).summary() == \
        "26.2 of 25,000 megapixel-steps used"
    assert priced.money(100_000) == "9.54 USD"


async def test_the_mod_log_says_so_once_a_day_per_server(store: Store) -> None:
    now = [NOON]
    budget = _budget(store, 10, price=0.01, now=now)
    await _job(store, budget, 10)
    for guild in (1, 1, 2, 1, 2):
        with pytest.raises(Refused):
            await budget.check(guild, 1)
    with pytest.raises(Refused):
        await budget.reserve(1, 1)
    with pytest.raises(Refused):
        await budget.check(None, 1)  # a DM: refused, no server to tell
    for guild in (1, 2):
        entries = [e for e in await store.modlog.entries(guild) if e.action == MODLOG_ACTION]
        assert len(entries) == 1, entries
        assert entries[0].detail.startswith("The bot-wide daily budget (all servers together) can't pay for more "
                                            "jobs today: 10 of 10 megapixel-steps used (0.1 USD).")
        assert entries[0].user_id is None  # nobody's fault: no ban buttons
    now[0] += DAY_S  # the next day: a new budget, and a new entry when it is reached again
    await _job(store, budget, 10)
    with pytest.raises(Refused):
        await budget.check(1, 1)
    assert len([e for e in await store.modlog.entries(1) if e.action == MODLOG_ACTION]) == 2
    assert len([e for e in await store.modlog.entries(2) if e.action == MODLOG_ACTION]) == 1


async def test_a_restart_keeps_the_days_total(tmp_path: Path) -> None:
    path = tmp_path / "restart.sqlite3"
    async with await Store.open(path) as store:
        budget = _budget(store, 100)
        await _job(store, budget, 70)
        hold = await budget.reserve(1, 20)  # a job being created when the bot was killed: counted, not lost
        assert hold.spend_id is not None
    async with await Store.open(path) as store:
        budget = _budget(store, 100)
        assert (await budget.today()).used == 90
        with pytest.raises(Refused):
            await budget.check(1, 11)


async def test_concurrent_reservations_at_the_edge_take_the_budget_once(store: Store) -> None:
    budget = _budget(store, 100)
    await _job(store, budget, 50)
    outcomes = await asyncio.gather(*(budget.reserve(g, 30) for g in (1, 2, 3, 4)), return_exceptions=True)
    admitted = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, Refused)]
    assert (len(admitted), len(refused)) == (1, 3)
    assert await _used(store, budget) == 80


async def test_admission_reads_one_row_whatever_the_days_volume(store: Store) -> None:
    from services.store.spend import _DAY_TOTAL
    plan = " | ".join(str(row[3]) for row in await store.db.fetch_all(f"EXPLAIN QUERY PLAN {_DAY_TOTAL}", (1,)))
    assert "USING INTEGER PRIMARY KEY (rowid=?)" in plan, plan


async def test_a_database_upgraded_mid_day_counts_the_days_jobs(tmp_path: Path) -> None:
    """A database written before V10 (the schema up to V9, as the previous code left it) with today's jobs: the
    upgrade counts those that reached the backend."""
    path = tmp_path / "upgrade.sqlite3"
    raw = sqlite3.connect(path, isolation_level=None)
    for migration in MIGRATIONS[:9]:
        raw.executescript(f"BEGIN;\n{migration.sql}\n;PRAGMA user_version = {migration.version};\nCOMMIT;")
    now = time.time()
    for input, status, attempts in (
            ({"image_size": {"width": 1000, "height": 500}, "num_inference_steps": 20, "num_images": 2},
             "submitted", 1),  # 20
            ({"image_size": "square"}, "submitted", 1),  # 0.262144 × 25
            ({}, "succeeded", 1),  # fal's defaults: 1024² × 25
            ({"image_size": "square"}, "cancelled", 0)):  # never submitted: nothing
        raw.execute("INSERT INTO jobs (guild_id, user_id, status, backend, input_json, attempts, created_at, "
                    "updated_at) VALUES (1, 7, ?, 'fal', ?, ?, ?, ?)", (status, json.dumps(input), attempts, now, now))
    raw.close()
    async with await Store.open(path) as store:
        budget = _budget(store, 100, now=[now])
        assert await _used(store, budget) == pytest.approx(20 + 0.262144 * 25 + 1.048576 * 25)


async def test_old_days_can_be_forgotten(store: Store) -> None:
    now = [NOON]
    budget = _budget(store, 10, now=now)
    await _job(store, budget, 10)
    with pytest.raises(Refused):
        await budget.check(1, 1)
    now[0] += DAY_S
    await _job(store, budget, 5)
    assert await store.spend.forget_before(utc_day(now[0])) == 1
    assert (await budget.today()).used == 5
