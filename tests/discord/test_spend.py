"""The bot-wide spending budget through the Discord layer (discord.py's real interaction handling), with a real
fal-protocol backend on 127.0.0.1: /quota shows it (with money when a price is set), a job past it is refused
ephemerally with the reset as a Discord timestamp, and the mod log says so once a day."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.spend import DAY_S, MODLOG_ACTION, utc_day
from tests.helpers.bot_env import (
    ALICE,
    BOB,
    MOD,
    PLACE,
    bot_config,
    ephemeral_text,
    result_message,
    running_bot,
    uploads,
)
from tests.helpers.discord_harness import ALL_PERMISSIONS, Channel, FakeDiscord
from tests.helpers.fal_server import FalTestServer
from tests.helpers.waits import wait_until

MODLOG = 999
TITLE = "💸 Bot-wide daily budget reached"


def _budget_field(embeds: list[dict[str, Any]]) -> str | None:
    fields = {f["name"]: f["value"] for f in embeds[0]["fields"]}
    value: str | None = fields.get("Bot-wide budget (all servers)")
    return value


async def test_quota_refusal_and_one_mod_log_entry(tmp_path: Path, server: FalTestServer) -> None:
    fake = FakeDiscord()
    config = bot_config(tmp_path, server, spend_daily_budget=30, spend_price_per_unit=0.0001)
    with fake.installed():
        async with running_bot(config, fake) as (bot, driver):
            await driver.slash(MOD, "settings modlog", permissions=ALL_PERMISSIONS, channel=Channel(MODLOG))
            quota = await driver.slash(ALICE, "quota")
            assert _budget_field(quota.responses[0]["data"]["embeds"]) == \
                "0 of 30 megapixel-steps used (0.00 of 0.003 USD)"
            first = await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="a kite")
            assert "Queued as job #1" in ephemeral_text(first)
            await result_message(fake, 1, bot)
            assert bot.services.admissions.spend is not None
            used = (await bot.services.admissions.spend.today()).used  # the crop's working size: about 26
            quota = await driver.slash(ALICE, "quota")
            assert _budget_field(quota.responses[0]["data"]["embeds"]) == \
                f"{used:.1f} of 30 megapixel-steps used ({used * 0.0001:.3g} of 0.003 USD)"

            midnight = (utc_day(bot.services.admissions.spend.clock()) + 1) * DAY_S
            for member in (ALICE, BOB, ALICE):  # the budget is the bot's: everyone is refused
                refused = await driver.slash(member, "inpaint", **uploads(fake), prompt="another")
                assert refused.responses[0]["data"]["flags"] & 64  # ephemeral
                assert ephemeral_text(refused) == (
                    "This job needs 26.2 megapixel-steps (megapixels × steps × images) but the bot has only "
                    f"{30 - used:.1f} of its daily 30 left for all servers; try a smaller size, fewer steps or "
                    f"images, or after the reset <t:{midnight}:R>.")
            await wait_until(lambda: any(m.embeds and m.embeds[0].get("title") == TITLE
                                         for m in fake.channel_messages(MODLOG)), what="the mod log post")
            entries = [e for e in await bot.services.store.modlog.entries(PLACE.guild_id) if e.action == MODLOG_ACTION]
            assert len(entries) == 1  # once, not per refused job
            assert f"{used:.1f} of 30 megapixel-steps used" in entries[0].detail
            posts = [m for m in fake.channel_messages(MODLOG) if m.embeds and m.embeds[0].get("title") == TITLE]
            assert len(posts) == 1 and posts[0].custom_ids() == []  # nobody to ban: it is the bot's budget


async def test_quota_shows_no_budget_when_it_is_off(tmp_path: Path, server: FalTestServer) -> None:
    fake = FakeDiscord()
    with fake.installed():
        async with running_bot(bot_config(tmp_path, server, spend_daily_budget=0), fake) as (bot, driver):
            quota = await driver.slash(ALICE, "quota")
            assert _budget_field(quota.responses[0]["data"]["embeds"]) is None
            assert bot.services.admissions.spend is not None
            assert bot.services.admissions.spend.policy.daily_units is None
