"""Confirm-your-mask: on servers that ask for it, /inpaint first shows its author the image with the mask overlaid
and waits for Confirm, Invert or Cancel (ephemeral, author only) before anything is spent."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import re
import secrets
from typing import TYPE_CHECKING, Any, Self, cast

import discord
from PIL import ImageOps

from cogs import render
from cogs.errors import report_error
from cogs.flow import launch_job
from services.admission import Requester
from services.errors import UserError
from services.images import IntakeLimits, PreparedInputs, check_coverage, encode_image, mask_coverage, prepare_inputs
from services.preview import mask_overlay_jpeg
from services.store import Draft, Drafts

if TYPE_CHECKING:
    from bot import InpaintBot

PREVIEW = "mask-preview.jpg"


def _bot(interaction: discord.Interaction) -> InpaintBot:
    return cast("InpaintBot", interaction.client)


def _embed(coverage: float, note: str = "") -> discord.Embed:
    embed = discord.Embed(title="Is this the area to repaint?", colour=render.COLOUR_RUNNING,
                          description=f"The red area ({coverage:.0%} of the image) will be repainted. Nothing has "
                                      f"been spent yet.{(' ' + note) if note else ''}")
    embed.set_image(url=f"attachment://{PREVIEW}")
    return embed


def _view(draft_id: str) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for button in (ConfirmButton, InvertButton, CancelDraftButton):
        view.add_item(button(draft_id))
    return view


async def offer_draft(interaction: discord.Interaction, prepared: PreparedInputs, params: dict[str, Any],
                      who: Requester) -> None:
    """Answer /inpaint (already deferred) with the mask preview and the three buttons."""
    bot = _bot(interaction)
    draft = await Drafts(bot.store).create(
        secrets.token_urlsafe(12), user_id=who.user_id,
        image=(prepared.image_blob.data, prepared.image_blob.content_type),
        mask=(prepared.mask_blob.data, prepared.mask_blob.content_type),
        requester=dataclasses.asdict(who), params=params)
    preview = await asyncio.to_thread(mask_overlay_jpeg, prepared.image, prepared.mask)
    await interaction.followup.send(embed=_embed(prepared.coverage), view=_view(draft.id), ephemeral=True,
                                    file=discord.File(io.BytesIO(preview), filename=PREVIEW))


async def _draft(interaction: discord.Interaction, draft_id: str) -> Draft:
    draft = await Drafts(_bot(interaction).store).get(draft_id)
    if draft is None:
        raise UserError("This preview has already been confirmed or cancelled.")
    if draft.user_id != interaction.user.id:
        raise UserError("Only the person who started this can answer it.")
    return draft


async def _prepared(bot: InpaintBot, draft: Draft) -> PreparedInputs:
    image = await bot.store.get_blob(draft.image_sha256)
    mask = await bot.store.get_blob(draft.mask_sha256)
    if image is None or mask is None:
        raise UserError("This preview's images are gone: run /inpaint again.")
    limits = IntakeLimits(max_bytes=bot.settings.max_image_bytes, max_pixels=bot.settings.max_image_pixels)
    return await asyncio.to_thread(prepare_inputs, image.data, mask.data, limits=limits)


class _DraftButton:
    verb = ""
    label = ""
    style = discord.ButtonStyle.secondary

    def __init__(self, draft_id: str) -> None:
        super().__init__(discord.ui.Button(label=self.label, style=self.style,  # type: ignore[call-arg]
                                           custom_id=f"draft:{self.verb}:{draft_id}"))
        self.draft_id = draft_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction[discord.Client], item: discord.ui.Item[Any],
                             match: re.Match[str], /) -> Self:
        return cls(match["draft"])

    async def callback(self, interaction: discord.Interaction) -> None:
        try:
            await self.run(interaction, await _draft(interaction, self.draft_id))
        except Exception as exc:
            await report_error(interaction, exc)

    async def run(self, interaction: discord.Interaction, draft: Draft) -> None:
        raise NotImplementedError


_Dynamic = discord.ui.DynamicItem[discord.ui.Button[Any]]


class ConfirmButton(_DraftButton, _Dynamic, template=r"draft:confirm:(?P<draft>[\w-]+)"):
    verb, label, style = "confirm", "Confirm", discord.ButtonStyle.success

    async def run(self, interaction: discord.Interaction, draft: Draft) -> None:
        bot = _bot(interaction)
        who = Requester(**{**draft.requester, "role_ids": tuple(draft.requester.get("role_ids", ()))})
        admission = await bot.admissions.admit(who, dict(draft.params))  # quotas may have moved since
        if await Drafts(bot.store).take(draft.id) is None:
            raise UserError("This preview has already been confirmed or cancelled.")
        prepared = await _prepared(bot, draft)
        job = await bot.jobs.create(prepared, admission.params, user_id=who.user_id, guild_id=who.guild_id,
                                    channel_id=who.channel_id, age_restricted=who.age_restricted)
        await interaction.response.edit_message(content=f"Queued as job #{job.id}: progress is in the channel.",
                                                embed=None, attachments=[], view=None)
        await launch_job(bot, job, prepared)


class InvertButton(_DraftButton, _Dynamic, template=r"draft:invert:(?P<draft>[\w-]+)"):
    verb, label = "invert", "Invert"

    async def run(self, interaction: discord.Interaction, draft: Draft) -> None:
        bot = _bot(interaction)
        prepared = await _prepared(bot, draft)

        def invert() -> tuple[bytes, bytes, float]:
            mask = ImageOps.invert(prepared.mask.convert("L"))
            coverage = mask_coverage(mask)
            check_coverage(coverage)
            return encode_image(mask, "png"), mask_overlay_jpeg(prepared.image, mask), coverage

        png, preview, coverage = await asyncio.to_thread(invert)
        await Drafts(bot.store).replace_mask(draft.id, (png, "image/png"))
        await interaction.response.edit_message(embed=_embed(coverage, "(Inverted.)"), view=_view(draft.id),
                                                attachments=[discord.File(io.BytesIO(preview), filename=PREVIEW)])


class CancelDraftButton(_DraftButton, _Dynamic, template=r"draft:cancel:(?P<draft>[\w-]+)"):
    verb, label, style = "cancel", "Cancel", discord.ButtonStyle.danger

    async def run(self, interaction: discord.Interaction, draft: Draft) -> None:
        await Drafts(_bot(interaction).store).take(draft.id)
        await interaction.response.edit_message(content="Cancelled: nothing was spent.", embed=None, attachments=[],
                                                view=None)


DRAFT_BUTTONS: tuple[type[_Dynamic], ...] = (ConfirmButton, InvertButton, CancelDraftButton)

