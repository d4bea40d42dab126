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
    worker_max_queue: int | None = Field(
        default=None, ge=1, description="With BACKENDS naming `worker`: the worker's queue length (its /health) at "
        "which new jobs go to the next backend instead; unset: no limit")
    backends: SecretStr | None = Field(
        default=None, description="The backend pool, in preference order (services/backend_pool.py): names of the "
        "backends the settings above describe (`worker,fal`), or a JSON list whose entries are those names or "
        "objects {name, kind: worker|fal, url, key, max_queue}; unset: FAL_KEY, else WORKER_URL, else the embedded "
        "worker. Secret: entries may hold keys")
    app_id: str = INPAINT_APP_ID

    database_path: Path = Field(default=Path("data/bot.sqlite3"))

    max_image_bytes: int = Field(default=25 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=40_000_000, ge=4096)

    backend_total_timeout_s: float = Field(
        default=600.0, gt=0, description="A job's deadline at the backend, from when it first leaves the bot's "
        "queue (kept over restarts): past it the request is cancelled and the job fails")
    backend_outage_s: float = Field(
        default=120.0, ge=0, description="How long a job waits for an unreachable backend (keeping its request) "
        "before it fails")
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
    spend_daily_budget: float | None = Field(
        default=None, ge=0, description="Bot-wide daily budget (all servers, UTC days) in megapixel-steps: output "
        "megapixels × steps × images (services/spend.py); unset: 25000 with FAL_KEY, none with a worker; 0: none")
    spend_price_per_unit: float | None = Field(default=None, gt=0, description="What one megapixel-step costs, to "
                                               "show the budget as money in /quota (e.g. 0.0000954)")
    spend_currency: str = Field(default="USD", min_length=1, max_length=12, description="The currency of "
                                "SPEND_PRICE_PER_UNIT")
    # retention (services/retention.py): days after a job finished; 0 keeps forever
    retention_inputs_days: float = Field(default=7, ge=0, description="Days a finished job's pictures (upload, "
                                         "mask, crops) and unconfirmed drafts are kept")
    retention_results_days: float = Field(default=30, ge=0, description="Days a finished job's result images are "
                                          "kept (a result not yet posted is kept until it is)")
    retention_events_days: float = Field(default=30, ge=0, description="Days a finished job's event history is "
                                         "kept (the job itself stays: options, status, error)")
    retention_modlog_days: float = Field(default=365, ge=0, description="Days moderation-log entries are kept")
    retention_interval_s: float = Field(default=3600, gt=0, description="Time between two retention sweeps")
    retention_convert_max_mb: int = Field(default=256, ge=0, description="A database created before incremental "
                                          "vacuum is converted while running when its live data is at most this")
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
