"""Taking a job's result out of its channel: the whole message when it shows that job alone, or the job's part of a
message showing several jobs' results (posted together when a channel was busy, `cogs/result_post.py`).

A shared message gives each job its own embed (titled "… · job #<id>"), its own files (named
`job<id>_result_<n>.<ext>`) and a row of buttons. The store says which jobs a message still shows (a removed
result is marked, never forgotten: it is not posted again on a restart), and removals run through the channel's
posting queue one at a time, each working from the store's answer at that moment: two removals from one message,
however close, end with exactly the other jobs' parts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import discord

from cogs.interactions import posting_of, services_of
from cogs.posting import OUTCOME
from services.errors import UserError
from services.job_state import Job

_TITLE = re.compile(r"job #(\d+)$")


def prefix_for(job_id: int) -> str:
    """What a job's file names start with in a shared message."""
    return f"job{job_id}_"


async def remove_result(client: discord.Client, job: Job, actor_id: int, shown: discord.Message | None,
                        view_for: Callable[[Sequence[int]], discord.ui.View]) -> None:
    """Take job `job`'s result out of its channel (`shown`: the result message as the caller has it, if at hand;
    `view_for`: the buttons for the jobs a shared message keeps). Raises `UserError` when it is already gone or
    Discord won't let it be removed."""
    if job.result_message_id is None or job.channel_id is None:
        raise UserError(f"Job #{job.id} has no posted result.")
    jobs = services_of(client).store.jobs
    if not await jobs.set_result_removed(job.id, actor_id):
        raise UserError(f"Job #{job.id}'s result was already deleted.")
    channel = client.get_partial_messageable(job.channel_id, guild_id=job.guild_id)
    message_id = job.result_message_id

    async def apply() -> None:
        remaining = await jobs.sharing_result_message(message_id)
        if not remaining:
            await channel.get_partial_message(message_id).delete()
            return
        current = shown if shown is not None and shown.id == message_id else await channel.fetch_message(message_id)
        await current.edit(**_keeping(current, remaining, view_for))

    try:
        await posting_of(client).run(job.channel_id, apply, priority=OUTCOME)
    except discord.NotFound:
        return  # the message is gone already
    except discord.HTTPException as exc:
        await jobs.set_result_removed(job.id, actor_id, removed=False)
        if isinstance(exc, discord.Forbidden):
            raise UserError(f"Job #{job.id}'s result shares a message with other results: to take it out, I need "
                            f"Read Message History in <#{job.channel_id}>.") from exc
        raise UserError(f"Discord didn't let me remove job #{job.id}'s result ({exc.status}); try again.") from exc


def _keeping(message: discord.Message, remaining: Sequence[int],
             view_for: Callable[[Sequence[int]], discord.ui.View]) -> dict[str, Any]:
    """The edit that leaves only `remaining` jobs' parts of a shared message. Each kept embed shows its picture by
    attachment name again (Discord hands back CDN addresses, which expire and would show the picture twice)."""
    prefixes = tuple(prefix_for(job_id) for job_id in remaining)
    attachments = [a for a in message.attachments if a.filename.removeprefix("SPOILER_").startswith(prefixes)]
    names = {a.filename for a in attachments}
    embeds = []
    for embed in message.embeds:
        match = _TITLE.search(embed.title or "")
        if match is None or int(match[1]) not in remaining:
            continue
        kept = embed.copy()
        name = _file_name(embed.image.url or "")
        if name in names:
            kept.set_image(url=f"attachment://{name}")
        embeds.append(kept)
    return {"embeds": embeds, "attachments": attachments, "view": view_for(remaining)}


def _file_name(url: str) -> str:
    if url.startswith("attachment://"):
        return url.removeprefix("attachment://")
    return urlsplit(url).path.rsplit("/", 1)[-1]
