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
from dataclasses import dataclass

import discord
from discord.ext import commands

from cogs import render
from cogs.buttons import ended_view, progress_view
from cogs.interactions import posting_of, services_of
from cogs.posting import ANNOUNCE, OUTCOME, PROGRESS, TIDY, ChannelPosting
from cogs.result_post import ResultPost
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


class DiscordPresenter:
    """Shows jobs in their channels: a `JobListener` for the dispatcher. Every post and edit goes through the
    channel's posting queue (`cogs/posting.py`): outcomes first, then new jobs, then tidying, then progress."""

    def __init__(self, client: discord.Client, jobs: Jobs, posting: ChannelPosting, *,
                 min_edit_interval: float = 2.0) -> None:
        self.client = client
        self.jobs = jobs
        self.posting = posting
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
        assert job.channel_id is not None
        preview = await asyncio.to_thread(mask_overlay_jpeg, images.image, images.mask)
        channel = self._channel(job)
        message = await self.posting.run(job.channel_id, lambda: channel.send(
            embed=render.progress_embed(job, None, local_position=position), view=progress_view(job.id),
            file=discord.File(io.BytesIO(preview), filename=render.PREVIEW_NAME)), priority=ANNOUNCE)
        await self.jobs.set_status_message(job.id, message.id)
        current = await self.jobs.get(job.id)
        if current.terminal:
            view = ended_view(current) if current.result_message_id is None else None
            await self._edit_status(current, embed=render.ended_embed(current), view=view, priority=OUTCOME)

    # --- JobListener --------------------------------------------------------------------------------

    async def job_progress(self, job: Job, progress: Progress) -> None:
        state = self._edits.setdefault(job.id, _EditState())
        state.latest = (job, copy.deepcopy(progress))
        if state.task is not None and not state.task.done():
            return  # an edit is already scheduled or on its way; it shows the latest state next
        delay = max(0.0, state.last_edit + self.min_edit_interval - time.monotonic())
        state.task = asyncio.create_task(self._flush(job.id, delay), name=f"progress-edit-{job.id}")

    async def _flush(self, job_id: int, delay: float) -> None:
        """Show the latest progress, at most every `min_edit_interval` seconds, while there is something new."""
        await asyncio.sleep(delay)
        while (state := self._edits.get(job_id)) is not None and state.latest is not None:
            job, progress = state.latest
            state.latest = None
            if (await self.jobs.get(job_id)).terminal:
                return
            await self._edit_status(job, embed=render.progress_embed(job, progress), view=progress_view(job.id),
                                    priority=PROGRESS)
            state.last_edit = time.monotonic()
            await asyncio.sleep(self.min_edit_interval)

    async def job_succeeded(self, job: Job, output: InpaintOutput, images: list[Blob], *,
                            spoiler: bool = False) -> None:
        await self._settle_edits(job)
        if job.channel_id is None or job.result_message_id is not None:
            return
        if (await self.jobs.get(job.id)).result_message_id is not None:
            return  # posted meanwhile: with another job's result, found again after a restart
        limit = render.DEFAULT_UPLOAD_LIMIT
        guild = self.client.get_guild(job.guild_id) if job.guild_id else None
        if guild is not None:
            limit = render.upload_limit(guild)
        attached = await asyncio.to_thread(render.result_files, images, limit, spoiler=spoiler)
        post = ResultPost(self._channel(job), job, output, attached, limit, self.jobs.set_result_message, spoiler)
        try:  # with other results waiting in a busy channel, this one may go out with them, in one message
            await self.posting.run(job.channel_id, post.alone(), priority=OUTCOME, merge=post)
        except discord.HTTPException:
            log.exception("job %s: could not post the result", job.id)
            return
        finished = await self.jobs.get(job.id)
        self._tidy(finished, embed=render.ended_embed(finished))  # the result is out: this can wait its turn

    async def job_ended(self, job: Job) -> None:
        await self._settle_edits(job)
        await self._edit_status(job, embed=render.ended_embed(job), view=ended_view(job), priority=OUTCOME)

    async def close(self) -> None:
        """Drop pending progress edits (the next start shows progress again from the store)."""
        tasks = [state.task for state in self._edits.values() if state.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._edits.clear()

    # --- helpers ------------------------------------------------------------------------------------

    async def _settle_edits(self, job: Job) -> None:
        """Stop progress edits (scheduled, or waiting in the channel's queue) so they can't overwrite the end."""
        state = self._edits.pop(job.id, None)
        if state is not None and state.task is not None:
            state.task.cancel()
            await asyncio.gather(state.task, return_exceptions=True)
        if job.channel_id is not None:
            self.posting.discard(job.channel_id, ("progress", job.id))

    def _tidy(self, job: Job, *, embed: discord.Embed) -> None:
        """Bring a finished job's progress message to its final state when the channel has time."""
        task = asyncio.ensure_future(self._edit_status(job, embed=embed, view=None, priority=TIDY))
        task.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def _edit_status(self, job: Job, *, embed: discord.Embed, view: discord.ui.View | None,
                           priority: int) -> None:
        if job.status_message_id is None or job.channel_id is None:
            job = await self.jobs.get(job.id)
            if job.status_message_id is None or job.channel_id is None:
                return
        message = self._channel(job).get_partial_message(job.status_message_id)
        key = ("progress", job.id) if priority == PROGRESS else None
        try:
            await self.posting.run(job.channel_id, lambda: message.edit(embed=embed, view=view), priority=priority,
                                   key=key)
        except discord.NotFound:
            log.info("job %s: its progress message was deleted", job.id)
        except discord.HTTPException:
            log.exception("job %s: could not edit its progress message", job.id)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if priority != PROGRESS or (task is not None and task.cancelling()):
                raise  # only a discarded progress edit ends here; this task being cancelled is a real cancellation


class Presenter(commands.Cog):
    """Starts the dispatcher with a `DiscordPresenter` as its listener; stops both when unloaded."""

    def __init__(self, bot: commands.Bot) -> None:
        self.services = services_of(bot)
        self.presenter = DiscordPresenter(bot, self.services.store.jobs, posting_of(bot),
                                          min_edit_interval=self.services.config.progress_edit_interval_s)

    async def cog_load(self) -> None:
        await self.services.dispatcher.start(self.presenter)

    async def cog_unload(self) -> None:
        await self.services.dispatcher.close()
        await self.presenter.close()


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Presenter(bot))
