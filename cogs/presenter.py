"""The dispatcher's listener in Discord: one progress message per job (posted when the job is queued, edited at
most every ~2 s), the result posted as a channel message with buttons, failures shown with a Retry button.
Discord errors are logged, never raised back into the dispatcher (except when the progress message itself can't be
posted: the dispatcher then cancels the job).

As an extension, it starts the dispatcher with itself as the listener (recovering what a previous process left
unfinished) and stops it when unloaded."""

from __future__ import annotations

import asyncio
import copy
import io
import logging
import time
from dataclasses import dataclass, field

import discord
from discord.ext import commands

from cogs import render
from cogs.buttons import ended_view, progress_view, result_view
from cogs.interactions import services_of
from services.blob import Blob
from services.dispatch import JobImages
from services.job_state import Job
from services.preview import mask_overlay_jpeg
from services.progress import Progress
from services.schema import InpaintOutput
from services.store.jobs import Jobs

log = logging.getLogger(__name__)


@dataclass
class _EditState:
    last_edit: float = 0.0
    latest: tuple[Job, Progress] | None = None
    task: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class DiscordPresenter:
    """Shows jobs in their channels: a `JobListener` for the dispatcher."""

    def __init__(self, client: discord.Client, jobs: Jobs, *, min_edit_interval: float = 2.0) -> None:
        self.client = client
        self.jobs = jobs
        self.min_edit_interval = min_edit_interval
        self._edits: dict[int, _EditState] = {}

    def _channel(self, job: Job) -> discord.PartialMessageable:
        assert job.channel_id is not None
        return self.client.get_partial_messageable(job.channel_id, guild_id=job.guild_id)

    async def job_queued(self, job: Job, images: JobImages, position: int | None) -> None:
        """Post the job's progress message (image with the mask overlaid, status, Cancel) and remember it.

        The job is already queued, so it may have finished (or failed) while this message was on its way: then
        the message is brought to the final state at once.
        """
        preview = await asyncio.to_thread(mask_overlay_jpeg, images.image, images.mask)
        message = await self._channel(job).send(
            embed=render.progress_embed(job, None, local_position=position), view=progress_view(job.id),
            file=discord.File(io.BytesIO(preview), filename=render.PREVIEW_NAME))
        await self.jobs.set_status_message(job.id, message.id)
        current = await self.jobs.get(job.id)
        if current.terminal:
            view = ended_view(current) if current.result_message_id is None else None
            await self._edit_status(current, embed=render.ended_embed(current), view=view)

    # --- JobListener --------------------------------------------------------------------------------

    async def job_progress(self, job: Job, progress: Progress) -> None:
        state = self._edits.setdefault(job.id, _EditState())
        state.latest = (job, copy.deepcopy(progress))
        if state.task is not None and not state.task.done():
            return  # an edit is already scheduled; it will show this latest state
        delay = max(0.0, state.last_edit + self.min_edit_interval - time.monotonic())
        state.task = asyncio.create_task(self._flush(job.id, delay), name=f"progress-edit-{job.id}")

    async def _flush(self, job_id: int, delay: float) -> None:
        await asyncio.sleep(delay)
        state = self._edits.get(job_id)
        if state is None or state.latest is None:
            return
        async with state.lock:
            job, progress = state.latest
            state.latest = None
            current = await self.jobs.get(job_id)
            if current.terminal:
                return
            await self._edit_status(job, embed=render.progress_embed(job, progress), view=progress_view(job.id))
            state.last_edit = time.monotonic()

    async def job_succeeded(self, job: Job, output: InpaintOutput, images: list[Blob], *,
                            spoiler: bool = False) -> None:
        await self._settle_edits(job.id)
        if job.channel_id is None or job.result_message_id is not None:
            return
        limit = render.DEFAULT_UPLOAD_LIMIT
        guild = self.client.get_guild(job.guild_id) if job.guild_id else None
        if guild is not None:
            limit = render.upload_limit(guild)
        attached = await asyncio.to_thread(render.result_files, images, limit, spoiler=spoiler)
        try:
            message = await self._channel(job).send(
                content=f"<@{job.user_id}>", embed=render.result_embed(job, output, attached, spoiler=spoiler),
                files=attached.files,
                view=result_view(job.id), allowed_mentions=discord.AllowedMentions(users=True, roles=False,
                                                                                   everyone=False))
        except discord.HTTPException:
            log.exception("job %s: could not post the result", job.id)
            return
        await self.jobs.set_result_message(job.id, message.id)
        await self._edit_status(job, embed=render.ended_embed(await self.jobs.get(job.id)), view=None)

    async def job_ended(self, job: Job) -> None:
        await self._settle_edits(job.id)
        await self._edit_status(job, embed=render.ended_embed(job), view=ended_view(job))

    async def close(self) -> None:
        """Drop pending progress edits (the next start shows progress again from the store)."""
        tasks = [state.task for state in self._edits.values() if state.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._edits.clear()

    # --- helpers ------------------------------------------------------------------------------------

    async def _settle_edits(self, job_id: int) -> None:
        """Stop pending progress edits so they can't overwrite the final state."""
        state = self._edits.pop(job_id, None)
        if state is not None and state.task is not None:
            state.task.cancel()
            async with state.lock:
                pass

    async def _edit_status(self, job: Job, *, embed: discord.Embed, view: discord.ui.View | None) -> None:
        if job.status_message_id is None or job.channel_id is None:
            job = await self.jobs.get(job.id)
            if job.status_message_id is None or job.channel_id is None:
                return
        message = self._channel(job).get_partial_message(job.status_message_id)
        try:
            await message.edit(embed=embed, view=view)
        except discord.NotFound:
            log.info("job %s: its progress message was deleted", job.id)
        except discord.HTTPException:
            log.exception("job %s: could not edit its progress message", job.id)


class Presenter(commands.Cog):
    """Starts the dispatcher with a `DiscordPresenter` as its listener; stops both when unloaded."""

    def __init__(self, bot: commands.Bot) -> None:
        self.services = services_of(bot)
        self.presenter = DiscordPresenter(bot, self.services.store.jobs,
                                          min_edit_interval=self.services.config.progress_edit_interval_s)

    async def cog_load(self) -> None:
        await self.services.dispatcher.start(self.presenter)

    async def cog_unload(self) -> None:
        await self.services.dispatcher.close()
        await self.presenter.close()


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Presenter(bot))
