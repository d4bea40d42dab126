"""One error handler for commands, buttons and modals: what a user caused gets a friendly ephemeral message;
anything else is logged with a reference and the user is told it was our fault. Nothing leaks secrets."""

from __future__ import annotations

import logging
import secrets

import discord
from discord import app_commands
from discord.ext import commands

from cogs.fit import content
from cogs.wording import refusal_text
from services.errors import UserError
from services.images import ImageInputError
from services.refusals import Refused

log = logging.getLogger(__name__)


def user_message(error: BaseException) -> str | None:
    """The message for an error the user can fix, or None when it is a bug on our side."""
    original = getattr(error, "original", None) or error
    if isinstance(original, (UserError, ImageInputError)):
        return original.message
    if isinstance(original, Refused):
        return refusal_text(original.reason)
    if isinstance(error, app_commands.CommandOnCooldown):
        return f"Slow down: you can use this again in {error.retry_after:.0f} s."
    if isinstance(error, app_commands.NoPrivateMessage):
        return "This command only works in a server."
    if isinstance(error, app_commands.MissingPermissions):
        return "You don't have the permissions this needs."
    if isinstance(error, app_commands.CheckFailure):
        return str(error) or "You can't use this here."
    if isinstance(error, app_commands.TransformerError):
        return f"That value isn't valid: {error.value!r}."
    return None


async def report_error(interaction: discord.Interaction, error: BaseException) -> None:
    message = user_message(error)
    if message is None:
        ref = secrets.token_hex(3)
        log.error("interaction %s failed (ref %s)", interaction.id, ref, exc_info=error)
        message = f"Something went wrong on our side (ref `{ref}`). It has been logged; please try again."
    else:
        log.info("user error for %s: %s", interaction.user.id, message)
    message = content(message)
    try:
        if interaction.response.is_done():
            await interaction.followup.send(message, ephemeral=True)
        else:
            await interaction.response.send_message(message, ephemeral=True)
    except discord.HTTPException:
        log.warning("could not tell user %s about an error", interaction.user.id)


class Errors(commands.Cog):
    def __init__(self, bot: commands.Bot) -> None:
        self.bot = bot
        self._previous = bot.tree.on_error

    async def cog_load(self) -> None:
        self.bot.tree.on_error = self.on_tree_error  # type: ignore[method-assign]

    async def cog_unload(self) -> None:
        self.bot.tree.on_error = self._previous  # type: ignore[method-assign]

    async def on_tree_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        await report_error(interaction, error)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Errors(bot))
