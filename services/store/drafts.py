"""Drafts: jobs shown to their author with the mask overlaid, waiting for Confirm (on servers that ask for it).
Nothing is spent until a draft is confirmed; confirming or cancelling takes it away."""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import BaseModel, ConfigDict

from services.blob import Blob
from services.requester import Requester
from services.store.blobs import put_blob
from services.store.database import Database, Row, as_dict

_COLUMNS = "id, user_id, image_sha256, mask_sha256, requester_json, params_json, created_at, source_format"


class Draft(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    user_id: int
    image_sha256: str
    mask_sha256: str
    requester: Requester
    params: dict[str, Any]  # the options the user gave /inpaint
    created_at: float
    source_format: str | None = None  # the upload's format (None: a draft from before it was kept)


def _draft(row: Row) -> Draft:
    values = as_dict(row, without=("requester_json", "params_json"))
    return Draft(**values, requester=Requester.model_validate_json(row["requester_json"]),
                 params=json.loads(row["params_json"]))


class Drafts:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, draft_id: str, *, who: Requester, image: Blob, mask: Blob, params: dict[str, Any],
                     source_format: str | None = None) -> Draft:
        now = time.time()
        async with self.db.transaction() as conn:
            await put_blob(conn, image, now)
            await put_blob(conn, mask, now)
            await conn.execute(f"INSERT INTO drafts ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               (draft_id, who.user_id, image.sha256, mask.sha256, who.model_dump_json(),
                                json.dumps(params), now, source_format))
        return Draft(id=draft_id, user_id=who.user_id, image_sha256=image.sha256, mask_sha256=mask.sha256,
                     requester=who, params=params, created_at=now, source_format=source_format)

    async def get(self, draft_id: str) -> Draft | None:
        row = await self.db.fetch_one(f"SELECT {_COLUMNS} FROM drafts WHERE id = ?", (draft_id,))
        return _draft(row) if row is not None else None

    async def replace_mask(self, draft_id: str, mask: Blob) -> None:
        async with self.db.transaction() as conn:
            await put_blob(conn, mask, time.time())
            await conn.execute("UPDATE drafts SET mask_sha256 = ? WHERE id = ?", (mask.sha256, draft_id))

    async def take(self, draft_id: str) -> Draft | None:
        """Remove and return a draft (confirm or cancel); None if it is already gone (a double click)."""
        draft = await self.get(draft_id)
        if draft is None:
            return None
        async with self.db.transaction() as conn:
            cur = await conn.execute("DELETE FROM drafts WHERE id = ?", (draft_id,))
            if cur.rowcount != 1:
                return None
        return draft
