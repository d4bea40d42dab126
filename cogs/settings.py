"""`/settings` (Manage Server, checked when run) and `/quota`."""

from __future__ import annotations

from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from cogs import fit, render, wording
from cogs.inpaint import SIZE_CHOICES
from cogs.interactions import services_of
from cogs.permissions import require_posting_in
from services.container import Services
from services.errors import UserError
from services.prompt_filter import DEFAULT_WORDS, MAX_REGEX_LENGTH, MAX_RULES, validate_regex
from services.quotas import Quota
from services.schema import InpaintInput
from services.server_settings import ServerSettings

DEFAULT_STEPS = InpaintInput.model_fields["num_inference_steps"].default


def _limit(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


def settings_embed(settings: ServerSettings) -> discord.Embed:
    embed = discord.Embed(title="Inpaint bot settings", colour=render.COLOUR_RUNNING)
    checker = "off in age-restricted channels" if settings.checker_off_in_age_restricted else "always on"
    embed.add_field(name="Safety", value=f"checker: {checker}\nflagged images in age-restricted channels: "
                    f"**{settings.nsfw_policy}** (ordinary channels: always block)", inline=False)
    words = fit.listing([f"`{w}`" for w in settings.filter_words], 450)
    regexes = fit.listing([f"`{r}`" for r in settings.filter_regexes], 450)
    defaults = f"built-in list ({len(DEFAULT_WORDS)} words) " + ("on" if settings.use_default_filters else "off")
    embed.add_field(name="Prompt filters", value=fit.short(f"{defaults}\nwords: {words}\nregexes: {regexes}", 1024),
                    inline=False)
    embed.add_field(name="Masks", value="shown for Confirm first" if settings.confirm_masks else "run at once")
    embed.add_field(name="Mod log", value=f"<#{settings.modlog_channel_id}>" if settings.modlog_channel_id else "off")
    channels = fit.listing([f"<#{c}>" for c in settings.allowed_channel_ids], 480, empty="all")
    roles = fit.listing([f"<@&{r}>" for r in settings.allowed_role_ids], 480, empty="everyone")
    embed.add_field(name="Access", value=f"channels: {channels}\nroles: {roles}")
    embed.add_field(name="Limits", value=(
        f"per user at once: {settings.user_concurrent}\nper server at once: {settings.server_concurrent}\n"
        f"cooldown: {settings.user_cooldown_s} s\nper user per day: {_limit(settings.user_daily_jobs)}\n"
        f"per server per day: {_limit(settings.server_daily_jobs)}\n"
        f"steps × images per day: {_limit(settings.server_daily_steps)}"), inline=False)
    embed.add_field(name="Defaults", value=(
        f"steps: {settings.default_steps or DEFAULT_STEPS}\nsize: {settings.default_size or 'match the image'}\n"
        f"negative prompt: {fit.short(settings.default_negative_prompt or 'none', 200)}"), inline=False)
    return fit.embed(embed)


class SettingsGroup(app_commands.Group):
    def __init__(self, services: Services) -> None:
        super().__init__(name="settings", description="The bot's settings for this server (Manage Server)",
                         guild_only=True, default_permissions=discord.Permissions(manage_guild=True))
        self.services = services

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        # default_permissions only hides the command; a server can override that, so check when it runs too
        if not interaction.permissions.manage_guild:
            raise app_commands.CheckFailure("You need the Manage Server permission to use /settings.")
        return True

    async def _apply(self, interaction: discord.Interaction, changes: dict[str, Any], summary: str) -> None:
        assert interaction.guild_id is not None
        settings = await self.services.store.server_settings.save(interaction.guild_id, changes)
        await interaction.response.send_message(fit.content(f"Saved: {summary}"), embed=settings_embed(settings),
                                                ephemeral=True)
        await self.services.modlog.record(interaction.guild_id, "settings_changed", actor_id=interaction.user.id,
                                          detail=summary)

    async def _settings(self, interaction: discord.Interaction) -> ServerSettings:
        return await self.services.store.server_settings.load(interaction.guild_id)

    @app_commands.command(name="show", description="Show this server's settings")
    async def show(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(embed=settings_embed(await self._settings(interaction)), ephemeral=True)

    @app_commands.command(name="safety", description="Safety checker and what happens to flagged images")
    @app_commands.choices(flagged=[app_commands.Choice(name=n, value=n) for n in ("block", "spoiler", "allow")])
    @app_commands.describe(flagged="Flagged images in age-restricted channels (ordinary channels always block)",
                           checker_off_in_age_restricted="Skip the safety checker in age-restricted channels")
    async def safety(self, interaction: discord.Interaction, flagged: str | None = None,
                     checker_off_in_age_restricted: bool | None = None) -> None:
        changes: dict[str, Any] = {}
        if flagged is not None:
            if flagged not in ("block", "spoiler", "allow"):
                raise UserError("Choose block, spoiler or allow.")
            changes["nsfw_policy"] = flagged
        if checker_off_in_age_restricted is not None:
            changes["checker_off_in_age_restricted"] = checker_off_in_age_restricted
        if not changes:
            raise UserError("Nothing to change: pick an option.")
        await self._apply(interaction, changes, ", ".join(f"{k} = {v}" for k, v in changes.items()))

    @app_commands.command(name="filter", description="Add or remove a blocked word or regular expression")
    @app_commands.describe(action="What to do", value="The word or pattern (for add/remove)")
    @app_commands.choices(action=[app_commands.Choice(name=n, value=v) for n, v in (
        ("add word", "add_word"), ("remove word", "remove_word"), ("add regex", "add_regex"),
        ("remove regex", "remove_regex"), ("use the built-in list", "defaults_on"),
        ("don't use the built-in list", "defaults_off"))])
    async def filter(self, interaction: discord.Interaction, action: str,
                     value: app_commands.Range[str, 1, MAX_REGEX_LENGTH] | None = None) -> None:
        settings = await self._settings(interaction)
        words, regexes = list(settings.filter_words), list(settings.filter_regexes)
        text = (value or "").strip()
        if action in ("add_word", "remove_word", "add_regex", "remove_regex") and not text:
            raise UserError("Give the word or pattern in `value`.")
        if action == "add_word":
            if text.casefold() not in (w.casefold() for w in words):
                words.append(text)
        elif action == "remove_word":
            if text not in words:
                raise UserError(f"`{text}` isn't in the word list.")
            words.remove(text)
        elif action == "add_regex":
            if text not in regexes:
                regexes.append(validate_regex(text))
        elif action == "remove_regex":
            if text not in regexes:
                raise UserError(f"`{text}` isn't in the regex list.")
            regexes.remove(text)
        if len(words) + len(regexes) > MAX_RULES:
            raise UserError(f"A server can have at most {MAX_RULES} filter rules.")
        changes: dict[str, Any] = {"filter_words": words, "filter_regexes": regexes}
        if action in ("defaults_on", "defaults_off"):
            changes = {"use_default_filters": action == "defaults_on"}
        await self._apply(interaction, changes, f"filter {action.replace('_', ' ')} {text}".strip())

    @app_commands.command(name="masks", description="Show users their mask and wait for Confirm before running")
    async def masks(self, interaction: discord.Interaction, confirm: bool) -> None:
        await self._apply(interaction, {"confirm_masks": confirm}, f"confirm masks = {confirm}")

    @app_commands.command(name="modlog", description="Where moderation events are posted (empty = off)")
    async def modlog(self, interaction: discord.Interaction, channel: discord.TextChannel | None = None) -> None:
        if channel is not None and interaction.guild is not None:
            require_posting_in(channel, interaction.guild.me)
        await self._apply(interaction, {"modlog_channel_id": channel.id if channel else None},
                          f"mod log {'in ' + channel.mention if channel else 'off'}")

    @app_commands.command(name="access", description="Limit the bot to some channels or roles")
    @app_commands.choices(action=[app_commands.Choice(name=n, value=n) for n in ("allow", "disallow", "clear")])
    async def access(self, interaction: discord.Interaction, action: str,
                     channel: discord.TextChannel | None = None, role: discord.Role | None = None) -> None:
        settings = await self._settings(interaction)
        channels, roles = set(settings.allowed_channel_ids), set(settings.allowed_role_ids)
        if action == "clear":
            channels, roles = set(), set()
        elif channel is None and role is None:
            raise UserError("Pick a channel or a role.")
        for target, pool in ((channel, channels), (role, roles)):
            if target is not None:
                (pool.add if action == "allow" else pool.discard)(target.id)
        await self._apply(interaction, {"allowed_channel_ids": sorted(channels), "allowed_role_ids": sorted(roles)},
                          f"access {action}")

    @app_commands.command(name="limits", description="Concurrency, cooldown and daily quotas (0 = unlimited daily)")
    async def limits(self, interaction: discord.Interaction,
                     per_user_at_once: app_commands.Range[int, 1, 20] | None = None,
                     per_server_at_once: app_commands.Range[int, 1, 100] | None = None,
                     cooldown_seconds: app_commands.Range[int, 0, 86400] | None = None,
                     per_user_per_day: app_commands.Range[int, 0, 100000] | None = None,
                     per_server_per_day: app_commands.Range[int, 0, 1000000] | None = None,
                     steps_per_day: app_commands.Range[int, 0, 100000000] | None = None) -> None:
        changes: dict[str, Any] = {}
        for key, value in (("user_concurrent", per_user_at_once), ("server_concurrent", per_server_at_once),
                           ("user_cooldown_s", cooldown_seconds)):
            if value is not None:
                changes[key] = value
        for key, value in (("user_daily_jobs", per_user_per_day), ("server_daily_jobs", per_server_per_day),
                           ("server_daily_steps", steps_per_day)):
            if value is not None:
                changes[key] = value or None
        if not changes:
            raise UserError("Nothing to change: pick an option.")
        await self._apply(interaction, changes, ", ".join(f"{k} = {_limit(v)}" for k, v in changes.items()))

    @app_commands.command(name="defaults", description="Default steps, size and negative prompt for /inpaint")
    @app_commands.choices(size=SIZE_CHOICES)
    async def defaults(self, interaction: discord.Interaction, steps: app_commands.Range[int, 1, 65] | None = None,
                       size: str | None = None,
                       negative_prompt: app_commands.Range[str, 1, fit.PROMPT] | None = None,
                       clear: bool = False) -> None:
        if clear:
            changes: dict[str, Any] = {"default_steps": None, "default_size": None, "default_negative_prompt": None}
        else:
            changes = {k: v for k, v in (("default_steps", steps), ("default_size", size),
                                         ("default_negative_prompt", negative_prompt)) if v is not None}
        if not changes:
            raise UserError("Nothing to change: pick an option (or clear).")
        await self._apply(interaction, changes, "defaults " + ", ".join(f"{k} = {v}" for k, v in changes.items()))


class Settings(commands.Cog):
    def __init__(self, bot: commands.Bot) -> None:
        self.bot = bot
        self.services = services_of(bot)
        self.group = SettingsGroup(self.services)

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.group)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.group.name)

    @app_commands.command(name="quota", description="What you can still run here today")
    @app_commands.guild_only()
    async def quota(self, interaction: discord.Interaction) -> None:
        assert interaction.guild_id is not None
        settings = await self.services.store.server_settings.load(interaction.guild_id)
        q = await self.services.quotas.quota(settings, interaction.guild_id, interaction.user.id)

        def left(used: int, limit: int | None) -> str:
            return "unlimited" if limit is None else f"{Quota.remaining(used, limit)} of {limit} left"

        embed = discord.Embed(title="Your quota today", colour=render.COLOUR_RUNNING)
        embed.add_field(name="Your jobs", value=left(q.user_jobs, q.user_limit))
        embed.add_field(name="Server jobs", value=left(q.server_jobs, q.server_limit))
        embed.add_field(name="Server steps × images", value=left(q.server_steps, q.steps_limit))
        embed.add_field(name="Cooldown", value=f"{q.cooldown_left_s:.0f} s" if q.cooldown_left_s else "ready")
        embed.add_field(name="Resets", value=wording.relative_time(q.resets_at))
        if q.spend is not None and q.spend.limit is not None:
            embed.add_field(name="Bot-wide budget (all servers)", value=q.spend.summary(), inline=False)
        if await self.services.store.bans.is_banned(interaction.guild_id, interaction.user.id):
            embed.description = "You are banned from using the bot in this server."
        await interaction.response.send_message(embed=fit.embed(embed), ephemeral=True)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Settings(bot))
