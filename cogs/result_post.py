"""A job's result message, as one of the channel's posting queue's operations. Alone it is the full result (embed,
files, three rows of buttons); when results pile up in a busy channel, up to five go out as one message: each job's
embed and files, and a row of buttons per job (`cogs/shared_results.py` takes one back out).

Posted once, even across a crash: a result message carries a nonce made from its (lowest) job id, which
discord.py sends with `enforce_nonce`, so Discord answers a repeat within a few minutes with the message it already
made instead of a second one (https://discord.com/developers/docs/resources/message#create-message). If the bot
died after Discord made the message but before the store recorded it, the restart's post of that job gets the
message back, and every job it shows is recorded as posted."""

from __future__ import annotations

import logging
import re
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
_DELETE_ID = re.compile(r"inpaint:delete:(\d+)")  # every job a result message shows has its Delete button


def result_nonce(job_ids: Sequence[int]) -> str:
    """The nonce of a message showing these jobs' results (Discord's limit: 25 characters)."""
    return f"inpaint-result-{min(job_ids)}"


def shown_jobs(message: discord.Message) -> list[int]:
    """The jobs whose results a result message shows, from its buttons."""
    ids: list[int] = []
    for row in message.components:
        for item in getattr(row, "children", [row]):
            match = _DELETE_ID.fullmatch(getattr(item, "custom_id", None) or "")
            if match:
                ids.append(int(match.group(1)))
    return ids


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
                                              allowed_mentions=_MENTIONS, nonce=result_nonce([self.job.id]))
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
                                              allowed_mentions=_MENTIONS,
                                              nonce=result_nonce([post.job.id for post in batch]))
            await _recorded(batch, message)
            return message
        return post_all

    def _shared_embed(self) -> discord.Embed:
        return render.result_embed(self.job, self.output, self.attached.prefixed(prefix_for(self.job.id)),
                                   spoiler=self.spoiler)


async def _recorded(posts: Sequence[ResultPost], message: discord.Message) -> None:
    """Record the jobs as posted in `message`, and any other job it shows: a message Discord gave back for a nonce
    it had seen was made before a crash, maybe for several jobs."""
    job_ids = list(dict.fromkeys([*(post.job.id for post in posts), *shown_jobs(message)]))
    for job_id in job_ids:
        try:
            await posts[0].record(job_id, message.id)
        except Exception:  # posted all the same: never let this look like a failed post (that would post again)
            log.exception("job %s: posted as message %s, but recording that failed", job_id, message.id)
