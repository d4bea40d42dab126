"""Job history: `/jobs` (your recent jobs) and `/job` (one job with its history)."""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from cogs import fit, render
from cogs.interactions import is_moderator, services_of
from cogs.wording import relative_time
from services.errors import UserError
from services.job_state import JobNotFound


class History(commands.Cog):
    def __init__(self, bot: commands.Bot) -> None:
        self.store = services_of(bot).store.jobs

    @app_commands.command(name="jobs", description="Your recent inpainting jobs in this server")
    @app_commands.guild_only()
    async def jobs(self, interaction: discord.Interaction) -> None:
        jobs = await self.store.for_user(interaction.user.id, guild_id=interaction.guild_id, limit=10)
        if not jobs:
            await interaction.response.send_message("You have no jobs here yet: try `/inpaint`.", ephemeral=True)
            return
        lines = [f"`#{job.id}` {job.status.value} · {relative_time(job.created_at)} · "
                 f"{fit.short(job.input.get('prompt', ''), 60)}" for job in jobs]
        embed = discord.Embed(title="Your recent jobs", description="\n".join(lines), colour=render.COLOUR_RUNNING)
        await interaction.response.send_message(embed=fit.embed(embed), ephemeral=True)

    @app_commands.command(name="job", description="One job's details and history")
    @app_commands.guild_only()
    @app_commands.describe(job_id="The job number (from /jobs or a result)")
    async def job(self, interaction: discord.Interaction, job_id: app_commands.Range[int, 1]) -> None:
        try:
            job = await self.store.get(job_id)
        except JobNotFound as exc:
            raise UserError(f"There is no job #{job_id}.") from exc
        if job.guild_id != interaction.guild_id or (
                job.user_id != interaction.user.id and not is_moderator(interaction)):
            raise UserError(f"Job #{job_id} isn't yours to look at.")
        events = await self.store.events(job.id)
        history = "\n".join(f"{relative_time(e.created_at)} **{e.kind}** {fit.short(_last_line(e.message), 80)}"
                            for e in events[-15:])
        embed = discord.Embed(title=f"Job #{job.id} · {job.status.value}", colour=render.COLOUR_RUNNING,
                              description=fit.short(job.input.get("prompt", ""), 300))
        embed.add_field(name="History", value=fit.short(history or "—", 1024), inline=False)
        if job.error:
            embed.add_field(name="Error", value=fit.short(job.error, 1024), inline=False)
        embed.set_footer(text=f"backend {job.backend} · attempts {job.attempts}")
        await interaction.response.send_message(embed=fit.embed(embed), ephemeral=True)


def _last_line(message: str) -> str:
    """An event as one line: a batch of backend log lines shows its last, with how many came before."""
    lines = message.split("\n")
    return lines[-1] if len(lines) == 1 else f"{lines[-1]} (and {len(lines) - 1} earlier)"


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(History(bot))
