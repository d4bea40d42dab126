"""Messages that show several jobs' results (posted together when a channel was busy, `cogs/result_post.py`):
which jobs a result message shows, and removing one job's result from it without touching the others'.

A shared message gives each job one row of buttons, its own embed (titled "… · job #<id>") and its own files
(named `job<id>_result_<n>.<ext>`), so each job's part can be told apart from what Discord sends back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import discord

_JOB_ID = re.compile(r"^inpaint:\w+:(\d+)$")
_TITLE = re.compile(r"job #(\d+)$")


def prefix_for(job_id: int) -> str:
    """What a job's file names start with in a shared message."""
    return f"job{job_id}_"


def jobs_shown(message: discord.Message) -> list[int]:
    """The jobs whose buttons the message carries, in order."""
    found: dict[int, None] = {}
    for row in message.components:
        for child in getattr(row, "children", []):
            match = _JOB_ID.match(getattr(child, "custom_id", None) or "")
            if match:
                found[int(match[1])] = None
    return list(found)


async def remove_result(message: discord.Message, job_id: int,
                        view_for: Callable[[Sequence[int]], discord.ui.View]) -> None:
    """Delete job `job_id`'s result: the whole message when it is the job's alone, or the job's embed, files and
    buttons when the message shows other jobs' results too (`view_for` gives the buttons for those)."""
    others = [shown for shown in jobs_shown(message) if shown != job_id]
    if not others:
        await message.delete()
        return
    prefix = prefix_for(job_id)
    embeds = [embed for embed in message.embeds if not _shows(embed, job_id)]
    attachments = [a for a in message.attachments if not a.filename.removeprefix("SPOILER_").startswith(prefix)]
    await message.edit(embeds=embeds, attachments=attachments, view=view_for(others))


def _shows(embed: discord.Embed, job_id: int) -> bool:
    match = _TITLE.search(embed.title or "")
    return match is not None and int(match[1]) == job_id

