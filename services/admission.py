"""Admission: whether a job may run, and with which options, under its server's settings.

In order: a banned user, the allowed channels and roles (moderators pass these), the server's default options,
the prompt filters (a blocked prompt is stored as a `blocked` job with the rule that matched, and reported to the
moderation log), then cooldowns, quotas and the step budget, and last the bot-wide spending budget
(`services/spend.py`, every server and DMs alike). Every refusal is a `Refused` with its reason.

The spending budget is checked here (a read, so a job past it is refused before its images are fetched) and
reserved by `reserve` with the request's exact cost just before the job is created (the launcher calls it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.job_state import JobStatus
from services.modlog import ModerationLog
from services.prompt_filter import PromptFilter
from services.quotas import Quotas
from services.refusals import Banned, ChannelNotAllowed, PromptBlocked, Refused, RoleNotAllowed
from services.requester import Requester
from services.schema import InpaintInput, step_cost
from services.server_settings import ServerSettings
from services.spend import SpendBudget, SpendHold, estimated_units, request_units
from services.store import Store


@dataclass(frozen=True)
class Admission:
    """A job may run: the server's settings, and its options with the server's defaults filled in."""

    settings: ServerSettings
    options: dict[str, Any]


class Admissions:
    def __init__(self, store: Store, quotas: Quotas, modlog: ModerationLog, *, backend: str,
                 spend: SpendBudget | None = None) -> None:
        self.store = store
        self.quotas = quotas
        self.modlog = modlog
        self.backend = backend
        self.spend = spend

    async def admit(self, who: Requester, options: dict[str, Any], *, parent_id: int | None = None) -> Admission:
        """The options to run with (None values = not given), or `Refused` saying why not."""
        settings = await self.store.server_settings.load(who.guild_id)
        if who.guild_id is not None:
            await self._check_access(who, settings)
        options = settings.with_defaults(options)
        hit = PromptFilter(settings).check({"prompt": str(options.get("prompt", "")),
                                            "negative_prompt": str(options.get("negative_prompt", ""))})
        if hit is not None:
            job_id = await self._block(who, options, parent_id, f"{hit.rule} in the {hit.field.replace('_', ' ')}")
            raise Refused(PromptBlocked(hit.field, hit.rule, job_id))
        if who.guild_id is not None:
            await self.quotas.check(settings, who.guild_id, who.user_id, cost=step_cost(options))
        if self.spend is not None:
            await self.spend.check(who.guild_id, estimated_units(options))
        return Admission(settings, options)

    async def reserve(self, who: Requester, request: InpaintInput) -> SpendHold:
        """Reserve the bot-wide budget for the job about to be created from `request` (its exact cost), or raise
        `Refused` if another job took what was left since admission. Attach the hold to the job once it exists."""
        if self.spend is None:
            return SpendHold(self.store.spend, None, request_units(request))
        return await self.spend.reserve(who.guild_id, request_units(request))

    async def _check_access(self, who: Requester, settings: ServerSettings) -> None:
        assert who.guild_id is not None
        if await self.store.bans.is_banned(who.guild_id, who.user_id):
            raise Refused(Banned())
        if who.moderator:
            return
        if settings.allowed_channel_ids and who.channel_id not in settings.allowed_channel_ids:
            raise Refused(ChannelNotAllowed(tuple(settings.allowed_channel_ids)))
        if settings.allowed_role_ids and not set(who.role_ids) & set(settings.allowed_role_ids):
            raise Refused(RoleNotAllowed(tuple(settings.allowed_role_ids)))

    async def _block(self, who: Requester, options: dict[str, Any], parent_id: int | None, rule: str) -> int:
        """Store the refused job as `blocked` (with the rule) and report it; returns its id."""
        job = await self.store.jobs.create(user_id=who.user_id, guild_id=who.guild_id, channel_id=who.channel_id,
                                           backend=self.backend, input=options, parent_job_id=parent_id,
                                           age_restricted=who.age_restricted)
        job = await self.store.jobs.transition(job.id, JobStatus.BLOCKED, message="blocked by the prompt filter",
                                               error=f"Blocked: {rule}", data={"rule": rule})
        if who.guild_id is not None:
            await self.modlog.record(who.guild_id, "prompt_blocked", job=job, user_id=who.user_id,
                                     detail=f"{rule}: {options.get('prompt', '')}"[:1000])
        return job.id
