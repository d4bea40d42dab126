"""Mask conventions and the mask preview through the Discord layer: a colour painted on the image, a painted
copy as the mask, a refused mask shown back as a picture, and Confirm / Invert / Cancel before spending."""

from __future__ import annotations

import copy
import io

from PIL import Image, ImageDraw

from bot import InpaintBot
from services.job_state import JobStatus
from tests.conftest import BotEnv
from tests.helpers.bot_env import ALICE, BOB, PLACE, ephemeral_text, result_message
from tests.helpers.discord_harness import FakeMessage, InteractionRecord
from tests.helpers.imagegen import encode, photo


def _painted(colour: tuple[int, int, int] = (255, 0, 255)) -> Image.Image:
    image = photo(256, 192).copy()
    ImageDraw.Draw(image).ellipse((100, 60, 180, 140), fill=colour)
    return image


async def _stored_mask(bot: InpaintBot, job_id: int) -> Image.Image:
    return Image.open(io.BytesIO((await bot.services.store.jobs.blobs(job_id))["mask"].data)).convert("L")


async def test_colour_painted_on_the_image(discord_env: BotEnv) -> None:
    bot, fake, driver = discord_env
    image = fake.upload(PLACE.channel_id, "painted.png", encode(_painted()), "image/png")
    await driver.slash(ALICE, "inpaint", image=image, prompt="a moon", mask_colour="magenta")
    await result_message(fake, 1, bot)
    mask = await _stored_mask(bot, 1)
    assert mask.getpixel((140, 100)) == 255 and mask.getpixel((20, 20)) == 0
    bad = await driver.slash(ALICE, "inpaint", image=image, prompt="a moon", mask_colour="chartreuse-ish")
    assert "isn't a colour" in ephemeral_text(bad)


async def test_painted_copy_as_the_mask(discord_env: BotEnv) -> None:
    bot, fake, driver = discord_env
    original = fake.upload(PLACE.channel_id, "photo.png", encode(photo(256, 192)), "image/png")
    copy = fake.upload(PLACE.channel_id, "painted.jpg", encode(_painted((0, 255, 0)), "JPEG", quality=90),
                       "image/jpeg")
    await driver.slash(ALICE, "inpaint", image=original, mask=copy, prompt="a moon")
    await result_message(fake, 1, bot)
    mask = await _stored_mask(bot, 1)
    assert mask.getpixel((140, 100)) == 255 and mask.getpixel((20, 20)) == 0


async def test_empty_mask_is_refused_with_a_picture(discord_env: BotEnv) -> None:
    bot, fake, driver = discord_env
    image = fake.upload(PLACE.channel_id, "photo.png", encode(photo(256, 192)), "image/png")
    black = fake.upload(PLACE.channel_id, "mask.png", encode(Image.new("L", (256, 192), 0)), "image/png")
    record = await driver.slash(ALICE, "inpaint", image=image, mask=black, prompt="x")
    reply = record.followups[-1]
    assert "The mask is empty" in reply.content and "Right: the mask" in reply.content and reply.ephemeral
    picture = Image.open(io.BytesIO(reply.files["understood.jpg"]))
    assert picture.width > picture.height  # the image and its mask, side by side
    assert await bot.services.store.jobs.for_user(10) == []


def _followup_with(record: InteractionRecord, custom_id_prefix: str) -> FakeMessage:
    for message in record.followups:
        if any(c.startswith(custom_id_prefix) for c in message.custom_ids()):
            return message
    raise AssertionError(f"no follow-up with {custom_id_prefix}: {record.texts()}")


async def test_confirm_masks_invert_confirm_cancel(discord_env: BotEnv) -> None:
    bot, fake, driver = discord_env
    await bot.services.store.server_settings.save(PLACE.guild_id, {"confirm_masks": True})
    image = fake.upload(PLACE.channel_id, "photo.png", encode(photo(256, 192)), "image/png")
    small = Image.new("L", (256, 192), 0)
    small.paste(255, (0, 0, 64, 48))
    mask = fake.upload(PLACE.channel_id, "mask.png", encode(small), "image/png")

    record = await driver.slash(ALICE, "inpaint", image=image, mask=mask, prompt="a kite")
    preview = _followup_with(record, "draft:confirm:")
    assert preview.ephemeral and list(preview.files) == ["mask-preview.jpg"]
    assert "(6% of the image)" in preview.embeds[0]["description"]
    assert await bot.services.store.jobs.for_user(10) == []  # nothing spent yet
    draft_id = preview.custom_ids()[0].rsplit(":", 1)[1]

    other = await driver.click(BOB, preview, f"draft:confirm:{draft_id}")
    assert "Only the person who started this" in ephemeral_text(other)

    inverted = await driver.click(ALICE, preview, f"draft:invert:{draft_id}")
    assert inverted.responses == [{"type": 6}]  # answered at once; the preview is then edited in place
    assert "(94% of the image)" in preview.embeds[0]["description"] and list(preview.files) == ["mask-preview.jpg"]

    stale = copy.deepcopy(preview)  # as a second client still shows it, buttons and all
    confirmed = await driver.click(ALICE, preview, f"draft:confirm:{draft_id}")
    assert confirmed.responses == [{"type": 6}]
    assert preview.content == "Queued as job #1: progress is in the channel." and preview.custom_ids() == []
    await result_message(fake, 1, bot)
    stored = await _stored_mask(bot, 1)
    assert stored.getpixel((10, 10)) == 0 and stored.getpixel((200, 150)) == 255  # the inverted mask ran
    again = await driver.click(ALICE, stale, f"draft:confirm:{draft_id}")
    assert "already been confirmed or cancelled" in ephemeral_text(again)

    record = await driver.slash(ALICE, "inpaint", image=image, mask=mask, prompt="another kite")
    preview = _followup_with(record, "draft:cancel:")
    cancel_id = preview.custom_ids()[2]
    cancelled = await driver.click(ALICE, preview, cancel_id)
    assert cancelled.responses[-1]["data"]["content"] == "Cancelled: nothing was spent."
    assert [j.id for j in await bot.services.store.jobs.for_user(10)] == [1]
    assert (await bot.services.store.jobs.get(1)).status is JobStatus.SUCCEEDED
