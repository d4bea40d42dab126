"""Refusals in Discord's words: channel and role mentions, relative timestamps (`<t:…:R>`) that each user sees in
their own time zone. Everything a service refuses with is a fact (`services/refusals.py`); this is how it reads
in a Discord message."""

from __future__ import annotations

from collections.abc import Iterable

from cogs.fit import listing
from services.refusals import (
    ChannelNotAllowed,
    Refusal,
    RoleNotAllowed,
    ServerQuotaUsed,
    SpendBudgetReached,
    StepBudgetExceeded,
    UserQuotaUsed,
    amount,
)


def relative_time(timestamp: float) -> str:
    return f"<t:{int(timestamp)}:R>"


def channels(ids: Iterable[int]) -> str:
    """Channel mentions, as many as read well in a message (a server may allow 60)."""
    return listing([f"<#{i}>" for i in ids], 1500)


def roles(ids: Iterable[int]) -> str:
    return listing([f"<@&{i}>" for i in ids], 1500)


def refusal_text(reason: Refusal) -> str:
    """What to tell the user, mentioning channels and roles and showing when a quota resets."""
    match reason:
        case ChannelNotAllowed(allowed_channel_ids=ids):
            return f"The bot works only in {channels(ids)} in this server."
        case RoleNotAllowed(allowed_role_ids=ids):
            return f"Only members with {roles(ids)} can use the bot in this server."
        case UserQuotaUsed(limit=limit, resets_at=resets_at):
            return f"You've used your {limit} jobs for today here; the quota resets {relative_time(resets_at)}."
        case ServerQuotaUsed(limit=limit, resets_at=resets_at):
            return f"This server's {limit} jobs for today are used up; the quota resets {relative_time(resets_at)}."
        case StepBudgetExceeded(needed=needed, left=left, limit=limit, resets_at=resets_at):
            return (f"This job needs {needed} steps (steps × images) but the server has {left} of its {limit} left "
                    f"today; try fewer steps or images, or after the reset {relative_time(resets_at)}.")
        case SpendBudgetReached(needed=needed, left=left, limit=limit, resets_at=resets_at, unit=unit):
            if reason.used_up:
                return (f"The bot's daily budget (for all servers together) is used up; it resets "
                        f"{relative_time(resets_at)}.")
            return (f"This job needs {amount(needed)} {unit} (megapixels × steps × images) but the bot has only "
                    f"{amount(left)} of its daily {amount(limit)} left for all servers; try a smaller size, fewer "
                    f"steps or images, or after the reset {relative_time(resets_at)}.")
        case _:
            return reason.plain()
