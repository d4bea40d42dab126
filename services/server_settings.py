"""A server's settings: everything its managers set with /settings (safety, filters, mod log, access, limits,
defaults). Stored key by key (`services/store/server_settings.py`); every default is the safe one."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

NsfwPolicy = Literal["block", "spoiler", "allow"]


class ServerSettings(BaseModel):
    """Everything a server's managers can set. Unset keys take these defaults."""

    nsfw_policy: NsfwPolicy = "block"  # flagged images in age-restricted channels (ordinary channels: block)
    checker_off_in_age_restricted: bool = False
    use_default_filters: bool = True
    filter_words: list[str] = Field(default_factory=list)
    filter_regexes: list[str] = Field(default_factory=list)
    modlog_channel_id: int | None = None
    allowed_channel_ids: list[int] = Field(default_factory=list)
    allowed_role_ids: list[int] = Field(default_factory=list)
    user_concurrent: int = Field(default=2, ge=1, le=20)
    server_concurrent: int = Field(default=4, ge=1, le=100)
    user_cooldown_s: int = Field(default=0, ge=0, le=86400)
    user_daily_jobs: int | None = Field(default=None, ge=1)
    server_daily_jobs: int | None = Field(default=None, ge=1)
    server_daily_steps: int | None = Field(default=None, ge=1, description="steps × images per day (API spend)")
    confirm_masks: bool = False  # show the mask to its author and wait for Confirm before spending anything
    default_steps: int | None = Field(default=None, ge=1, le=65)
    default_size: str | None = None
    default_negative_prompt: str | None = None

    def safety_checker_required(self, age_restricted: bool) -> bool:
        return not (age_restricted and self.checker_off_in_age_restricted)

    def flagged_action(self, age_restricted: bool) -> NsfwPolicy:
        """What happens to an image the safety checker flagged: ordinary channels always block."""
        return self.nsfw_policy if age_restricted else "block"

    def with_defaults(self, params: dict[str, Any]) -> dict[str, Any]:
        """A job's options with the server's defaults filled in where the user gave none (None = not given)."""
        filled = {k: v for k, v in params.items() if v is not None}
        for key, value in (("num_inference_steps", self.default_steps), ("image_size", self.default_size),
                           ("negative_prompt", self.default_negative_prompt or None)):
            if key not in filled and value is not None:
                filled[key] = value
        return filled
