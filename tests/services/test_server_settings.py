"""Server settings: the NSFW decisions by channel type, defaults filled into a job's options, validation, and
storage key by key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.errors import UserError
from services.server_settings import ServerSettings
from services.store import Store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with await Store.open(tmp_path / "settings.sqlite3") as s:
        yield s


def test_nsfw_policy_by_channel_type() -> None:
    for policy in ("block", "spoiler", "allow"):
        p = ServerSettings(nsfw_policy=policy)
        assert p.flagged_action(age_restricted=False) == "block"  # ordinary channels: never anything else
        assert p.flagged_action(age_restricted=True) == policy
    assert ServerSettings().safety_checker_required(age_restricted=True)
    relaxed = ServerSettings(checker_off_in_age_restricted=True)
    assert not relaxed.safety_checker_required(age_restricted=True)
    assert relaxed.safety_checker_required(age_restricted=False)


def test_server_defaults_fill_only_what_the_user_left_out() -> None:
    settings = ServerSettings(default_steps=40, default_size="square", default_negative_prompt="blurry")
    assert settings.with_defaults({"prompt": "x", "num_inference_steps": None, "image_size": "square_hd"}) == {
        "prompt": "x", "num_inference_steps": 40, "image_size": "square_hd", "negative_prompt": "blurry"}
    assert ServerSettings().with_defaults({"prompt": "x", "seed": None}) == {"prompt": "x"}


async def test_policy_round_trips_and_validates(store: Store) -> None:
    policy = await store.server_settings.save(5, {"nsfw_policy": "spoiler", "server_daily_jobs": 3})
    assert (policy.nsfw_policy, policy.server_daily_jobs) == ("spoiler", 3)
    with pytest.raises(UserError, match="isn't valid"):
        await store.server_settings.save(5, {"user_concurrent": 0})
    again = await store.server_settings.save(5, {"filter_words": ["x"]})
    assert again.nsfw_policy == "spoiler" and again.filter_words == ["x"]


async def test_a_change_is_announced_and_an_invalid_stored_value_falls_back_to_the_defaults(store: Store) -> None:
    changed: list[int] = []

    async def listener(guild_id: int) -> None:
        changed.append(guild_id)

    store.server_settings.subscribe(listener)
    await store.server_settings.save(5, {"user_concurrent": 3})
    assert changed == [5]
    await store.server_settings._write(6, {"user_concurrent": 0})  # e.g. written by a version with wider limits
    assert await store.server_settings.load(6) == ServerSettings()
    assert await store.server_settings.raw(6) == {"user_concurrent": 0}
