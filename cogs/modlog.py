"""The moderation log in Discord: every blocked prompt, flagged image (thumbnail behind a spoiler) and moderator
action is posted to the server's mod-log channel, with buttons for moderators: delete the result, ban the user
from the bot, unban. Entries are stored in SQLite whether or not a channel is configured."""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Self, cast

import discord
from PIL import Image

from cogs import render
from cogs.errors import report_error
from services.errors import UserError
from services.moderation import load_policy
from services.store import Job, JobNotFound, ModerationEntry

if TYPE_CHECKING:
    from bot import InpaintBot

log = logging.getLogger(__name__)

_TITLES = {
    "prompt_blocked": "⛔ Prompt blocked",
    "input_flagged": "⛔ Uploaded image flagged",
    "image_flagged_block": "⛔ Result flagged and blocked",
    "image_flagged_spoiler": "⚠️ Result flagged, posted as a spoiler",
    "image_flagged_allow": "⚠️ Result flagged, allowed (age-restricted channel)",
    "result_deleted": "🗑️ Result deleted by a moderator",
    "user_banned": "🔨 User banned from the bot",
    "user_unbanned": "♻️ User unbanned",
    "settings_changed": "⚙️ Settings changed",
}


def _bot(interaction: discord.Interaction) -> InpaintBot:
    return cast("InpaintBot", interaction.client)


def _thumbnail(data: bytes) -> bytes:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.thumbnail((256, 256))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


class ModLog:
    """The `ModLogSink` the services report to."""

    def __init__(self, bot: InpaintBot) -> None:
        self.bot = bot

    async def record(self, entry: ModerationEntry, *, job: Job | None = None, images: Sequence[bytes] = ()) -> None:
        policy = await load_policy(self.bot.store, entry.guild_id)
        if policy.modlog_channel_id is None:
            return
        embed = discord.Embed(title=_TITLES.get(entry.action, entry.action), colour=discord.Colour.orange(),
                              description=render.short(entry.detail, 1500) or None)
        if entry.job_id is not None:
            embed.add_field(name="Job", value=f"#{entry.job_id}", inline=True)
        if entry.user_id is not None:
            embed.add_field(name="User", value=f"<@{entry.user_id}>", inline=True)
        if entry.actor_id is not None:
            embed.add_field(name="By", value=f"<@{entry.actor_id}>", inline=True)
        embed.set_footer(text=f"moderation log #{entry.id}")
        thumbs = await asyncio.to_thread(lambda: [_thumbnail(d) for d in images[:4]])
        files = [discord.File(io.BytesIO(t), filename=f"flagged_{i}.jpg", spoiler=True) for i, t in enumerate(thumbs)]
        view = discord.ui.View(timeout=None)
        if job is not None and job.result_message_id is not None and entry.action != "result_deleted":
            view.add_item(DeleteResultButton(job.id))
        if entry.user_id is not None and entry.action not in ("user_banned", "user_unbanned", "settings_changed"):
            view.add_item(BanButton(entry.guild_id, entry.user_id))
            view.add_item(UnbanButton(entry.guild_id, entry.user_id))
        channel = self.bot.get_partial_messageable(policy.modlog_channel_id, guild_id=entry.guild_id)
        try:
            await channel.send(embed=embed, files=files, view=view if view.children else discord.utils.MISSING,
                               allowed_mentions=discord.AllowedMentions.none())
        except discord.HTTPException:
            log.exception("could not post moderation log entry %s", entry.id)


def _require_moderator(interaction: discord.Interaction) -> None:
    if not render.is_moderator(interaction):
        raise UserError("Only moderators (Manage Messages) can do that.")


class _ModButton:
    label = ""
    emoji = ""
    style = discord.ButtonStyle.secondary

    def _button(self, custom_id: str) -> discord.ui.Button[Any]:
        return discord.ui.Button(label=self.label, emoji=self.emoji or None, style=self.style, custom_id=custom_id)

    async def callback(self, interaction: discord.Interaction) -> None:
        try:
            _require_moderator(interaction)
            await self.run(interaction)
        except Exception as exc:
            await report_error(interaction, exc)

    async def run(self, interaction: discord.Interaction) -> None:
        raise NotImplementedError


_Dynamic = discord.ui.DynamicItem[discord.ui.Button[Any]]


class _UserButton(_ModButton):
    """A moderator button about one user of one server: `modlog:<verb>:<guild id>:<user id>`."""

    verb = ""

    def __init__(self, guild_id: int, user_id: int) -> None:
        super().__init__(self._button(f"modlog:{self.verb}:{guild_id}:{user_id}"))  # type: ignore[call-arg]
        self.guild_id, self.user_id = guild_id, user_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction[discord.Client], item: discord.ui.Item[Any],
                             match: re.Match[str], /) -> Self:
        return cls(int(match["guild"]), int(match["user"]))

    async def _done(self, interaction: discord.Interaction, text: str, action: str) -> None:
        """Tell the moderator, then record the action in the moderation log (and its channel)."""
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=discord.AllowedMentions.none())
        bot = _bot(interaction)
        entry = await bot.moderation.log(self.guild_id, action, user_id=self.user_id, actor_id=interaction.user.id)
        await bot.modlog.record(entry)


class BanButton(_UserButton, _Dynamic, template=r"modlog:ban:(?P<guild>\d+):(?P<user>\d+)"):
    verb, label, emoji, style = "ban", "Ban from bot", "🔨", discord.ButtonStyle.danger

    async def run(self, interaction: discord.Interaction) -> None:
        if not await _bot(interaction).moderation.ban(self.guild_id, self.user_id, by=interaction.user.id):
            raise UserError(f"<@{self.user_id}> is already banned from the bot.")
        await self._done(interaction, f"Banned <@{self.user_id}> from the bot.", "user_banned")


class UnbanButton(_UserButton, _Dynamic, template=r"modlog:unban:(?P<guild>\d+):(?P<user>\d+)"):
    verb, label, emoji = "unban", "Unban", "♻️"

    async def run(self, interaction: discord.Interaction) -> None:
        if not await _bot(interaction).moderation.unban(self.guild_id, self.user_id):
            raise UserError(f"<@{self.user_id}> isn't banned from the bot.")
        await self._done(interaction, f"Unbanned <@{self.user_id}>.", "user_unbanned")


class DeleteResultButton(_ModButton, _Dynamic, template=r"modlog:delete:(?P<job_id>\d+)"):
    label, emoji = "Delete result", "🗑️"

    def __init__(self, job_id: int) -> None:
        super().__init__(self._button(f"modlog:delete:{job_id}"))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction[discord.Client], item: discord.ui.Item[Any],
                             match: re.Match[str], /) -> Self:
        return cls(int(match["job_id"]))

    async def run(self, interaction: discord.Interaction) -> None:
        bot = _bot(interaction)
        try:
            job = await bot.store.get_job(self.job_id)
        except JobNotFound as exc:
            raise UserError(f"Job #{self.job_id} no longer exists.") from exc
        if job.result_message_id is None or job.channel_id is None:
            raise UserError(f"Job #{job.id} has no posted result.")
        message = bot.get_partial_messageable(job.channel_id).get_partial_message(job.result_message_id)
        try:
            await message.delete()
        except discord.NotFound as exc:
            raise UserError(f"Job #{job.id}'s result was already deleted.") from exc
        await interaction.response.send_message(f"Deleted the result of job #{job.id}.", ephemeral=True)
        await record_deletion(bot, job, interaction.user.id)


async def record_deletion(bot: InpaintBot, job: Job, actor_id: int) -> None:
    """A moderator deleted someone's result: keep it in the job's history and the moderation log."""
    await bot.store.add_event(job.id, "moderation", f"result deleted by {actor_id}", {"by": actor_id})
    if job.guild_id is not None:
        entry = await bot.moderation.log(job.guild_id, "result_deleted", job_id=job.id, user_id=job.user_id,
                                         actor_id=actor_id)
        await bot.modlog.record(entry)


MODLOG_BUTTONS: tuple[type[_Dynamic], ...] = (BanButton, UnbanButton, DeleteResultButton)
