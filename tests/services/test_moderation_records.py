"""Bans and the moderation log in the store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.store import Store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with await Store.open(tmp_path / "moderation.sqlite3") as s:
        yield s


async def test_bans_and_the_moderation_log(store: Store) -> None:
    assert await store.bans.ban(1, 7, by=99) and not await store.bans.ban(1, 7, by=99)
    assert await store.bans.is_banned(1, 7) and not await store.bans.is_banned(2, 7)
    assert await store.bans.unban(1, 7) and not await store.bans.is_banned(1, 7)
    await store.modlog.add(1, "user_banned", user_id=7, actor_id=99)
    await store.modlog.add(1, "user_unbanned", user_id=7, actor_id=99)
    assert [e.action for e in await store.modlog.entries(1)] == ["user_banned", "user_unbanned"]
