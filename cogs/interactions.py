"""What the cogs read off an interaction: the services the bot runs on, who is asking and where, and whether they
moderate here."""

from __future__ import annotations

import discord

from cogs.posting import ChannelPosting
from services.container import Services
from services.requester import Requester


def services_of(client: discord.Client) -> Services:
    """The services of the bot that received an interaction (`InpaintBot.services`)."""
    services = getattr(client, "services", None)
    if not isinstance(services, Services):
        raise RuntimeError("this client has no services (is it an InpaintBot?)")
    return services


def posting_of(client: discord.Client) -> ChannelPosting:
    """The bot's per-channel posting queue (`InpaintBot.posting`)."""
    posting = getattr(client, "posting", None)
    if not isinstance(posting, ChannelPosting):
        raise RuntimeError("this client has no posting queue (is it an InpaintBot?)")
    return posting


def is_moderator(interaction: discord.Interaction) -> bool:
    """Manage Messages (or Administrator) in the channel of the interaction."""
    perms = interaction.permissions
    return bool(perms.manage_messages or perms.administrator)


def requester_of(interaction: discord.Interaction) -> Requester:
    """Who is asking, and where: what admission needs to know about an interaction."""
    channel = interaction.channel
    is_nsfw = getattr(channel, "is_nsfw", None)
    age_restricted = bool(is_nsfw()) if callable(is_nsfw) else False
    roles = tuple(role.id for role in getattr(interaction.user, "roles", []))
    return Requester(guild_id=interaction.guild_id, channel_id=interaction.channel_id, user_id=interaction.user.id,
                     role_ids=roles, age_restricted=age_restricted, moderator=is_moderator(interaction))
