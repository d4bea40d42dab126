"""Moderation records: who is banned from the bot in a server, and the moderation log (blocked prompts, flagged
images, moderator actions)."""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict

from services.store.database import Database, Row, as_dict


class ModerationEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    guild_id: int
    job_id: int | None
    user_id: int | None
    actor_id: int | None
    action: str
    detail: str
    created_at: float


class Bans:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def ban(self, guild_id: int, user_id: int, *, by: int | None, reason: str = "") -> bool:
        """Ban a user from the bot in a server; False if they already were."""
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "INSERT OR IGNORE INTO bans (guild_id, user_id, by_user_id, reason, created_at) VALUES (?, ?, ?, ?, ?)",
                (guild_id, user_id, by, reason, time.time()))
            return cur.rowcount > 0

    async def unban(self, guild_id: int, user_id: int) -> bool:
        """Lift a ban; False if the user wasn't banned."""
        async with self.db.transaction() as conn:
            cur = await conn.execute("DELETE FROM bans WHERE guild_id = ? AND user_id = ?", (guild_id, user_id))
            return cur.rowcount > 0

    async def is_banned(self, guild_id: int, user_id: int) -> bool:
        return await self.db.fetch_one("SELECT 1 FROM bans WHERE guild_id = ? AND user_id = ?",
                                       (guild_id, user_id)) is not None


_ENTRY_COLUMNS = "id, guild_id, job_id, user_id, actor_id, action, detail, created_at"


def _entry(row: Row) -> ModerationEntry:
    return ModerationEntry(**as_dict(row))


class ModerationLogStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def add(self, guild_id: int, action: str, *, job_id: int | None = None, user_id: int | None = None,
                  actor_id: int | None = None, detail: str = "") -> ModerationEntry:
        now = time.time()
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "INSERT INTO moderation_log (guild_id, job_id, user_id, actor_id, action, detail, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", (guild_id, job_id, user_id, actor_id, action, detail, now))
            entry_id = cur.lastrowid
        assert entry_id is not None
        return ModerationEntry(id=entry_id, guild_id=guild_id, job_id=job_id, user_id=user_id, actor_id=actor_id,
                               action=action, detail=detail, created_at=now)

    async def entries(self, guild_id: int, limit: int = 50) -> list[ModerationEntry]:
        """The server's latest entries, oldest first."""
        rows = await self.db.fetch_all(f"SELECT {_ENTRY_COLUMNS} FROM moderation_log WHERE guild_id = ? "
                                       "ORDER BY id DESC LIMIT ?", (guild_id, limit))
        return [_entry(r) for r in reversed(rows)]
