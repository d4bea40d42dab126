"""Usage counts for quotas: how many jobs a user and their server started since a moment, the server's steps ×
images (each job's `cost`, stored when it was created), and the user's last job. This is the one place quotas are
counted; `services/quotas.py` decides what the counts allow.

Both queries read only the indexes `jobs_guild_usage` and `jobs_guild_user_usage` (V11), never a job's row: the
time they take grows with the day's jobs in the server, not with its history."""

from __future__ import annotations

from pydantic import BaseModel

from services.store.database import Database

#: Jobs that count against quotas: everything except what was blocked or never reached a backend.
_COUNTED = "status != 'blocked' AND NOT (status IN ('failed', 'cancelled') AND attempts = 0)"


class Usage(BaseModel):
    """What a user and their server have used since a moment (the start of the day, for quotas)."""

    user_jobs: int
    server_jobs: int
    server_steps: int
    last_user_job_at: float | None


class UsageCounts:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def since(self, guild_id: int, user_id: int, since: float) -> Usage:
        row = await self.db.fetch_one(
            f"SELECT COUNT(*) AS server_jobs, COALESCE(SUM(user_id = ?), 0) AS user_jobs, "
            f"COALESCE(SUM(cost), 0) AS server_steps FROM jobs "
            f"WHERE guild_id = ? AND created_at >= ? AND {_COUNTED}", (user_id, guild_id, since))
        # newest first, stopping at the first that counts (MAX() would read the user's whole history)
        last = await self.db.scalar(f"SELECT created_at FROM jobs WHERE guild_id = ? AND user_id = ? AND {_COUNTED} "
                                    "ORDER BY created_at DESC LIMIT 1", (guild_id, user_id))
        assert row is not None
        return Usage(server_jobs=row["server_jobs"], user_jobs=row["user_jobs"], server_steps=row["server_steps"],
                     last_user_job_at=last)
