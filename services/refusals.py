"""Why a job was refused, as facts: which channels or roles are allowed, which rule a prompt broke, when a quota
resets. Services raise `Refused(reason)`; the presentation layer words the reason for where it is shown (the
Discord layer mentions channels and roles and shows relative times; the mask painter's page shows `plain()`)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass


def _utc(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, tz=dt.UTC).strftime("%H:%M UTC")


def amount(units: float) -> str:
    """A number of spending units as people read it: 26.2, 40, 1,234, 25,000."""
    return f"{units:,.0f}" if abs(units) >= 100 or units == int(units) else f"{units:.1f}"


@dataclass(frozen=True)
class Banned:
    def plain(self) -> str:
        return "You can't use the bot in this server: a moderator has banned you from it."


@dataclass(frozen=True)
class ChannelNotAllowed:
    allowed_channel_ids: tuple[int, ...]

    def plain(self) -> str:
        return "The bot works only in some channels of this server, and not in this one."


@dataclass(frozen=True)
class RoleNotAllowed:
    allowed_role_ids: tuple[int, ...]

    def plain(self) -> str:
        return "Only members with certain roles can use the bot in this server."


@dataclass(frozen=True)
class PromptBlocked:
    field: str  # "prompt" or "negative_prompt"
    rule: str
    job_id: int  # the blocked job, stored with the rule

    def plain(self) -> str:
        return (f"Your {self.field.replace('_', ' ')} was blocked by this server's filters ({self.rule}). "
                "Please rephrase it.")


@dataclass(frozen=True)
class Cooldown:
    seconds_left: float

    def plain(self) -> str:
        return f"Slow down: you can start another job in {self.seconds_left:.0f} s."


@dataclass(frozen=True)
class UserQuotaUsed:
    limit: int
    resets_at: float

    def plain(self) -> str:
        return f"You've used your {self.limit} jobs for today here; the quota resets at {_utc(self.resets_at)}."


@dataclass(frozen=True)
class ServerQuotaUsed:
    limit: int
    resets_at: float

    def plain(self) -> str:
        return f"This server's {self.limit} jobs for today are used up; the quota resets at {_utc(self.resets_at)}."


@dataclass(frozen=True)
class StepBudgetExceeded:
    needed: int
    left: int
    limit: int
    resets_at: float

    def plain(self) -> str:
        return (f"This job needs {self.needed} steps (steps × images) but the server has {self.left} of its "
                f"{self.limit} left today; try fewer steps or images, or after the reset at {_utc(self.resets_at)}.")


@dataclass(frozen=True)
class SpendBudgetReached:
    """The bot-wide daily spending budget (all servers together, `services/spend.py`) has less left than the job
    costs. Amounts are in `unit` (megapixel-steps: output megapixels × denoising steps × images)."""

    needed: float
    left: float
    limit: float
    resets_at: float
    unit: str = "megapixel-steps"

    @property
    def used_up(self) -> bool:
        """Nothing useful is left: less than a tenth of a unit (a 64×64 image at one step is 0.004)."""
        return self.left < 0.1

    def plain(self) -> str:
        if self.used_up:
            return (f"The bot's daily budget (for all servers together) is used up; it resets at "
                    f"{_utc(self.resets_at)}.")
        return (f"This job needs {amount(self.needed)} {self.unit} (megapixels × steps × images) but the bot has only "
                f"{amount(self.left)} of its daily {amount(self.limit)} left for all servers; try a smaller size, "
                f"fewer steps or images, or after the reset at {_utc(self.resets_at)}.")


@dataclass(frozen=True)
class InvalidOptions:
    problems: tuple[str, ...]

    def plain(self) -> str:
        return f"Some options are not valid: {'; '.join(self.problems)}"


@dataclass(frozen=True)
class JobGone:
    job_id: int

    def plain(self) -> str:
        return f"Job #{self.job_id} no longer exists."


@dataclass(frozen=True)
class ImagesGone:
    job_id: int | None  # None: a draft's or a painter link's images
    #: the retention cleanup deleted them this long after the job finished (None: gone for another reason)
    deleted_after_s: float | None = None
    result: bool = False  # the job's result images (Zoom Out, Pan, Vary Region), not the pictures it started from

    def plain(self) -> str:
        if self.job_id is None:
            return "The images for this are no longer stored: run /inpaint again."
        if self.deleted_after_s is not None:
            kept = _duration(self.deleted_after_s)
            if self.result:
                return (f"Job #{self.job_id}'s result was deleted after {kept} (this bot keeps results that long), "
                        "so it can't be zoomed, panned or varied any more: start a new job with /inpaint.")
            return (f"Job #{self.job_id}'s pictures were deleted after {kept} (this bot keeps a job's pictures that "
                    "long), so it can't be run again: start a new job with /inpaint.")
        return f"Job #{self.job_id}'s images are no longer stored, so it can't be run again."


def _duration(seconds: float) -> str:
    """Days, or hours under a day: "7 days", "1 day", "12 hours"."""
    if seconds >= 86400:
        days = round(seconds / 86400)
        return f"{days} day{'s' if days != 1 else ''}"
    hours = max(1, round(seconds / 3600))
    return f"{hours} hour{'s' if hours != 1 else ''}"


@dataclass(frozen=True)
class DraftGone:
    def plain(self) -> str:
        return ("This preview has already been confirmed or cancelled, or it expired (previews nobody confirms are "
                "deleted with the pictures of old jobs). Start again with /inpaint.")


@dataclass(frozen=True)
class Unsupported:
    """The backend can't do what an option asks."""

    option: str
    why: str

    def plain(self) -> str:
        return f"This bot's backend can't do `{self.option}`: {self.why}."


@dataclass(frozen=True)
class NotRunning:
    """The bot is starting or stopping: jobs can't be queued right now."""

    def plain(self) -> str:
        return "The bot is starting up or shutting down; try again in a moment."


Refusal = (Banned | ChannelNotAllowed | RoleNotAllowed | PromptBlocked | Cooldown | UserQuotaUsed | ServerQuotaUsed
           | StepBudgetExceeded | SpendBudgetReached | InvalidOptions | JobGone | ImagesGone | DraftGone | Unsupported
           | NotRunning)


class Refused(Exception):
    """A job (or a step towards one) was refused for `reason`. Nothing is queued; a blocked prompt alone leaves a
    record behind (a `blocked` job with the rule it broke)."""

    def __init__(self, reason: Refusal) -> None:
        super().__init__(reason.plain())
        self.reason = reason
