"""Mask-painter links: who may paint which image for which channel, until when, which browser holds the link,
and whether it was used (a link works once)."""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import BaseModel, ConfigDict

from services.blob import Blob
from services.requester import Requester
from services.store.blobs import put_blob
from services.store.database import Database, Row, as_dict

_COLUMNS = ("id, user_id, guild_id, channel_id, image_sha256, requester_json, params_json, created_at, expires_at, "
            "browser_key, used_at, job_id, parent_job_id, source_format")


class PainterSession(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    user_id: int
    guild_id: int | None
    channel_id: int | None
    image_sha256: str
    requester: Requester
    #: the options the user gave /inpaint (the painted mask and the prompt typed on the page complete them)
    params: dict[str, Any]
    created_at: float
    expires_at: float
    browser_key: str | None
    used_at: float | None
    job_id: int | None
    parent_job_id: int | None = None  # Vary Region: the job whose result is being repainted
    source_format: str | None = None  # the picture's format as uploaded


def _session(row: Row) -> PainterSession:
    values = as_dict(row, without=("requester_json", "params_json"))
    return PainterSession(**values, requester=Requester.model_validate_json(row["requester_json"]),
                          params=json.loads(row["params_json"]))


class PainterSessions:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, session_id: str, *, who: Requester, image: Blob, params: dict[str, Any],
                     expires_at: float, parent_job_id: int | None = None,
                     source_format: str | None = None) -> PainterSession:
        now = time.time()
        async with self.db.transaction() as conn:
            await put_blob(conn, image, now)
            await conn.execute(
                f"INSERT INTO painter_sessions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, ?, ?)",
                (session_id, who.user_id, who.guild_id, who.channel_id, image.sha256, who.model_dump_json(),
                 json.dumps(params), now, expires_at, parent_job_id, source_format))
        found = await self.get(session_id)
        assert found is not None
        return found

    async def get(self, session_id: str) -> PainterSession | None:
        row = await self.db.fetch_one(f"SELECT {_COLUMNS} FROM painter_sessions WHERE id = ?", (session_id,))
        return _session(row) if row is not None else None

    async def claim_browser(self, session_id: str, browser_key: str) -> bool:
        """Bind the session to `browser_key` if no browser holds it yet; True only for the one call that did (the
        first browser ever: a claim is never released or moved, and of racing claims exactly one wins)."""
        async with self.db.transaction() as conn:
            cur = await conn.execute("UPDATE painter_sessions SET browser_key = ? WHERE id = ? AND browser_key IS NULL",
                                     (browser_key, session_id))
            return cur.rowcount == 1

    async def consume(self, session_id: str, now: float) -> bool:
        """Mark the link used; False if it already was (a link works once)."""
        async with self.db.transaction() as conn:
            cur = await conn.execute("UPDATE painter_sessions SET used_at = ? WHERE id = ? AND used_at IS NULL",
                                     (now, session_id))
            return cur.rowcount == 1

    async def release(self, session_id: str) -> None:
        """Make a consumed link usable again (the submit was refused for a reason the user can fix)."""
        async with self.db.transaction() as conn:
            await conn.execute("UPDATE painter_sessions SET used_at = NULL WHERE id = ? AND job_id IS NULL",
                               (session_id,))

    async def set_job(self, session_id: str, job_id: int) -> None:
        async with self.db.transaction() as conn:
            await conn.execute("UPDATE painter_sessions SET job_id = ? WHERE id = ?", (job_id, session_id))
