"""The bot on an in-memory Discord with a real fal-protocol backend on 127.0.0.1: settings, start and stop, the
people and places tests use, uploads, and reading what the bot posted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import discord

from bot import InpaintBot
from cogs.interactions import services_of
from services.config import BotConfig
from services.container import build_services
from services.job_state import JobStatus
from tests.helpers.discord_harness import Driver, FakeDiscord, FakeMessage, InteractionRecord, Place, user
from tests.helpers.fal_server import FalTestServer
from tests.helpers.imagegen import box_mask, encode, photo
from tests.helpers.waits import wait_until

KEY = "bot-key-id:bot-key-secret"
PAINTER_PUBLIC = "http://painter.example"
PLACE = Place(guild_id=111, channel_id=222)
ALICE = user(10, "alice")
BOB = user(20, "bob")
MOD = user(30, "mod")


def bot_config(tmp_path: Path, server: FalTestServer, **overrides: Any) -> BotConfig:
    """The configuration of a bot on `server`, its database under `tmp_path`, fast polling and progress edits."""
    values: dict[str, Any] = {"discord_token": "fake-token", "fal_key": KEY, "fal_queue_base": server.base_url,
                              "database_path": tmp_path / "bot.sqlite3", "backend_poll_interval_s": 0.01,
                              "progress_edit_interval_s": 0.05, "painter_port": 0,
                              # the address users would open (a reverse proxy's, say): `link_url` maps it back here
                              "painter_public_url": PAINTER_PUBLIC,
                              # Discord's per-channel budget is tested on its own (test_posting.py): elsewhere the
                              # in-memory Discord has none, and the bot needn't keep one
                              "channel_budget_ops": 10_000, "channel_budget_s": 1.0, **overrides}
    return BotConfig(_env_file=None, **values)


@asynccontextmanager
async def running_bot(config: BotConfig, fake: FakeDiscord) -> AsyncIterator[tuple[InpaintBot, Driver]]:
    """The services and a logged-in bot on them, built as `bot.py` builds them (discord.py's real `setup_hook`),
    and a driver for `PLACE`; all closed on exit."""
    async with build_services(config) as services, InpaintBot(config, services) as bot:
        await bot.login("fake-token")
        yield bot, Driver(fake, bot, PLACE)


@asynccontextmanager
async def bot_env(tmp_path: Path, server: FalTestServer) -> AsyncIterator[tuple[InpaintBot, FakeDiscord, Driver]]:
    """A logged-in bot on a fresh in-memory Discord, backed by `server`."""
    fake = FakeDiscord()
    with fake.installed():
        async with running_bot(bot_config(tmp_path, server), fake) as (bot, driver):
            yield bot, fake, driver


def uploads(fake: FakeDiscord, size: tuple[int, int] = (256, 192)) -> dict[str, Any]:
    """A photo and a box mask uploaded to `PLACE`'s channel, as /inpaint's `image` and `mask` options."""
    w, h = size
    return {"image": fake.upload(PLACE.channel_id, "photo.png", encode(photo(w, h)), "image/png"),
            "mask": fake.upload(PLACE.channel_id, "mask.png", encode(box_mask(size, (w // 4, h // 4, w // 2, h // 2))),
                                "image/png")}


def message_with(fake: FakeDiscord, custom_id: str) -> FakeMessage:
    """The one message in `PLACE`'s channel carrying a component with `custom_id`."""
    found = [m for m in fake.channel_messages(PLACE.channel_id) if custom_id in m.custom_ids()]
    assert len(found) == 1, f"{len(found)} messages carry {custom_id}"
    return found[0]


def results_by_job(fake: FakeDiscord, channel_id: int = PLACE.channel_id) -> dict[int, FakeMessage]:
    """Each job whose result is in the channel, with the message carrying it (one message may carry several)."""
    found: dict[int, FakeMessage] = {}
    for message in fake.channel_messages(channel_id):
        for custom_id in message.custom_ids():
            if custom_id.startswith("inpaint:reroll:"):
                found[int(custom_id.rsplit(":", 1)[1])] = message
    return found


async def result_message(fake: FakeDiscord, job_id: int, bot: InpaintBot | None = None) -> FakeMessage:
    """The job's result message, once posted (and, given the bot, once the bot has recorded posting it)."""
    await wait_until(lambda: any(f"inpaint:reroll:{job_id}" in m.custom_ids()
                                 for m in fake.channel_messages(PLACE.channel_id)), what=f"job {job_id}'s result")
    message = message_with(fake, f"inpaint:reroll:{job_id}")
    if bot is not None:
        for _ in range(2000):
            if (await bot.services.store.jobs.get(job_id)).result_message_id == message.id:
                break
            await asyncio.sleep(0.005)
    return message


def progress_message(fake: FakeDiscord, message_id: int | None) -> FakeMessage:
    assert message_id is not None
    return fake.messages[message_id]


def ephemeral_text(record: InteractionRecord) -> str:
    return " ".join(record.texts())


async def wait_status(bot: InpaintBot, job_id: int, status: JobStatus, *, within_s: float = 20.0) -> None:
    """Wait until job `job_id` exists and has `status`."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        try:
            if (await bot.services.store.jobs.get(job_id)).status is status:
                return
        except LookupError:
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"job {job_id} never reached {status}")
        await asyncio.sleep(0.005)


async def wait_for_final_message(fake: FakeDiscord, bot: InpaintBot, job_id: int, status: JobStatus) -> FakeMessage:
    """Wait for job `job_id` to reach `status` and its progress message to show it, without a Cancel button."""
    await wait_status(bot, job_id, status)
    job = await bot.services.store.jobs.get(job_id)
    message = progress_message(fake, job.status_message_id)
    await wait_until(lambda: message.field("Status") is not None and message.field("Status") != "",
                     what="the final edit")
    await wait_until(lambda: not any(c.startswith("inpaint:cancel") for c in message.custom_ids()),
                     what="the cancel button to go")
    return message


def link_url(record: InteractionRecord, bot: discord.Client) -> str:
    """The URL of the link button the bot answered `record` with (the mask painter's), as this machine reaches it:
    the public address the bot links to, served by the bot's painter on loopback."""
    painter = services_of(bot).painter
    assert painter is not None
    for message in record.followups:
        for row in message.components:
            for component in row.get("components", []):
                if component.get("style") == 5:
                    url = str(component["url"])
                    assert url.startswith(f"{PAINTER_PUBLIC}/paint/"), url
                    return painter.local_url + url.removeprefix(PAINTER_PUBLIC)
    raise AssertionError(f"no link button in {record.texts()}")
