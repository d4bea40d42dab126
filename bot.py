"""The inpaint bot's entry point: `python bot.py`.

Reads settings from the environment / `.env`, explains what to set when something required is missing,
and runs the Discord client with its job store and backend client opened in `setup_hook`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import discord
import httpx
from discord.ext import commands

from services.backends.fal_queue import FalQueueClient
from services.settings import Settings, load_settings
from services.store import JobStore

log = logging.getLogger("inpaint.bot")

SETUP_HELP = """\
The bot needs a Discord bot token to start.

  1. Create an application at https://discord.com/developers/applications, add a Bot, copy its token.
  2. Put it in a file named .env next to bot.py (or in the environment):

       DISCORD_TOKEN=your-token-here

  3. Choose a backend (optional):
       FAL_KEY=key-id:key-secret          use hosted fal.ai (fal-ai/fast-sdxl/inpainting)
       WORKER_URL=http://127.0.0.1:8000   use your own GPU worker

  Then run the same command again.
"""


class InpaintBot(commands.Bot):
    """The bot object: owns the settings, the job store and the backend client (no other global state)."""

    def __init__(self, settings: Settings) -> None:
        intents = discord.Intents.default()
        super().__init__(command_prefix=commands.when_mentioned, intents=intents)
        self.settings = settings
        self._store: JobStore | None = None
        self._backend: FalQueueClient | None = None
        self.http_client: httpx.AsyncClient | None = None

    @property
    def store(self) -> JobStore:
        assert self._store is not None, "setup_hook has not run"
        return self._store

    @property
    def backend(self) -> FalQueueClient:
        assert self._backend is not None, "setup_hook has not run"
        return self._backend

    async def setup_hook(self) -> None:
        self._store = await JobStore.open(self.settings.database_path)
        self.http_client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=10.0))
        base, key, name = backend_target(self.settings)
        self._backend = FalQueueClient(base_url=base, key=key, app_id=self.settings.app_id, http=self.http_client,
                                       poll_interval_s=self.settings.backend_poll_interval_s,
                                       total_timeout_s=self.settings.backend_total_timeout_s)
        log.info("job store at %s; backend: %s (%s)", self.settings.database_path, name, base)

    async def close(self) -> None:
        await super().close()
        if self.http_client is not None:
            await self.http_client.aclose()
        if self._store is not None:
            await self._store.close()


def backend_target(settings: Settings) -> tuple[str, Any, str]:
    """(queue base URL, key, backend name): FAL_KEY → hosted fal; WORKER_URL → our worker."""
    if settings.fal_key is not None:
        return settings.fal_queue_base, settings.fal_key, "hosted fal"
    if settings.worker_url:
        return settings.worker_url, settings.worker_key, "worker"
    log.warning("neither FAL_KEY nor WORKER_URL is set: jobs will fail until a backend is configured")
    return settings.fal_queue_base, None, "hosted fal (no key)"


def main() -> int:
    settings = load_settings()
    if settings.discord_token is None or not settings.discord_token.get_secret_value().strip():
        print("DISCORD_TOKEN is not set.\n\n" + SETUP_HELP, file=sys.stderr)
        return 2
    bot = InpaintBot(settings)
    try:
        bot.run(settings.discord_token.get_secret_value(), log_handler=logging.StreamHandler(), root_logger=True)
    except discord.LoginFailure:
        print("Discord refused DISCORD_TOKEN: check that it is the bot's current token.\n\n" + SETUP_HELP,
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
