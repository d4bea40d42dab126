"""Buttons on progress and result messages. Each is a `DynamicItem` whose custom_id carries the job id; state
is read from SQLite when pressed, so every button keeps working after a restart."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Self, cast

import discord

from cogs import render
from cogs.errors import report_error
from cogs.flow import launch_stored_job, requester
from services.errors import UserError
from services.store import Job, JobNotFound, JobStatus

if TYPE_CHECKING:
    from bot import InpaintBot


def bot_of(interaction: discord.Interaction) -> InpaintBot:
    return cast("InpaintBot", interaction.client)


async def _job(interaction: discord.Interaction, job_id: int) -> Job:
    try:
        return await bot_of(interaction).store.get_job(job_id)
    except JobNotFound as exc:
        raise UserError(f"Job #{job_id} no longer exists.") from exc


def _require_owner_or_mod(interaction: discord.Interaction, job: Job, action: str) -> None:
    if interaction.user.id != job.user_id and not render.is_moderator(interaction):
        raise UserError(f"Only the person who started job #{job.id} or a moderator can {action} it.")


_DynamicButton = discord.ui.DynamicItem[discord.ui.Button[Any]]


class _JobButton:
    """What every job button shares: custom_id `inpaint:<action>:<job id>`, errors reported to the user.
    Concrete buttons also subclass `DynamicItem` with their own template (discord.py needs one per class)."""

    action = ""
    label = ""
    emoji = ""
    style = discord.ButtonStyle.secondary

    def __init__(self, job_id: int) -> None:
        super().__init__(discord.ui.Button(label=self.label, emoji=self.emoji or None,  # type: ignore[call-arg]
                                           style=self.style, custom_id=f"inpaint:{self.action}:{job_id}"))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction[discord.Client], item: discord.ui.Item[Any],
                             match: re.Match[str], /) -> Self:
        return cls(int(match["job_id"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        try:
            await self.run(interaction)
        except Exception as exc:
            await report_error(interaction, exc)

    async def run(self, interaction: discord.Interaction) -> None:
        raise NotImplementedError


class CancelButton(_JobButton, _DynamicButton, template=r"inpaint:cancel:(?P<job_id>\d+)"):
    action, label, emoji, style = "cancel", "Cancel", "🛑", discord.ButtonStyle.danger

    async def run(self, interaction: discord.Interaction) -> None:
        job = await _job(interaction, self.job_id)
        _require_owner_or_mod(interaction, job, "cancel")
        if job.terminal:
            raise UserError(f"Job #{job.id} has already finished ({job.status.value}).")
        await interaction.response.send_message(f"Cancelling job #{job.id}…", ephemeral=True)
        await bot_of(interaction).dispatcher.cancel(job.id)


class RerollButton(_JobButton, _DynamicButton, template=r"inpaint:reroll:(?P<job_id>\d+)"):
    action, label, emoji, style = "reroll", "Reroll", "🎲", discord.ButtonStyle.primary

    async def run(self, interaction: discord.Interaction) -> None:
        await _derive(interaction, self.job_id, {"seed": None}, "Rerolling")


class VariationsButton(_JobButton, _DynamicButton, template=r"inpaint:vary:(?P<job_id>\d+)"):
    action, label, emoji = "vary", "Variations", "🖼️"

    async def run(self, interaction: discord.Interaction) -> None:
        await _derive(interaction, self.job_id, {"seed": None, "num_images": 4}, "Making 4 variations of")


class RetryButton(_JobButton, _DynamicButton, template=r"inpaint:retry:(?P<job_id>\d+)"):
    action, label, emoji, style = "retry", "Retry", "🔁", discord.ButtonStyle.primary

    async def run(self, interaction: discord.Interaction) -> None:
        await _derive(interaction, self.job_id, {}, "Retrying")


class EditButton(_JobButton, _DynamicButton, template=r"inpaint:edit:(?P<job_id>\d+)"):
    action, label, emoji = "edit", "Edit", "✏️"

    async def run(self, interaction: discord.Interaction) -> None:
        job = await _job(interaction, self.job_id)
        await interaction.response.send_modal(EditModal(job))


class DeleteButton(_JobButton, _DynamicButton, template=r"inpaint:delete:(?P<job_id>\d+)"):
    action, label, emoji = "delete", "Delete", "🗑️"

    async def run(self, interaction: discord.Interaction) -> None:
        job = await _job(interaction, self.job_id)
        _require_owner_or_mod(interaction, job, "delete")
        await interaction.response.send_message(f"Deleted the result of job #{job.id}.", ephemeral=True)
        if interaction.message is not None:
            await interaction.message.delete()
        bot = bot_of(interaction)
        if interaction.user.id == job.user_id:
            await bot.store.add_event(job.id, "note", "result deleted by its author", {"by": interaction.user.id})
        else:
            from cogs.modlog import record_deletion

            await record_deletion(bot, job, interaction.user.id)


class ParamsButton(_JobButton, _DynamicButton, template=r"inpaint:params:(?P<job_id>\d+)"):
    action, label, emoji = "params", "Params", "🧾"

    async def run(self, interaction: discord.Interaction) -> None:
        job = await _job(interaction, self.job_id)
        await interaction.response.send_message(f"```json\n{render.params_json(job)}\n```", ephemeral=True)


BUTTONS: tuple[type[_DynamicButton], ...] = (CancelButton, RerollButton, VariationsButton, RetryButton, EditButton,
                                         DeleteButton, ParamsButton)


async def _derive(interaction: discord.Interaction, job_id: int, changes: dict[str, Any], verb: str) -> None:
    bot = bot_of(interaction)
    parent = await _job(interaction, job_id)
    who = requester(interaction)
    admission = await bot.admissions.admit(who, bot.jobs.merged_params(parent, changes), parent=parent)
    await interaction.response.defer(ephemeral=True, thinking=True)
    job = await bot.jobs.derive(parent, admission.params, user_id=interaction.user.id,
                                channel_id=interaction.channel_id or parent.channel_id,
                                age_restricted=who.age_restricted)
    await launch_stored_job(bot, job)
    await interaction.followup.send(f"{verb} job #{parent.id} as job #{job.id}.", ephemeral=True)


class EditModal(discord.ui.Modal):
    """Change the prompt, negative prompt, strength or seed and run again."""

    def __init__(self, job: Job) -> None:
        super().__init__(title=f"Edit job #{job.id}", timeout=600)
        self.job_id = job.id
        self.prompt: discord.ui.TextInput[EditModal] = discord.ui.TextInput(
            label="Prompt", style=discord.TextStyle.paragraph, default=job.input.get("prompt", ""), max_length=1000)
        self.negative: discord.ui.TextInput[EditModal] = discord.ui.TextInput(
            label="Negative prompt", style=discord.TextStyle.paragraph, required=False,
            default=job.input.get("negative_prompt", ""), max_length=1000)
        self.strength: discord.ui.TextInput[EditModal] = discord.ui.TextInput(
            label="Strength (0.01 to 1)", default=f"{job.input.get('strength', 0.95):g}", max_length=5)
        seed = job.result.get("seed") if job.result else job.input.get("seed")
        self.seed: discord.ui.TextInput[EditModal] = discord.ui.TextInput(
            label="Seed (empty = random)", required=False, default=str(seed) if seed is not None else "",
            max_length=20)
        for item in (self.prompt, self.negative, self.strength, self.seed):
            self.add_item(item)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        try:
            strength = float(self.strength.value)
        except ValueError as exc:
            raise UserError("Strength must be a number between 0.01 and 1.") from exc
        seed_text = self.seed.value.strip()
        if seed_text and not seed_text.isdigit():
            raise UserError("The seed must be a whole number (or empty for a random one).")
        changes = {"prompt": self.prompt.value, "negative_prompt": self.negative.value, "strength": strength,
                   "seed": int(seed_text) if seed_text else None}
        await _derive(interaction, self.job_id, changes, "Re-running")

    async def on_error(self, interaction: discord.Interaction, error: Exception, /) -> None:  # type: ignore[override]
        await report_error(interaction, error)


def progress_view(job_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(CancelButton(job_id))
    return view


def result_view(job_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for button in (RerollButton, VariationsButton, EditButton, DeleteButton, ParamsButton):
        view.add_item(button(job_id))
    return view


def ended_view(job: Job) -> discord.ui.View | None:
    if job.status is not JobStatus.FAILED:
        return None
    view = discord.ui.View(timeout=None)
    view.add_item(RetryButton(job.id))
    view.add_item(ParamsButton(job.id))
    return view
