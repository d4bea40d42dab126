"""What the backend's NSFW estimator said of each uploaded picture, by content: a picture is checked once, however
many jobs (rerolls, variations, retries) use it."""

from __future__ import annotations

import time

from services.store.database import Database


class UploadChecks:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def probability(self, sha256: str) -> float | None:
        """The stored NSFW probability of a picture, or None when it was never checked."""
        value = await self.db.scalar("SELECT nsfw_probability FROM upload_checks WHERE sha256 = ?", (sha256,))
        return float(value) if value is not None else None

    async def record(self, sha256: str, probability: float) -> None:
        async with self.db.transaction() as conn:
            await conn.execute("INSERT OR REPLACE INTO upload_checks (sha256, nsfw_probability, checked_at) "
                               "VALUES (?, ?, ?)", (sha256, probability, time.time()))
