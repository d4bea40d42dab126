"""A job's result message, as one of the channel's posting queue's operations. Alone it is the full result (embed,
files, three rows of buttons); when results pile up in a busy channel, up to five go out as one message: each job's
embed and files, and a row of buttons per job (`cogs/shared_results.py` takes one back out)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import discord

from cogs import fit, render
from cogs.buttons import SHARED_MOST, result_view, shared_result_view
from cogs.shared_results import prefix_for
from services.job_state import Job
from services.schema import InpaintOutput

log = logging.getLogger(__name__)

MAX_FILES = 10  # Discord's most attachments on one message
_MENTIONS = discord.AllowedMentions(users=True, roles=False, everyone=False)


@dataclass(frozen=True)
class ResultPost:
    """Posting job `job`'s result in `channel`: `alone()`, or `together()` with others (`posting.Mergeable`)."""

    channel: discord.abc.Messageable
    job: Job
    output: InpaintOutput
    attached: render.ResultFiles
    limit: int  # the server's upload limit, for all of a message's files together
    #: stores that the job's result is posted as a message (job id, message id): done as part of posting, so a
    #: result that went out is recorded even if the job waiting for it was stopped meanwhile (no second post)
    record: Callable[[int, int], Awaitable[None]]
    spoiler: bool = False

    def alone(self) -> Callable[[], Awaitable[discord.Message]]:
        embed = render.result_embed(self.job, self.output, self.attached, spoiler=self.spoiler)
        files, view = self.attached.files, result_view(self.job.id)

        async def post() -> discord.Message:
            message = await self.channel.send(content=f"<@{self.job.user_id}>", embed=embed, files=files, view=view,
                                              allowed_mentions=_MENTIONS)
            await _recorded([self], message)
            return message
        return post

    def joins(self, batch: Sequence[ResultPost]) -> bool:
        group = [*batch, self]
        return (len(group) <= SHARED_MOST
                and sum(len(post.attached.encoded) for post in group) <= MAX_FILES
                and sum(post.attached.size for post in group) <= 0.95 * min(post.limit for post in group)
                and sum(len(post._shared_embed()) for post in group) <= fit.EMBED_TOTAL)

    def together(self, batch: Sequence[ResultPost]) -> Callable[[], Awaitable[discord.Message]]:
        embeds = [post._shared_embed() for post in batch]
        files = [file for post in batch for file in post.attached.prefixed(prefix_for(post.job.id)).files]
        mentions = " ".join(f"<@{user_id}>" for user_id in dict.fromkeys(post.job.user_id for post in batch))
        view = shared_result_view([post.job.id for post in batch])

        async def post_all() -> discord.Message:
            message = await self.channel.send(content=mentions, embeds=embeds, files=files, view=view,
                                              allowed_mentions=_MENTIONS)
            await _recorded(batch, message)
            return message
        return post_all

    def _shared_embed(self) -> discord.Embed:
        return render.result_embed(self.job, self.output, self.attached.prefixed(prefix_for(self.job.id)),
                                   spoiler=self.spoiler)


async def _recorded(posts: Sequence[ResultPost], message: discord.Message) -> None:
    for post in posts:
        try:
            await post.record(post.job.id, message.id)
        except Exception:  # posted all the same: never let this look like a failed post (that would post again)
            log.exception("job %s: posted as message %s, but recording that failed", post.job.id, message.id)
