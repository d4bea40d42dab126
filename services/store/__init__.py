"""The bot's SQLite store: the database core (`database.py`) and one repository per table group.

    async with await Store.open(path) as store:
        job = await store.jobs.get(1)

`store.jobs` (jobs and their events), `store.blobs`, `store.bans` and `store.modlog` (moderation),
`store.usage` (quota counts), `store.painter_sessions`, `store.drafts`, `store.server_settings`,
`store.upload_checks`, `store.spend` (the bot-wide spending ledger), `store.retention` (what the retention
cleanup deletes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

from services.store.blobs import Blobs
from services.store.database import Database
from services.store.drafts import Drafts
from services.store.jobs import Jobs
from services.store.moderation import Bans, ModerationLogStore
from services.store.painter_sessions import PainterSessions
from services.store.retention import RetentionStore
from services.store.server_settings import ServerSettingsStore
from services.store.spend import SpendLedger
from services.store.upload_checks import UploadChecks
from services.store.usage import UsageCounts


class Store:
    """Every repository, over one database connection."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.jobs = Jobs(db)
        self.blobs = Blobs(db)
        self.bans = Bans(db)
        self.modlog = ModerationLogStore(db)
        self.usage = UsageCounts(db)
        self.painter_sessions = PainterSessions(db)
        self.drafts = Drafts(db)
        self.server_settings = ServerSettingsStore(db)
        self.upload_checks = UploadChecks(db)
        self.spend = SpendLedger(db)
        self.retention = RetentionStore(db)

    @classmethod
    async def open(cls, path: str | Path) -> Self:
        """Open (creating and migrating if needed) the database at `path`."""
        return cls(await Database.open(path))

    async def close(self) -> None:
        await self.db.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
