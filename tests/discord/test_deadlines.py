"""Discord gives a bot 3 seconds to answer an interaction; we answer within 1 s (the in-memory Discord fails any
interaction answered later, and refuses answers after 3 s as Discord does) whatever the picture's size, and the
work comes after. Interaction tokens die after 15 minutes: long jobs must keep showing progress and post their
result without them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from services.job_state import JobStatus
from tests.conftest import BotEnv
from tests.helpers.bot_env import (
    ALICE,
    BOB,
    KEY,
    PLACE,
    bot_config,
    ephemeral_text,
    result_message,
    running_bot,
    uploads,
)
from tests.helpers.discord_harness import FakeDiscord, FakeMessage, InteractionRecord
from tests.helpers.fal_server import FalTestServer
from tests.helpers.imagegen import box_mask, encode
from tests.helpers.waits import wait_until

FORTY_MP = (8000, 5000)


def _big_upload(fake: FakeDiscord) -> dict[str, Any]:
    """A 40-megapixel JPEG (smooth, so it stays under the upload limit) and its mask."""
    w, h = FORTY_MP
    ramp = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None]
    pixels = np.broadcast_to(ramp, (h, w, 3)).copy()
    pixels[:, :, 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    image = encode(Image.fromarray(pixels), "JPEG", quality=85)
    mask = encode(box_mask(FORTY_MP, (3000, 2000, 5000, 3000)), "PNG")
    return {"image": fake.upload(PLACE.channel_id, "huge.jpg", image, "image/jpeg"),
            "mask": fake.upload(PLACE.channel_id, "mask.png", mask, "image/png")}


async def _meanwhile(driver_task: asyncio.Task[InteractionRecord], env: BotEnv) -> int:
    """While a heavy interaction is being worked on, others keep being answered in time (the driver checks)."""
    _, _, driver = env
    answered = 0
    while not driver_task.done():
        await driver.slash(BOB, "jobs")
        answered += 1
    await driver_task
    return answered


async def test_a_40_megapixel_picture_is_answered_at_once_and_so_is_everyone_else(discord_env: BotEnv) -> None:
    bot, fake, driver = discord_env
    await bot.services.store.server_settings.save(PLACE.guild_id, {"confirm_masks": True})
    big = _big_upload(fake)

    started = asyncio.create_task(driver.slash(ALICE, "inpaint", **big, prompt="a lake"))
    assert await _meanwhile(started, discord_env) >= 1  # Bob's commands ran while the picture was taken in
    preview = next(m for m in started.result().followups if any(c.startswith("draft:") for c in m.custom_ids()))
    draft_id = preview.custom_ids()[0].rsplit(":", 1)[1]

    inverted = asyncio.create_task(driver.click(ALICE, preview, f"draft:invert:{draft_id}"))
    await _meanwhile(inverted, discord_env)
    assert "(Inverted.)" in preview.embeds[0]["description"]
    await driver.click(ALICE, preview, f"draft:invert:{draft_id}")  # back to the box

    confirmed = asyncio.create_task(driver.click(ALICE, preview, f"draft:confirm:{draft_id}"))
    await _meanwhile(confirmed, discord_env)
    assert preview.content == "Queued as job #1: progress is in the channel."
    await wait_until(lambda: any("inpaint:cancel:1" in m.custom_ids() for m in fake.channel_messages(PLACE.channel_id)),
                     what="job 1's progress message")


async def test_a_job_longer_than_15_minutes_keeps_showing_progress_and_posts_its_result(tmp_path: Path) -> None:
    async with FalTestServer(key=KEY, queue_polls=10**9, progress_logs=2) as server:
        fake = FakeDiscord()
        with fake.installed():
            async with running_bot(bot_config(tmp_path, server), fake) as (bot, driver):
                record = await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="a slow boat")
                assert "Queued as job #1" in ephemeral_text(record)
                await wait_until(lambda: len(server.requests) == 1, what="the job at the backend")
                job = await bot.services.store.jobs.get(1)
                assert job.status_message_id is not None
                progress = fake.messages[job.status_message_id]

                fake.age_interactions(20 * 60)  # the command's token has expired
                calls_before, edits = len(fake.calls), progress.edits
                await wait_until(lambda: progress.edits > edits + 2, what="progress edits after 20 minutes")
                (request,) = server.requests.values()
                request.queue_polls_left = 0
                result: FakeMessage = await result_message(fake, 1, bot)
                assert (await bot.services.store.jobs.get(1)).status is JobStatus.SUCCEEDED
                assert "result_0.png" in result.files
                assert not [path for _, path in fake.calls[calls_before:] if record.token in path]
