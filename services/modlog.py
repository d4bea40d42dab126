"""The moderation log: every blocked prompt, flagged image and moderator action is stored, then shown to whoever
subscribed (the Discord layer posts it to the server's mod-log channel). Showing never fails the caller."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from services.job_state import Job
from services.store.moderation import ModerationEntry, ModerationLogStore

log = logging.getLogger(__name__)


class ModLogSink(Protocol):
    """Where moderation entries are shown (with the job and, for flagged images, the images)."""

    async def show(self, entry: ModerationEntry, *, job: Job | None = None, images: Sequence[bytes] = ()) -> None: ...


class ModerationLog:
    def __init__(self, entries: ModerationLogStore) -> None:
        self.entries = entries
        self._sinks: list[ModLogSink] = []

    def subscribe(self, sink: ModLogSink) -> None:
        self._sinks.append(sink)

    def unsubscribe(self, sink: ModLogSink) -> None:
        if sink in self._sinks:
            self._sinks.remove(sink)

    async def record(self, guild_id: int, action: str, *, job: Job | None = None, user_id: int | None = None,
                     actor_id: int | None = None, detail: str = "", images: Sequence[bytes] = ()) -> ModerationEntry:
        """Store an entry (about `job`, when there is one) and show it to every sink."""
        entry = await self.entries.add(guild_id, action, job_id=job.id if job else None, user_id=user_id,
                                       actor_id=actor_id, detail=detail)
        for sink in list(self._sinks):
            try:
                await sink.show(entry, job=job, images=images)
            except Exception:
                log.exception("could not show moderation log entry %s", entry.id)
        return entry
