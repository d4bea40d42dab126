"""Blobs: images and masks stored once by content (SHA-256), shared by every job, draft and painter link that
refers to them."""

from __future__ import annotations

import aiosqlite

from services.blob import Blob
from services.store.database import Database


async def put_blob(conn: aiosqlite.Connection, blob: Blob, now: float) -> str:
    """Store `blob` inside the caller's transaction (nothing happens if it is already stored); returns its sha256."""
    await conn.execute(
        "INSERT OR IGNORE INTO blobs (sha256, content_type, size, data, created_at) VALUES (?, ?, ?, ?, ?)",
        (blob.sha256, blob.content_type, len(blob.data), blob.data, now))
    return blob.sha256


class Blobs:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, sha256: str) -> Blob | None:
        row = await self.db.fetch_one("SELECT sha256, content_type, data FROM blobs WHERE sha256 = ?", (sha256,))
        if row is None:
            return None
        return Blob(bytes(row["data"]), row["content_type"], sha256=row["sha256"])

    async def count(self) -> int:
        return int(await self.db.scalar("SELECT COUNT(*) FROM blobs"))
