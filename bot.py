"""The inpaint bot's entry point: `python bot.py [--sync]`.

Settings come from the environment / `.env`. Without DISCORD_TOKEN it explains what to set and exits 2.
Backend: FAL_KEY → hosted fal; WORKER_URL → our worker; neither → the worker app inside this process on
127.0.0.1 (classic CPU pipeline unless MODEL_PATH is set), still spoken to over HTTP.

Commands sync deliberately: to DEV_GUILD_ID on every start while developing; globally only with `--sync`.
"""

from __future__ import annotations

import argparse
import logging
import sys

import discord
import httpx
from discord.ext import commands

from services.admission import Admissions
from services.backend_select import BackendChoice, EmbeddedWorker, choose_backend
from services.backends.fal_queue import FalQueueClient
from services.dispatch import Dispatcher
from services.jobs import JobService
from services.limits import Limits
from services.moderation import GuildPolicy, load_policy
from services.settings import Settings, load_settings
from services.store import JobStore, ModerationStore

log = logging.getLogger("inpaint.bot")

EXTENSIONS = ("cogs.errors", "cogs.inpaint", "cogs.jobs", "cogs.settings")

SETUP_HELP = """\
The bot needs a Discord bot token to start.

  1. Create an application at https://discord.com/developers/applications, add a Bot, copy its token.
  2. Put it in a file named .env next to bot.py (or in the environment):

       DISCORD_TOKEN=your-token-here

  3. Choose a backend (optional):
       FAL_KEY=key-id:key-secret          use hosted fal.ai (fal-ai/fast-sdxl/inpainting)
       WORKER_URL=http://127.0.0.1:8000   use your own GPU worker
     With neither, a CPU-only fill runs inside the bot (no prompt, for trying it out).

  4. Invite the bot with the applications.commands and bot scopes, then run:
       .venv/bin/python bot.py --sync      (once, to register the slash commands everywhere)
     or set DEV_GUILD_ID=<server id> to register them instantly in one server while developing.

  Then run the same command again.
"""


class InpaintBot(commands.Bot):
    """The bot object: owns the settings, store, HTTP client, backend and dispatcher (no other global state)."""

    def __init__(self, settings: Settings, *, sync_globally: bool = False) -> None:
        super().__init__(command_prefix=commands.when_mentioned, intents=discord.Intents.default())
        self.settings = settings
        self.sync_globally = sync_globally
        self._store: JobStore | None = None
        self._backend: FalQueueClient | None = None
        self._dispatcher: Dispatcher | None = None
        self._jobs: JobService | None = None
        self._presenter: object | None = None
        self._http_client: httpx.AsyncClient | None = None
        self._moderation: ModerationStore | None = None
        self._limits: Limits | None = None
        self._admissions: Admissions | None = None
        self._modlog: object | None = None
        self.painter: Painter | None = None
        self.embedded_worker: EmbeddedWorker | None = None
        self.backend_choice: BackendChoice | None = None

    # typed accessors for what setup_hook builds
    @property
    def store(self) -> JobStore:
        assert self._store is not None, "setup_hook has not run"
        return self._store

    @property
    def backend(self) -> FalQueueClient:
        assert self._backend is not None, "setup_hook has not run"
        return self._backend

    @property
    def dispatcher(self) -> Dispatcher:
        assert self._dispatcher is not None, "setup_hook has not run"
        return self._dispatcher

    @property
    def jobs(self) -> JobService:
        assert self._jobs is not None, "setup_hook has not run"
        return self._jobs

    @property
    def presenter(self) -> DiscordPresenter:
        assert isinstance(self._presenter, DiscordPresenter), "setup_hook has not run"
        return self._presenter

    @property
    def moderation(self) -> ModerationStore:
        assert self._moderation is not None, "setup_hook has not run"
        return self._moderation

    @property
    def limits(self) -> Limits:
        assert self._limits is not None, "setup_hook has not run"
        return self._limits

    @property
    def admissions(self) -> Admissions:
        assert self._admissions is not None, "setup_hook has not run"
        return self._admissions

    @property
    def modlog(self) -> ModLog:
        assert isinstance(self._modlog, ModLog), "setup_hook has not run"
        return self._modlog

    @property
    def http_client(self) -> httpx.AsyncClient:
        assert self._http_client is not None, "setup_hook has not run"
        return self._http_client

    async def setup_hook(self) -> None:
        settings = self.settings
        self._store = await JobStore.open(settings.database_path)
        self._http_client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=10.0))
        choice = choose_backend(settings)
        base_url = choice.base_url
        if choice.name == "embedded":
            self.embedded_worker = EmbeddedWorker()
            base_url = await self.embedded_worker.start()
        assert base_url is not None
        self.backend_choice = choice
        self._backend = FalQueueClient(base_url=base_url, key=choice.key, app_id=settings.app_id,
                                       http=self._http_client, poll_interval_s=settings.backend_poll_interval_s,
                                       total_timeout_s=settings.backend_total_timeout_s)
        store = self._store
        self._jobs = JobService(store, backend=choice.name, safety_checker=choice.safety_checker)
        self._moderation = ModerationStore(store)
        self._limits = Limits(self._moderation)
        self._modlog = modlog = ModLog(self)
        self._admissions = Admissions(store, self._jobs, self._moderation, self._limits, sink=modlog)
        self._presenter = DiscordPresenter(self, min_edit_interval=settings.progress_edit_interval_s)

        async def policy_of(guild_id: int | None) -> GuildPolicy:
            return await load_policy(store, guild_id)

        self._dispatcher = Dispatcher(store, self._jobs, self._backend, self._http_client, self._presenter,
                                      concurrency=settings.dispatch_concurrency, policies=policy_of, sink=modlog)
        if settings.painter_enabled:
            self.painter = Painter(self)
            await self.painter.start()
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        self.add_dynamic_items(*BUTTONS, *MODLOG_BUTTONS, *DRAFT_BUTTONS)
        await self._dispatcher.start()
        log.info("job store %s; backend %s at %s", settings.database_path, choice.name, base_url)
        await self.sync_commands()

    async def sync_commands(self) -> None:
        if self.settings.dev_guild_id is not None:
            guild = discord.Object(self.settings.dev_guild_id)
            self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
            log.info("synced %d commands to the dev guild %s", len(synced), self.settings.dev_guild_id)
        if self.sync_globally:
            synced = await self.tree.sync()
            log.info("synced %d global commands (they can take a while to appear)", len(synced))

    async def close(self) -> None:
        if self._dispatcher is not None:
            await self._dispatcher.close()
        if isinstance(self._presenter, DiscordPresenter):
            await self._presenter.close()
        if self.painter is not None:
            await self.painter.stop()
        await super().close()
        if self._backend is not None:
            await self._backend.aclose()
        if self.embedded_worker is not None:
            await self.embedded_worker.stop()
        if self._http_client is not None:
            await self._http_client.aclose()
        if self._store is not None:
            await self._store.close()


from cogs.buttons import BUTTONS  # noqa: E402  (cogs import the bot type only for typing)
from cogs.drafts import DRAFT_BUTTONS  # noqa: E402
from cogs.modlog import MODLOG_BUTTONS, ModLog  # noqa: E402
from cogs.painter import Painter  # noqa: E402
from cogs.presenter import DiscordPresenter  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the inpaint bot.")
    parser.add_argument("--sync", action="store_true", help="register the slash commands globally, then run")
    args = parser.parse_args(argv)
    settings = load_settings()
    if settings.discord_token is None or not settings.discord_token.get_secret_value().strip():
        print("DISCORD_TOKEN is not set.\n\n" + SETUP_HELP, file=sys.stderr)
        return 2
    discord.utils.setup_logging(level=logging.INFO, root=True)
    bot = InpaintBot(settings, sync_globally=args.sync)
    try:
        bot.run(settings.discord_token.get_secret_value(), log_handler=None)
    except discord.LoginFailure:
        print("Discord refused DISCORD_TOKEN: check that it is the bot's current token.\n\n" + SETUP_HELP,
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
