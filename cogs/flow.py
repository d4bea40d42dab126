"""Starting a job in a channel: the progress message with its preview, then the dispatcher's queue."""

from __future__ import annotations

import asyncio
import io
from typing import TYPE_CHECKING

import discord
from PIL import Image

from cogs.render import is_moderator
from services.admission import Requester
from services.errors import UserError
from services.images import PreparedInputs
from services.preview import mask_overlay_jpeg
from services.store import Job

if TYPE_CHECKING:
    from bot import InpaintBot


def requester(interaction: discord.Interaction) -> Requester:
    """Who is asking, and where: what moderation needs to know about an interaction."""
    channel = interaction.channel
    is_nsfw = getattr(channel, "is_nsfw", None)
    age_restricted = bool(is_nsfw()) if callable(is_nsfw) else False
    roles = tuple(role.id for role in getattr(interaction.user, "roles", []))
    return Requester(guild_id=interaction.guild_id, channel_id=interaction.channel_id, user_id=interaction.user.id,
                     role_ids=roles, age_restricted=age_restricted, moderator=is_moderator(interaction))


async def launch_job(bot: InpaintBot, job: Job, prepared: PreparedInputs) -> None:
    """A new job whose images are in hand: queue it, and post its progress message with a preview."""
    bot.dispatcher.enqueue(job)
    preview = await asyncio.to_thread(mask_overlay_jpeg, prepared.image, prepared.mask)
    await _post_progress(bot, job, preview)


async def launch_stored_job(bot: InpaintBot, job: Job) -> None:
    """A job derived from an earlier one: its preview is rebuilt from the stored blobs."""
    blobs = await bot.store.job_blobs(job.id)
    if "image" not in blobs or "mask" not in blobs:
        raise UserError(f"Job #{job.id}'s images are no longer stored.")

    def render() -> bytes:
        image = Image.open(io.BytesIO(blobs["image"].data))
        mask = Image.open(io.BytesIO(blobs["mask"].data))
        return mask_overlay_jpeg(image.convert("RGB"), mask.convert("L"))

    bot.dispatcher.enqueue(job)
    await _post_progress(bot, job, await asyncio.to_thread(render))


async def _post_progress(bot: InpaintBot, job: Job, preview: bytes) -> None:
    """Post the progress message; the job is already queued, so if posting fails it is cancelled."""
    try:
        await bot.presenter.post_progress(job, preview)
    except Exception:
        await bot.dispatcher.cancel(job.id)
        raise
