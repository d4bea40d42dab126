"""Confirm-your-mask: on servers that ask for it, /inpaint first shows its author the image with the mask overlaid
and waits for Confirm, Invert or Cancel (ephemeral, author only) before anything is spent."""

from __future__ import annotations

import io
from dataclasses import dataclass

import discord

from cogs import fit, render
from cogs.interactions import services_of
from cogs.items import DynamicButton, PersistentButton, view_of
from cogs.permissions import require_posting
from services.errors import UserError
from services.launch import DraftOffered, Launched

PREVIEW = "mask-preview.jpg"


@dataclass(frozen=True)
class DraftMessage:
    """The ephemeral message showing a draft: the question, the preview and Confirm / Invert / Cancel."""

    embed: discord.Embed
    view: discord.ui.View
    file: discord.File


def draft_message(offer: DraftOffered, note: str = "") -> DraftMessage:
    embed = discord.Embed(title="Is this the area to repaint?", colour=render.COLOUR_RUNNING,
                          description=f"The red area ({offer.coverage:.0%} of the image) will be repainted. Nothing "
                                      f"has been spent yet.{(' ' + note) if note else ''}")
    embed.set_image(url=f"attachment://{PREVIEW}")
    embed = fit.embed(embed)
    draft_id = offer.draft.id
    view = view_of(ConfirmButton(draft_id), InvertButton(draft_id), CancelDraftButton(draft_id))
    return DraftMessage(embed, view, discord.File(io.BytesIO(offer.preview_jpeg), filename=PREVIEW))


class DraftButton(PersistentButton):
    """`draft:<action>:<draft id>`; only the draft's author may press it."""

    prefix = "draft"
    fields = (("draft_id", str),)

    @property
    def draft_id(self) -> str:
        return str(self.ids[0])

    async def authorize(self, interaction: discord.Interaction) -> None:
        draft = await services_of(interaction.client).drafts.get(self.draft_id)
        if draft.user_id != interaction.user.id:
            raise UserError("Only the person who started this can answer it.")


class ConfirmButton(DraftButton, DynamicButton, action="confirm"):
    label, style = "Confirm", discord.ButtonStyle.success

    async def run(self, interaction: discord.Interaction) -> None:
        require_posting(interaction)
        await interaction.response.defer()  # taking the images in can outlast Discord's 3 s to answer
        services = services_of(interaction.client)
        draft = await services.drafts.get(self.draft_id)
        outcome = await services.launcher.launch(draft.requester, draft.params,
                                                 services.drafts.confirmed(self.draft_id))
        assert isinstance(outcome, Launched)
        await interaction.edit_original_response(content=f"Queued as job #{outcome.job.id}: progress is in the "
                                                         "channel.", embed=None, attachments=[], view=None)


class InvertButton(DraftButton, DynamicButton, action="invert"):
    label = "Invert"

    async def run(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer()
        offer = await services_of(interaction.client).drafts.invert(self.draft_id)
        shown = draft_message(offer, "(Inverted.)")
        await interaction.edit_original_response(embed=shown.embed, view=shown.view, attachments=[shown.file])


class CancelDraftButton(DraftButton, DynamicButton, action="cancel"):
    label, style = "Cancel", discord.ButtonStyle.danger

    async def run(self, interaction: discord.Interaction) -> None:
        await services_of(interaction.client).drafts.cancel(self.draft_id)
        await interaction.response.edit_message(content="Cancelled: nothing was spent.", embed=None, attachments=[],
                                                view=None)


DRAFT_BUTTONS: tuple[type[DynamicButton], ...] = (ConfirmButton, InvertButton, CancelDraftButton)
