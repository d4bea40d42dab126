"""Admission: whether a job may run, and with what parameters, under its server's policy.

In order: banned users, allowed channels and roles, the prompt filters (a blocked prompt is stored as a
`blocked` job with the rule that matched, and reported to the moderation log), cooldowns and quotas, the
server's default parameters, and whether the safety checker must run (always, unless the server allows
otherwise in age-restricted channels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from services.errors import UserError
from services.jobs import JobService
from services.limits import Limits
from services.moderation import GuildPolicy, PromptFilter, load_policy
from services.store import Job, JobStatus, JobStore, ModerationEntry, ModerationStore


class ModLogSink(Protocol):
    """Where moderation events go (the Discord layer posts them to the server's mod-log channel)."""

    async def record(self, entry: ModerationEntry, *, job: Job | None = None,
                     images: Sequence[bytes] = ()) -> None: ...


class Blocked(UserError):
    """The job was refused by moderation (and stored as blocked)."""


@dataclass(frozen=True)
class Requester:
    guild_id: int | None
    channel_id: int | None
    user_id: int
    role_ids: tuple[int, ...] = ()
    age_restricted: bool = False
    moderator: bool = False


@dataclass(frozen=True)
class Admission:
    policy: GuildPolicy
    params: dict[str, Any]


class Admissions:
    def __init__(self, store: JobStore, jobs: JobService, moderation: ModerationStore, limits: Limits,
                 sink: ModLogSink | None = None) -> None:
        self.store = store
        self.jobs = jobs
        self.moderation = moderation
        self.limits = limits
        self.sink = sink

    async def admit(self, who: Requester, params: dict[str, Any], *, parent: Job | None = None) -> Admission:
        """The parameters to run with, or a `UserError` saying why not (never a half-made job)."""
        policy = await load_policy(self.store, who.guild_id)
        if who.guild_id is not None:
            await self._check_access(who, policy)
        params = self._with_defaults(policy, params)
        hit = PromptFilter(policy).check({"prompt": str(params.get("prompt", "")),
                                          "negative_prompt": str(params.get("negative_prompt", ""))})
        if hit is not None:
            await self._block(who, params, parent, f"{hit.rule} in the {hit.field.replace('_', ' ')}")
            raise Blocked(f"Your {hit.field.replace('_', ' ')} was blocked by this server's filters "
                          f"({hit.rule}). Please rephrase it.")
        if who.guild_id is not None:
            steps = int(params.get("num_inference_steps", 25)) * int(params.get("num_images", 1))
            await self.limits.check(policy, who.guild_id, who.user_id, steps=steps)
        if self.jobs.safety_checker:
            params["enable_safety_checker"] = policy.safety_checker_required(who.age_restricted)
        return Admission(policy, params)

    async def _check_access(self, who: Requester, policy: GuildPolicy) -> None:
        assert who.guild_id is not None
        if await self.moderation.is_banned(who.guild_id, who.user_id):
            raise UserError("You can't use the bot in this server: a moderator has banned you from it.")
        if who.moderator:
            return
        if policy.allowed_channel_ids and who.channel_id not in policy.allowed_channel_ids:
            channels = ", ".join(f"<#{c}>" for c in policy.allowed_channel_ids)
            raise UserError(f"The bot works only in {channels} in this server.")
        if policy.allowed_role_ids and not set(who.role_ids) & set(policy.allowed_role_ids):
            roles = ", ".join(f"<@&{r}>" for r in policy.allowed_role_ids)
            raise UserError(f"Only members with {roles} can use the bot in this server.")

    @staticmethod
    def _with_defaults(policy: GuildPolicy, params: dict[str, Any]) -> dict[str, Any]:
        params = {k: v for k, v in params.items() if v is not None}
        if "num_inference_steps" not in params and policy.default_steps is not None:
            params["num_inference_steps"] = policy.default_steps
        if "image_size" not in params and policy.default_size is not None:
            params["image_size"] = policy.default_size
        if "negative_prompt" not in params and policy.default_negative_prompt:
            params["negative_prompt"] = policy.default_negative_prompt
        return params

    async def _block(self, who: Requester, params: dict[str, Any], parent: Job | None, rule: str) -> None:
        body = {k: v for k, v in params.items() if k not in ("image_url", "mask_url")}
        job = await self.store.create_job(user_id=who.user_id, guild_id=who.guild_id, channel_id=who.channel_id,
                                          backend=self.jobs.backend, input=body,
                                          parent_job_id=parent.id if parent else None,
                                          age_restricted=who.age_restricted)
        job = await self.store.transition(job.id, JobStatus.BLOCKED, message="blocked by the prompt filter",
                                          error=f"Blocked: {rule}", data={"rule": rule})
        if who.guild_id is not None:
            entry = await self.moderation.log(who.guild_id, "prompt_blocked", job_id=job.id, user_id=who.user_id,
                                              detail=f"{rule}: {params.get('prompt', '')}"[:1000])
            if self.sink is not None:
                await self.sink.record(entry, job=job)
