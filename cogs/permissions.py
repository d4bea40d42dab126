"""What the bot needs to be allowed to do in a channel, checked before it accepts work there.

Without Send Messages it can't post progress or results; without Embed Links Discord silently drops its embeds;
without Attach Files there are no pictures. So a job (or a mod-log channel) is refused up front, naming exactly
what is missing and where to grant it, instead of failing later with "Something went wrong".
"""

from __future__ import annotations

import discord

from services.errors import UserError

#: What the bot asks for when it is invited (`python bot.py --invite`), and needs wherever it posts.
NEEDED = discord.Permissions(view_channel=True, send_messages=True, send_messages_in_threads=True, embed_links=True,
                             attach_files=True)

_NAMES = {"view_channel": "View Channel", "send_messages": "Send Messages",
          "send_messages_in_threads": "Send Messages in Threads", "embed_links": "Embed Links",
          "attach_files": "Attach Files"}


def missing(permissions: discord.Permissions, *, thread: bool = False) -> list[str]:
    """The names of the permissions the bot lacks to post where `permissions` apply."""
    wanted = ["view_channel", "send_messages_in_threads" if thread else "send_messages", "embed_links",
              "attach_files"]
    return [_NAMES[name] for name in wanted if not getattr(permissions, name)]


def _and(names: list[str]) -> str:
    quoted = [f"**{n}**" for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f" and {quoted[-1]}"


def require_posting(interaction: discord.Interaction) -> None:
    """Refuse work in a channel where the bot couldn't post it (the interaction's own app permissions)."""
    thread = isinstance(interaction.channel, discord.Thread)
    lacking = missing(interaction.app_permissions, thread=thread)
    if lacking:
        raise UserError(f"I can't post in this channel: I'm missing {_and(lacking)} here. A server manager can "
                        "grant them in the channel's settings (Edit Channel → Permissions → the bot's role).")


def require_posting_in(channel: discord.abc.GuildChannel, me: discord.Member | None) -> None:
    """Refuse a channel (e.g. for the mod log) where the bot couldn't post."""
    if me is None:
        return  # the bot's own member isn't cached: Discord will say when it posts
    lacking = missing(channel.permissions_for(me), thread=isinstance(channel, discord.Thread))
    if lacking:
        raise UserError(f"I can't post in {channel.mention}: I'm missing {_and(lacking)} there. Grant them in that "
                        "channel's settings (Edit Channel → Permissions → the bot's role), then try again.")
