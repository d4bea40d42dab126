"""Buttons on progress and result messages: Cancel, Reroll, Variations, Edit, Retry, Delete, Params. Each job
button's custom id carries the job id; the job is read from SQLite when it is pressed. A button that starts a
new job goes through the launcher like every other entry point."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import discord
from PIL import Image

from cogs import fit, render
from cogs.errors import report_error
from cogs.inpaint import offer_painter, painter_missing
from cogs.interactions import is_moderator, requester_of, services_of
from cogs.items import DynamicButton, PersistentButton, view_of
from cogs.permissions import require_posting
from cogs.shared_results import remove_result
from services.errors import UserError
from services.images import PreparedInputs
from services.job_state import Job, JobNotFound, JobStatus
from services.launch import FromJob, Launched, from_result
from services.outpaint import ZOOM_FACTORS, Direction, Expansion, expand, outpaint_options, pan, zoom_out
from services.refusals import JobGone, Refused
from services.retention import pictures_gone

#: the most jobs' results one message shows: a message has 5 rows of buttons, one per job
SHARED_MOST = 5


class JobButton(PersistentButton):
    """`inpaint:<action>:<job id>`. With `owner_action` set, only the job's author or a moderator may press it."""

    prefix = "inpaint"
    fields = (("job_id", int),)
    owner_action: ClassVar[str | None] = None  # e.g. "cancel": "Only the person who started job #1 … can cancel it"

    @property
    def job_id(self) -> int:
        return int(self.ids[0])

    async def job(self, interaction: discord.Interaction) -> Job:
        return await job_or_refusal(interaction.client, self.job_id)

    async def authorize(self, interaction: discord.Interaction) -> None:
        if self.owner_action is None:
            return
        job = await self.job(interaction)
        if interaction.user.id != job.user_id and not is_moderator(interaction):
            raise UserError(f"Only the person who started job #{job.id} or a moderator can {self.owner_action} it.")


async def job_or_refusal(client: discord.Client, job_id: int) -> Job:
    """The job, or `Refused(JobGone)` when it no longer exists."""
    try:
        return await services_of(client).store.jobs.get(job_id)
    except JobNotFound as exc:
        raise Refused(JobGone(job_id)) from exc


async def derive(interaction: discord.Interaction, job_id: int, changes: dict[str, Any], verb: str) -> None:
    """Start a job from job `job_id` with `changes`, for whoever pressed the button."""
    services = services_of(interaction.client)
    who = requester_of(interaction)
    require_posting(interaction)
    await interaction.response.defer(ephemeral=True, thinking=True)
    outcome = await services.launcher.launch(who, changes, FromJob(job_id))
    assert isinstance(outcome, Launched)
    await interaction.followup.send(f"{verb} job #{job_id} as job #{outcome.job.id}.", ephemeral=True)


class CancelButton(JobButton, DynamicButton, action="cancel"):
    label, emoji, style, owner_action = "Cancel", "🛑", discord.ButtonStyle.danger, "cancel"

    async def run(self, interaction: discord.Interaction) -> None:
        job = await self.job(interaction)
        if job.terminal:
            raise UserError(f"Job #{job.id} has already finished ({job.status.value}).")
        await interaction.response.send_message(f"Cancelling job #{job.id}…", ephemeral=True)
        await services_of(interaction.client).dispatcher.cancel(job.id)


class RerollButton(JobButton, DynamicButton, action="reroll"):
    label, emoji, style = "Reroll", "🎲", discord.ButtonStyle.primary

    async def run(self, interaction: discord.Interaction) -> None:
        await derive(interaction, self.job_id, {"seed": None}, "Rerolling")


class VariationsButton(JobButton, DynamicButton, action="vary"):
    label, emoji = "Variations", "🖼️"

    async def run(self, interaction: discord.Interaction) -> None:
        await derive(interaction, self.job_id, {"seed": None, "num_images": 4}, "Making 4 variations of")


class RetryButton(JobButton, DynamicButton, action="retry"):
    label, emoji, style = "Retry", "🔁", discord.ButtonStyle.primary

    async def run(self, interaction: discord.Interaction) -> None:
        await derive(interaction, self.job_id, {}, "Retrying")


class EditButton(JobButton, DynamicButton, action="edit"):
    label, emoji = "Edit", "✏️"

    async def run(self, interaction: discord.Interaction) -> None:
        job = await self.job(interaction)
        store = services_of(interaction.client).store
        if not {"image", "mask"} <= set(await store.jobs.blob_refs(job.id)):  # say so before the form, not after
            raise Refused(await pictures_gone(store, job.id))
        await interaction.response.send_modal(EditModal(job))


class DeleteButton(JobButton, DynamicButton, action="delete"):
    label, emoji, owner_action = "Delete", "🗑️", "delete"

    async def run(self, interaction: discord.Interaction) -> None:
        job = await self.job(interaction)
        await interaction.response.defer(ephemeral=True, thinking=True)  # the channel may be busy: answer first
        await remove_result(interaction.client, job, interaction.user.id, interaction.message, shared_result_view)
        await interaction.followup.send(f"Deleted the result of job #{job.id}.", ephemeral=True)
        if interaction.user.id != job.user_id:
            await record_deletion(interaction.client, job, interaction.user.id)


class MoreButton(JobButton, DynamicButton, action="more"):
    """First on a job's row in a message showing several results: the job's number, opening its other buttons."""

    label, emoji = "More", "➕"

    def __init__(self, job_id: int, *, row: int | None = None) -> None:
        super().__init__(job_id, row=row)
        self.item.label = f"Job #{job_id}"

    async def run(self, interaction: discord.Interaction) -> None:
        job = await self.job(interaction)
        await interaction.response.send_message(f"More for job #{job.id}:", view=more_view(job.id), ephemeral=True)


class ParamsButton(JobButton, DynamicButton, action="params"):
    label, emoji = "Params", "🧾"

    async def run(self, interaction: discord.Interaction) -> None:
        job = await self.job(interaction)
        shown = render.params_json(job)
        text = f"```json\n{shown}\n```"
        if len(text) <= fit.CONTENT:
            await interaction.response.send_message(text, ephemeral=True)
            return
        await interaction.response.send_message(  # too long to read in a message: all of it, as a file
            f"Job #{job.id}'s parameters are attached.", ephemeral=True,
            file=discord.File(io.BytesIO(shown.encode()), filename=f"job-{job.id}-params.json"))


async def expand_result(interaction: discord.Interaction, job_id: int,
                        expansion_for: Callable[[tuple[int, int]], Expansion], verb: str) -> None:
    """A new job on job `job_id`'s (first) result, its canvas expanded: Zoom Out and Pan."""
    services = services_of(interaction.client)
    who = requester_of(interaction)
    require_posting(interaction)
    await interaction.response.defer(ephemeral=True, thinking=True)
    parent = await job_or_refusal(interaction.client, job_id)
    max_pixels = services.intake_limits.max_pixels

    def canvas(image: Image.Image) -> PreparedInputs:
        return expand(image, expansion_for(image.size), max_pixels=max_pixels)

    options = outpaint_options({**parent.options(), "seed": None, "num_images": None})  # one image, of image 1
    outcome = await services.launcher.launch(who, options, from_result(services.store, job_id, canvas))
    assert isinstance(outcome, Launched)
    await interaction.followup.send(f"{verb} job #{job_id} as job #{outcome.job.id}.", ephemeral=True)


class ZoomOut15Button(JobButton, DynamicButton, action="zoom15"):
    label, emoji = "Zoom Out 1.5×", "🔍"

    async def run(self, interaction: discord.Interaction) -> None:
        await expand_result(interaction, self.job_id, lambda size: zoom_out(size, ZOOM_FACTORS[0]), "Zooming out")


class ZoomOut2Button(JobButton, DynamicButton, action="zoom2"):
    label, emoji = "Zoom Out 2×", "🔍"

    async def run(self, interaction: discord.Interaction) -> None:
        await expand_result(interaction, self.job_id, lambda size: zoom_out(size, ZOOM_FACTORS[1]), "Zooming out")


class _PanButton(JobButton):
    direction: ClassVar[Direction] = "left"

    async def run(self, interaction: discord.Interaction) -> None:
        direction = self.direction
        await expand_result(interaction, self.job_id, lambda size: pan(size, direction), f"Panning {direction}")


class PanLeftButton(_PanButton, DynamicButton, action="pan_left"):
    emoji, direction = "⬅️", "left"


class PanRightButton(_PanButton, DynamicButton, action="pan_right"):
    emoji, direction = "➡️", "right"


class PanUpButton(_PanButton, DynamicButton, action="pan_up"):
    emoji, direction = "⬆️", "up"


class PanDownButton(_PanButton, DynamicButton, action="pan_down"):
    emoji, direction = "⬇️", "down"


class VaryRegionButton(JobButton, DynamicButton, action="region"):
    label, emoji = "Vary Region", "🖌️"

    async def run(self, interaction: discord.Interaction) -> None:
        services = services_of(interaction.client)
        if services.painter is None or not services.painter.reachable:
            raise UserError("Vary Region needs the web mask painter. Instead, use **Apps → Inpaint this image** on "
                            "the result message and attach a mask (white = repaint)."
                            + painter_missing(services.painter is not None))
        require_posting(interaction)
        await interaction.response.defer(ephemeral=True, thinking=True)
        parent = await job_or_refusal(interaction.client, self.job_id)
        result = (await services.store.jobs.blobs(parent.id)).get("output_0")
        if result is None:
            raise Refused(await pictures_gone(services.store, parent.id, result=True))
        link = await services.painter.offer(requester_of(interaction), result.data,
                                            {**parent.options(), "seed": None, "num_images": None},
                                            parent_job_id=parent.id)
        await offer_painter(interaction, link, f"Paint the area of job #{parent.id}'s result to vary on this page.")


JOB_BUTTONS: tuple[type[DynamicButton], ...] = (
    CancelButton, RerollButton, VariationsButton, RetryButton, EditButton, DeleteButton, MoreButton, ParamsButton,
    ZoomOut15Button, ZoomOut2Button, PanLeftButton, PanRightButton, PanUpButton, PanDownButton, VaryRegionButton)


async def record_deletion(client: discord.Client, job: Job, actor_id: int) -> None:
    """A moderator deleted someone's result: keep it in the job's history and the moderation log."""
    services = services_of(client)
    await services.store.jobs.add_event(job.id, "moderation", f"result deleted by {actor_id}", {"by": actor_id})
    if job.guild_id is not None:
        await services.modlog.record(job.guild_id, "result_deleted", job=job, user_id=job.user_id,
                                     actor_id=actor_id)


class EditModal(discord.ui.Modal):
    """Change the prompt, negative prompt, strength or seed and run again."""

    def __init__(self, job: Job) -> None:
        super().__init__(title=f"Edit job #{job.id}", timeout=600)
        self.job_id = job.id
        asked = job.options()
        self.prompt: discord.ui.TextInput[EditModal] = discord.ui.TextInput(
            label="Prompt", style=discord.TextStyle.paragraph, max_length=fit.PROMPT,
            default=fit.prefill(str(asked.get("prompt", "")), fit.PROMPT))
        self.negative: discord.ui.TextInput[EditModal] = discord.ui.TextInput(
            label="Negative prompt", style=discord.TextStyle.paragraph, required=False, max_length=fit.PROMPT,
            default=fit.prefill(str(asked.get("negative_prompt", "")), fit.PROMPT))
        strength = float(asked.get("strength", render.option(job, "strength")))
        self.strength: discord.ui.TextInput[EditModal] = discord.ui.TextInput(
            label="Strength (0.01 to 1)", default=f"{strength:.4g}", max_length=12)
        seed = job.result.get("seed") if job.result else job.input.get("seed")
        self.seed: discord.ui.TextInput[EditModal] = discord.ui.TextInput(
            label="Seed (empty = random)", required=False, default=str(seed) if seed is not None else "",
            max_length=20)
        for item in (self.prompt, self.negative, self.strength, self.seed):
            self.add_item(item)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        try:
            strength = float(self.strength.value)
        except ValueError:
            strength = math.nan
        if not 0.01 <= strength <= 1:  # also refuses nan and inf
            raise UserError("Strength must be a number between 0.01 and 1.")
        seed_text = self.seed.value.strip()
        if seed_text and not seed_text.isdigit():
            raise UserError("The seed must be a whole number (or empty for a random one).")
        changes = {"prompt": self.prompt.value, "negative_prompt": self.negative.value, "strength": strength,
                   "seed": int(seed_text) if seed_text else None}
        await derive(interaction, self.job_id, changes, "Re-running")

    async def on_error(self, interaction: discord.Interaction, error: Exception, /) -> None:  # type: ignore[override]
        await report_error(interaction, error)


def progress_view(job_id: int) -> discord.ui.View:
    return view_of(CancelButton(job_id))


def result_view(job_id: int) -> discord.ui.View:
    """Row 1: run again (Reroll, Variations, Edit), Delete, Params. Row 2: Zoom Out and Vary Region. Row 3: Pan."""
    rows: tuple[tuple[type[JobButton], ...], ...] = (
        (RerollButton, VariationsButton, EditButton, DeleteButton, ParamsButton),
        (ZoomOut15Button, ZoomOut2Button, VaryRegionButton),
        (PanLeftButton, PanRightButton, PanUpButton, PanDownButton))
    items: list[Any] = [button(job_id, row=row) for row, buttons in enumerate(rows) for button in buttons]
    return view_of(*items)


def shared_result_view(job_ids: Sequence[int]) -> discord.ui.View:
    """For a message showing several jobs' results: a row per job (its number, which opens the rest of its buttons;
    Reroll, Variations, Edit, Delete)."""
    if not 1 <= len(job_ids) <= SHARED_MOST:
        raise ValueError(f"a message shows 1 to {SHARED_MOST} jobs' results, not {len(job_ids)}")
    rows = (MoreButton, RerollButton, VariationsButton, EditButton, DeleteButton)
    return view_of(*(button(job_id, row=row) for row, job_id in enumerate(job_ids) for button in rows))


def more_view(job_id: int) -> discord.ui.View:
    """The result buttons a shared message has no room for: Params, Zoom Out, Vary Region; Pan."""
    rows: tuple[tuple[type[JobButton], ...], ...] = (
        (ParamsButton, ZoomOut15Button, ZoomOut2Button, VaryRegionButton),
        (PanLeftButton, PanRightButton, PanUpButton, PanDownButton))
    items: list[Any] = [button(job_id, row=row) for row, buttons in enumerate(rows) for button in buttons]
    return view_of(*items)


def ended_view(job: Job) -> discord.ui.View | None:
    if job.status is not JobStatus.FAILED:
        return None
    return view_of(RetryButton(job.id), ParamsButton(job.id))
