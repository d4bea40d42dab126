"""Quotas: cooldowns, daily job quotas and the daily step budget (steps × images, the hosted API's spend) of a
user and their server. The counts come from `services/store/usage.py`, so quotas survive restarts. Days are UTC.
The bot-wide spending budget (all servers together) is `services/spend.py`; a quota shows it too."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.refusals import Cooldown, Refused, ServerQuotaUsed, StepBudgetExceeded, UserQuotaUsed
from services.server_settings import ServerSettings
from services.spend import SpendBudget, SpendDay
from services.store.usage import UsageCounts

DAY_S = 86400


def day_start(now: float) -> float:
    """The start of the UTC day containing `now`."""
    day = dt.datetime.fromtimestamp(now, tz=dt.UTC).date()
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()


@dataclass(frozen=True)
class Quota:
    """What a user and their server have used today, against the server's limits (None = unlimited)."""

    user_jobs: int
    user_limit: int | None
    server_jobs: int
    server_limit: int | None
    server_steps: int
    steps_limit: int | None
    cooldown_left_s: float
    resets_at: float
    spend: SpendDay | None = None  # the bot-wide spending today (None: not tracked here)

    @staticmethod
    def remaining(used: int, limit: int | None) -> int | None:
        """How many are left of `limit` (None when unlimited)."""
        return None if limit is None else max(0, limit - used)


class Quotas:
    def __init__(self, usage: UsageCounts, *, clock: Callable[[], float] = time.time,
                 spend: SpendBudget | None = None) -> None:
        self.usage = usage
        self.clock = clock
        self.spend = spend

    async def quota(self, settings: ServerSettings, guild_id: int, user_id: int) -> Quota:
        now = self.clock()
        start = day_start(now)
        usage = await self.usage.since(guild_id, user_id, start)
        cooldown = 0.0
        if usage.last_user_job_at is not None and settings.user_cooldown_s:
            cooldown = max(0.0, usage.last_user_job_at + settings.user_cooldown_s - now)
        return Quota(user_jobs=usage.user_jobs, user_limit=settings.user_daily_jobs, server_jobs=usage.server_jobs,
                     server_limit=settings.server_daily_jobs, server_steps=usage.server_steps,
                     steps_limit=settings.server_daily_steps, cooldown_left_s=cooldown, resets_at=start + DAY_S,
                     spend=await self.spend.today() if self.spend is not None else None)

    async def check(self, settings: ServerSettings, guild_id: int, user_id: int, *, cost: int) -> Quota:
        """Refuse a new job of `cost` (steps × images) that would break a limit; returns the quota before it."""
        q = await self.quota(settings, guild_id, user_id)
        if q.cooldown_left_s > 0:
            raise Refused(Cooldown(q.cooldown_left_s))
        if q.user_limit is not None and q.user_jobs >= q.user_limit:
            raise Refused(UserQuotaUsed(q.user_limit, q.resets_at))
        if q.server_limit is not None and q.server_jobs >= q.server_limit:
            raise Refused(ServerQuotaUsed(q.server_limit, q.resets_at))
        steps_left = q.remaining(q.server_steps, q.steps_limit)
        if q.steps_limit is not None and steps_left is not None and cost > steps_left:
            raise Refused(StepBudgetExceeded(cost, steps_left, q.steps_limit, q.resets_at))
        return q
