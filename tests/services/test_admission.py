"""Admission on its own: what it returns (the server's settings and the options with its defaults), and the order
of its checks (a ban before anything; the prompt filter before quotas, so a blocked prompt costs no quota)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.admission import Admissions
from services.job_state import JobStatus
from services.modlog import ModerationLog
from services.quotas import Quotas
from services.refusals import Banned, Cooldown, PromptBlocked, Refused, StepBudgetExceeded
from services.requester import Requester
from services.store import Store

WHO = Requester(guild_id=1, channel_id=2, user_id=10)


@pytest.fixture
async def admissions(tmp_path: Path) -> AsyncIterator[Admissions]:
    async with await Store.open(tmp_path / "admission.sqlite3") as store:
        yield Admissions(store, Quotas(store.usage), ModerationLog(store.modlog), backend="fal")


async def test_admitted_options_carry_the_server_defaults(admissions: Admissions) -> None:
    await admissions.store.server_settings.save(1, {"default_steps": 30, "default_size": "square"})
    admitted = await admissions.admit(WHO, {"prompt": "x", "image_size": None, "seed": None})
    assert admitted.options == {"prompt": "x", "num_inference_steps": 30, "image_size": "square"}
    assert admitted.settings.default_steps == 30
    outside = await admissions.admit(Requester(guild_id=None, channel_id=None, user_id=10), {"prompt": "x"})
    assert outside.options == {"prompt": "x"}  # no server: no defaults, no access rules, no quotas


async def test_the_step_budget_uses_fals_defaults_for_what_is_not_given(admissions: Admissions) -> None:
    await admissions.store.server_settings.save(1, {"server_daily_steps": 60})
    await admissions.admit(WHO, {"prompt": "x", "num_images": 2})  # 25 × 2 = 50 ≤ 60
    with pytest.raises(Refused) as refused:
        await admissions.admit(WHO, {"prompt": "x", "num_images": 3})  # 75 > 60
    assert refused.value.reason == StepBudgetExceeded(75, 60, 60, refused.value.reason.resets_at)  # type: ignore[union-attr]


async def test_a_ban_comes_first_and_a_blocked_prompt_costs_no_quota(admissions: Admissions) -> None:
    store = admissions.store
    await store.server_settings.save(1, {"user_cooldown_s": 3600})
    with pytest.raises(Refused) as refused:
        await admissions.admit(WHO, {"prompt": "porn"})
    assert isinstance(refused.value.reason, PromptBlocked)
    await admissions.admit(WHO, {"prompt": "a boat"})  # the blocked job started no cooldown
    job = await store.jobs.create(user_id=10, guild_id=1, input={}, backend="fal")
    await store.jobs.transition(job.id, JobStatus.SUBMITTED)
    with pytest.raises(Refused) as refused:
        await admissions.admit(WHO, {"prompt": "a boat"})
    assert isinstance(refused.value.reason, Cooldown)
    await store.bans.ban(1, 10, by=99)
    with pytest.raises(Refused) as refused:
        await admissions.admit(WHO, {"prompt": "porn"})
    assert refused.value.reason == Banned()  # before the filter: nothing more is stored for a banned user
    assert [j.status for j in await store.jobs.for_user(10)] == [JobStatus.SUBMITTED, JobStatus.BLOCKED]
