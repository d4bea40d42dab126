"""What the bot needs to post, checked before it accepts work: a channel without Embed Links or Attach Files (or a
mod-log channel it can't write in) is refused up front, naming what is missing. The invite asks for exactly that,
and the bot subscribes to no privileged intents."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import discord

from tests.conftest import BotEnv
from tests.helpers.bot_env import ALICE, MOD, PLACE, result_message, uploads
from tests.helpers.discord_harness import ALL_PERMISSIONS, Channel

ROOT = Path(__file__).resolve().parents[2]


async def test_a_channel_without_embed_links_or_attach_files_is_refused_at_once(discord_env: BotEnv) -> None:
    bot, fake, driver = discord_env
    await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="before")
    result = await result_message(fake, 1, bot)
    fake.deny(bot, PLACE.guild_id, PLACE.channel_id, discord.Permissions(embed_links=True, attach_files=True))
    record = await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="a boat")
    assert record.responses[0]["type"] == 4  # answered at once, not deferred
    assert record.responses[0]["data"]["content"] == (
        "I can't post in this channel: I'm missing **Embed Links** and **Attach Files** here. A server manager can "
        "grant them in the channel's settings (Edit Channel → Permissions → the bot's role).")
    reroll = await driver.click(ALICE, result, "inpaint:reroll:1")
    assert "missing **Embed Links**" in reroll.responses[0]["data"]["content"]
    assert [j.id for j in await bot.services.store.jobs.for_user(10)] == [1]  # nothing else was started


async def test_a_mod_log_channel_the_bot_cant_write_in_is_refused(discord_env: BotEnv) -> None:
    bot, fake, driver = discord_env
    fake.deny(bot, PLACE.guild_id, 777, discord.Permissions(send_messages=True))
    record = await driver.slash(MOD, "settings modlog", permissions=ALL_PERMISSIONS, channel=Channel(777))
    assert record.responses[0]["data"]["content"].startswith("I can't post in <#777>: I'm missing **Send Messages**")
    assert (await bot.services.store.server_settings.load(PLACE.guild_id)).modlog_channel_id is None
    allowed = await driver.slash(MOD, "settings modlog", permissions=ALL_PERMISSIONS, channel=Channel(778))
    assert "Saved: mod log in <#778>" in allowed.responses[0]["data"]["content"]


def test_the_invite_asks_for_exactly_what_the_bot_needs_and_no_privileged_intents(tmp_path: Path) -> None:
    token = "OTAwMDAwMDAwMDAwMDAwMDAx.GhIjKl.secret-part"  # base64 of the bot's id, then two more parts
    env = {**os.environ, "DISCORD_TOKEN": token, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "bot.py"), "--invite"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("https://discord.com/oauth2/authorize?client_id=900000000000000001"
                                   "&scope=bot+applications.commands&permissions=274877959168")
    from bot import InpaintBot
    from cogs.permissions import NEEDED

    assert discord.Permissions(view_channel=True, send_messages=True, send_messages_in_threads=True,
                                         embed_links=True, attach_files=True) == NEEDED
    intents = InpaintBot.__init__.__code__  # the bot's intents, as it builds them
    assert "Intents" in str(intents.co_names)


async def test_the_bot_subscribes_to_guild_events_only(discord_env: BotEnv) -> None:
    bot, _, _ = discord_env
    assert bot.intents == discord.Intents(guilds=True)
    assert not (bot.intents.members or bot.intents.presences or bot.intents.message_content)
