"""The bot process's configuration, read from the environment and an optional `.env` file.

Secrets are `SecretStr`, so they print as `**********` in reprs, logs and tracebacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.schema import INPAINT_APP_ID
from services.url_fetch import FAL_CDN_HOSTS, host_list_setting

FAL_QUEUE_BASE = "https://queue.fal.run"


class BotConfig(BaseSettings):
    """Everything the bot reads from its environment (the worker has its own: `services/worker/config.py`)."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    discord_token: SecretStr | None = Field(default=None, description="Bot token from the developer portal")
    dev_guild_id: int | None = Field(default=None, description="Guild to sync commands to while developing")

    fal_key: SecretStr | None = Field(default=None, description="fal.ai key: selects the hosted backend")
    fal_queue_base: str = Field(default=FAL_QUEUE_BASE, description="Queue base URL of hosted fal")
    worker_url: str | None = Field(default=None, description="Base URL of a self-hosted worker")
    worker_key: SecretStr | None = Field(default=None, description="Key the worker expects, if any")
    app_id: str = INPAINT_APP_ID

    database_path: Path = Field(default=Path("data/bot.sqlite3"))

    max_image_bytes: int = Field(default=25 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=40_000_000, ge=4096)

    backend_total_timeout_s: float = Field(default=600.0, gt=0)
    backend_poll_interval_s: float = Field(default=0.5, gt=0)
    painter_enabled: bool = Field(default=True, description="Offer the web mask painter when no mask is given")
    painter_host: str = Field(default="127.0.0.1", description="Where the painter's web server listens")
    painter_port: int = Field(default=8765, ge=0, le=65535)
    painter_public_url: str | None = Field(
        default=None, description="The painter's address as users reach it (e.g. https://bot.example.com); "
                                  "without it (or with a localhost one) no painter links are offered")
    painter_secret: SecretStr | None = Field(
        default=None, description="Key that signs painter links; default a new random one each start")
    painter_link_ttl_s: int = Field(default=1800, ge=60, description="How long a painter link works")
    progress_edit_interval_s: float = Field(default=2.0, ge=0, description="Least time between progress edits")
    dispatch_concurrency: int = Field(default=4, ge=1, description="Jobs the bot has at the backend at once")
    channel_budget_ops: int = Field(default=5, ge=1, description="Discord's per-channel budget: message operations…")
    channel_budget_s: float = Field(default=5.0, gt=0, description="…per this many seconds (posts and edits alike)")
    nsfw_threshold: float = Field(default=0.5, gt=0, le=1, description="NSFW probability at which the backend's "
                                  "estimator (fal-ai/imageutils/nsfw) flags a whole upload")
    fetch_allow: Annotated[list[str] | None, NoDecode] = Field(
        default=None, description="Comma-separated hosts (`name`, `*.suffix`, `name:port`) and networks "
        "(`10.0.0.0/8`, `127.0.0.1`) downloads may reach although they are not public addresses (the worker reads "
        "the same setting); by default only public addresses are fetched (services/url_fetch.py)")
    result_hosts: Annotated[list[str], NoDecode] = Field(
        default=list(FAL_CDN_HOSTS), description="Hosts besides the backend's own origin that result images may "
        "be downloaded from (comma-separated, `*.suffix` for subdomains): by default hosted fal's CDN")

    @field_validator("fetch_allow", "result_hosts", mode="before")
    @classmethod
    def _split_host_lists(cls, value: object) -> object:
        return host_list_setting(value)


def load_config() -> BotConfig:
    """Read the configuration from the environment and `.env` (in the working directory)."""
    return BotConfig()
