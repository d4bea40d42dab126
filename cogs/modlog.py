"""The moderation log in Discord: every blocked prompt, flagged image (thumbnail behind a spoiler) and moderator
action is posted to the server's mod-log channel, with buttons for moderators: delete the result, ban the user
from the bot, unban. Entries are stored in SQLite whether or not a channel is configured."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Sequence
from typing import Any

import discord
from discord.ext import commands
from PIL import Image

from cogs import fit
from cogs.buttons import job_or_refusal, record_deletion, shared_result_view
from cogs.interactions import is_moderator, posting_of, services_of
from cogs.items import DynamicButton, PersistentButton, view_of
from cogs.posting import ANNOUNCE, ChannelPosting
from cogs.shared_results import remove_result
from services.errors import UserError
from services.job_state import Job
from services.store.moderation import ModerationEntry
from services.store.server_settings import ServerSettingsStore

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
    "spend_budget_reached": "💸 Bot-wide daily budget reached",
}


def _thumbnail(data: bytes) -> bytes:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.thumbnail((256, 256))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


class ModLogPoster:
    """A `ModLogSink`: posts each moderation entry to its server's mod-log channel, when one is set."""

    def __init__(self, client: discord.Client, settings: ServerSettingsStore, posting: ChannelPosting) -> None:
        self.client = client
        self.settings = settings
        self.posting = posting

    async def show(self, entry: ModerationEntry, *, job: Job | None = None, images: Sequence[bytes] = ()) -> None:
        settings = await self.settings.load(entry.guild_id)
        if settings.modlog_channel_id is None:
            return
        embed = discord.Embed(title=_TITLES.get(entry.action, entry.action), colour=discord.Colour.orange(),
                              description=fit.short(entry.detail, 1500) or None)
        if entry.job_id is not None:
            embed.add_field(name="Job", value=f"#{entry.job_id}", inline=True)
        if entry.user_id is not None:
            embed.add_field(name="User", value=f"<@{entry.user_id}>", inline=True)
        if entry.actor_id is not None:
            embed.add_field(name="By", value=f"<@{entry.actor_id}>", inline=True)
        embed.set_footer(text=f"moderation log #{entry.id}")
        embed = fit.embed(embed)
        thumbs = await asyncio.to_thread(lambda: [_thumbnail(d) for d in images[:4]])
        files = [discord.File(io.BytesIO(t), filename=f"flagged_{i}.jpg", spoiler=True) for i, t in enumerate(thumbs)]
        buttons: list[discord.ui.Item[Any]] = []
        if job is not None and job.result_message_id is not None and job.result_removed_at is None \
                and entry.action != "result_deleted":
            buttons.append(DeleteResultButton(job.id))
        if entry.user_id is not None and entry.action not in ("user_banned", "user_unbanned", "settings_changed"):
            buttons += [BanButton(entry.guild_id, entry.user_id), UnbanButton(entry.guild_id, entry.user_id)]
        channel = self.client.get_partial_messageable(settings.modlog_channel_id, guild_id=entry.guild_id)
        # queued, not awaited: whoever records an entry (a command being answered, a job) needn't wait for a busy
        # mod-log channel
        posted = self.posting.submit(channel.id, lambda: channel.send(
            embed=embed, files=files, view=view_of(*buttons) if buttons else discord.utils.MISSING,
            allowed_mentions=discord.AllowedMentions.none()), priority=ANNOUNCE)
        posted.add_done_callback(lambda done: _report(done, entry))


def _report(posted: asyncio.Future[Any], entry: ModerationEntry) -> None:
    if not posted.cancelled() and isinstance(posted.exception(), discord.HTTPException):
        log.error("could not post moderation log entry %s: %s", entry.id, posted.exception())


class ModButton(PersistentButton):
    """`modlog:<action>:…`: only moderators (Manage Messages) may press these."""

    prefix = "modlog"

    async def authorize(self, interaction: discord.Interaction) -> None:
        if not is_moderator(interaction):
            raise UserError("Only moderators (Manage Messages) can do that.")


class UserModButton(ModButton):
    """A moderator button about one user of one server: `modlog:<action>:<guild id>:<user id>`."""

    fields = (("guild_id", int), ("user_id", int))

    @property
    def guild_id(self) -> int:
        return int(self.ids[0])

    @property
    def user_id(self) -> int:
        return int(self.ids[1])

    async def _done(self, interaction: discord.Interaction, text: str, action: str) -> None:
        """Tell the moderator, then record the action in the moderation log (and its channel)."""
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=discord.AllowedMentions.none())
        await services_of(interaction.client).modlog.record(self.guild_id, action, user_id=self.user_id,
                                                            actor_id=interaction.user.id)


class BanButton(UserModButton, DynamicButton, action="ban"):
    label, emoji, style = "Ban from bot", "🔨", discord.ButtonStyle.danger

    async def run(self, interaction: discord.Interaction) -> None:
        if not await services_of(interaction.client).store.bans.ban(self.guild_id, self.user_id,
                                                                     by=interaction.user.id):
            raise UserError(f"<@{self.user_id}> is already banned from the bot.")
        await self._done(interaction, f"Banned <@{self.user_id}> from the bot.", "user_banned")


class UnbanButton(UserModButton, DynamicButton, action="unban"):
    label, emoji = "Unban", "♻️"

    async def run(self, interaction: discord.Interaction) -> None:
        if not await services_of(interaction.client).store.bans.unban(self.guild_id, self.user_id):
            raise UserError(f"<@{self.user_id}> isn't banned from the bot.")
        await self._done(interaction, f"Unbanned <@{self.user_id}>.", "user_unbanned")


class DeleteResultButton(ModButton, DynamicButton, action="delete"):
    label, emoji = "Delete result", "🗑️"
    fields = (("job_id", int),)

    async def run(self, interaction: discord.Interaction) -> None:
        job = await job_or_refusal(interaction.client, int(self.ids[0]))
        await interaction.response.defer(ephemeral=True, thinking=True)  # the channel may be busy: answer first
        await remove_result(interaction.client, job, interaction.user.id, None, shared_result_view)
        await interaction.followup.send(f"Deleted the result of job #{job.id}.", ephemeral=True)
        await record_deletion(interaction.client, job, interaction.user.id)


MODLOG_BUTTONS: tuple[type[DynamicButton], ...] = (BanButton, UnbanButton, DeleteResultButton)


class ModLog(commands.Cog):
    """Shows the moderation log in each server's mod-log channel while loaded."""

    def __init__(self, bot: commands.Bot) -> None:
        self.services = services_of(bot)
        self.poster = ModLogPoster(bot, self.services.store.server_settings, posting_of(bot))

    async def cog_load(self) -> None:
        self.services.modlog.subscribe(self.poster)

    async def cog_unload(self) -> None:
        self.services.modlog.unsubscribe(self.poster)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(ModLog(bot))
