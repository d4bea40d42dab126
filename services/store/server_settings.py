"""Per-server settings, stored key by key: a key a server never set takes `ServerSettings`' default, and an
unknown or no-longer-valid stored value never stops the bot (the safe defaults apply)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from services.errors import UserError, validation_problems
from services.server_settings import ServerSettings
from services.store.database import Database

log = logging.getLogger(__name__)

#: Called with the server's id after its settings changed (e.g. the dispatcher re-reads its concurrency caps).
SettingsListener = Callable[[int], Awaitable[None]]


class ServerSettingsStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._listeners: list[SettingsListener] = []

    def subscribe(self, listener: SettingsListener) -> None:
        self._listeners.append(listener)

    async def load(self, guild_id: int | None) -> ServerSettings:
        """The settings in force in a server (the defaults outside servers)."""
        if guild_id is None:
            return ServerSettings()
        known = {k: v for k, v in (await self.raw(guild_id)).items() if k in ServerSettings.model_fields}
        try:
            return ServerSettings.model_validate(known)
        except ValidationError:
            log.warning("server %s: stored settings no longer validate; using the defaults", guild_id)
            return ServerSettings()

    async def save(self, guild_id: int, changes: dict[str, Any]) -> ServerSettings:
        """Validate and store changed settings (None = back to the default); returns the settings now in force."""
        merged = (await self.load(guild_id)).model_dump()
        for key, value in changes.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        try:
            updated = ServerSettings.model_validate(merged)
        except ValidationError as exc:
            raise UserError(f"That setting isn't valid: {'; '.join(validation_problems(exc))}") from exc
        await self._write(guild_id, {k: None if v is None else getattr(updated, k) for k, v in changes.items()})
        for listener in self._listeners:
            await listener(guild_id)
        return updated

    async def raw(self, guild_id: int) -> dict[str, Any]:
        """The keys a server has set, as stored."""
        rows = await self.db.fetch_all("SELECT key, value_json FROM server_settings WHERE guild_id = ?", (guild_id,))
        return {r["key"]: json.loads(r["value_json"]) for r in rows}

    async def _write(self, guild_id: int, values: dict[str, Any]) -> None:
        now = time.time()
        async with self.db.transaction() as conn:
            for key, value in values.items():
                if value is None:
                    await conn.execute("DELETE FROM server_settings WHERE guild_id = ? AND key = ?", (guild_id, key))
                else:
                    await conn.execute(
                        "INSERT INTO server_settings (guild_id, key, value_json, updated_at) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (guild_id, key) DO UPDATE SET value_json = excluded.value_json, "
                        "updated_at = excluded.updated_at", (guild_id, key, json.dumps(value), now))
