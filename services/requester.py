"""Who is asking, and where: what admission needs to know about the person starting a job."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Requester(BaseModel):
    """A user in a channel of a server (or a DM: no guild), with their roles and standing there."""

    model_config = ConfigDict(frozen=True)

    guild_id: int | None
    channel_id: int | None
    user_id: int
    role_ids: tuple[int, ...] = ()
    age_restricted: bool = False  # the channel is marked age-restricted (NSFW)
    moderator: bool = False  # may act on other people's jobs and bypasses channel and role limits
