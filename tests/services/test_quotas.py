"""Quotas counted from the store: daily jobs per user and server, the step budget, the cooldown, what counts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.job_state import JobStatus
from services.quotas import Quotas, day_start
from services.refusals import Refused
from services.server_settings import ServerSettings
from services.store import Store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with await Store.open(tmp_path / "quotas.sqlite3") as s:
        yield s


async def test_quota_exhausted_then_reset_the_next_day(store: Store) -> None:
    now = [day_start(1_800_000_000) + 3600.0]
    quotas = Quotas(store.usage, clock=lambda: now[0])
    policy = ServerSettings(user_daily_jobs=2, server_daily_steps=120)
    for _ in range(2):
        await quotas.check(policy, 1, 7, cost=25)
        job = await store.jobs.create(user_id=7, guild_id=1, input={"num_inference_steps": 25}, backend="fal", cost=25)
        await store.jobs.transition(job.id, JobStatus.SUBMITTED)  # reached a backend: it counts
    # (jobs are stamped with the real time; move the test clock to "today" as the store sees it)
    now[0] = job.created_at + 1
    with pytest.raises(Refused, match="used your 2 jobs for today"):
        await quotas.check(policy, 1, 7, cost=25)
    await quotas.check(policy, 1, 8, cost=25)  # someone else still can…
    with pytest.raises(Refused, match="needs 100 steps"):
        await quotas.check(policy, 1, 8, cost=100)  # …but not past the server's step budget (50 used)
    quota = await quotas.quota(policy, 1, 7)
    assert (quota.user_jobs, quota.server_steps) == (2, 50)
    now[0] += 86400  # the next UTC day
    await quotas.check(policy, 1, 7, cost=25)
    # jobs blocked by moderation or refused before reaching a backend don't count
    blocked = await store.jobs.create(user_id=9, guild_id=1, input={}, backend="fal")
    await store.jobs.transition(blocked.id, JobStatus.BLOCKED)
    now[0] = blocked.created_at
    assert (await quotas.quota(policy, 1, 9)).user_jobs == 0


async def test_cooldown(store: Store) -> None:
    quotas = Quotas(store.usage)
    policy = ServerSettings(user_cooldown_s=60)
    await quotas.check(policy, 1, 7, cost=25)
    job = await store.jobs.create(user_id=7, guild_id=1, input={}, backend="fal")
    await store.jobs.transition(job.id, JobStatus.SUBMITTED)
    with pytest.raises(Refused, match="Slow down"):
        await quotas.check(policy, 1, 7, cost=25)
