"""Per-user and per-server limits: cooldowns, daily quotas, the daily step budget (steps × images, the hosted
API's spend). Everything is counted from the jobs in SQLite, so limits survive restarts. Days are UTC."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.errors import UserError
from services.moderation import GuildPolicy
from services.store import ModerationStore


def day_start(now: float) -> float:
    """The start of the UTC day containing `now`."""
    day = dt.datetime.fromtimestamp(now, tz=dt.UTC).date()
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()


@dataclass(frozen=True)
class Quota:
    user_jobs: int
    user_limit: int | None
    server_jobs: int
    server_limit: int | None
    server_steps: int
    steps_limit: int | None
    cooldown_left_s: float
    resets_at: float

    def remaining(self, used: int, limit: int | None) -> int | None:
        return None if limit is None else max(0, limit - used)


class Limits:
    def __init__(self, moderation: ModerationStore, *, clock: Callable[[], float] = time.time) -> None:
        self.moderation = moderation
        self.clock = clock

    async def quota(self, policy: GuildPolicy, guild_id: int, user_id: int) -> Quota:
        now = self.clock()
        start = day_start(now)
        usage = await self.moderation.usage(guild_id, user_id, start)
        cooldown = 0.0
        if usage.last_user_job_at is not None and policy.user_cooldown_s:
            cooldown = max(0.0, usage.last_user_job_at + policy.user_cooldown_s - now)
        return Quota(user_jobs=usage.user_jobs, user_limit=policy.user_daily_jobs, server_jobs=usage.server_jobs,
                     server_limit=policy.server_daily_jobs, server_steps=usage.server_steps,
                     steps_limit=policy.server_daily_steps, cooldown_left_s=cooldown, resets_at=start + 86400)

    async def check(self, policy: GuildPolicy, guild_id: int, user_id: int, *, steps: int) -> Quota:
        """Refuse a new job that would break a limit (with when to try again); returns the quota before it."""
        q = await self.quota(policy, guild_id, user_id)
        reset = f"<t:{int(q.resets_at)}:R>"
        if q.cooldown_left_s > 0:
            raise UserError(f"Slow down: you can start another job in {q.cooldown_left_s:.0f} s.")
        if q.user_limit is not None and q.user_jobs >= q.user_limit:
            raise UserError(f"You've used your {q.user_limit} jobs for today here; the quota resets {reset}.")
        if q.server_limit is not None and q.server_jobs >= q.server_limit:
            raise UserError(f"This server's {q.server_limit} jobs for today are used up; the quota resets {reset}.")
        if q.steps_limit is not None and q.server_steps + steps > q.steps_limit:
            left = max(0, q.steps_limit - q.server_steps)
            raise UserError(f"This job needs {steps} steps (steps × images) but the server has {left} of its "
                            f"{q.steps_limit} left today; try fewer steps or images, or after the reset {reset}.")
        return q
