"""The inpaint bot's entry point: `python bot.py [--sync]`.

The configuration comes from the environment / `.env`. Without DISCORD_TOKEN it explains what to set and exits 2.
The services are built first, outside discord.py (`services/container.py`), then the bot is started on them:

    async with build_services(config) as services, InpaintBot(config, services) as bot:
        await bot.start(token)

Commands sync deliberately: to DEV_GUILD_ID on every start while developing; globally only with `--sync`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import sys

import aiohttp
import discord
from discord.ext import commands
from pydantic import ValidationError

from cogs.buttons import JOB_BUTTONS
from cogs.drafts import DRAFT_BUTTONS
from cogs.modlog import MODLOG_BUTTONS
from cogs.permissions import NEEDED
from cogs.posting import ChannelPosting
from services.config import BotConfig, load_config
from services.container import Services, build_services
from services.errors import StartupError, validation_problems

log = logging.getLogger("inpaint.bot")

#: Loaded in this order: the presenter starts the dispatcher (and recovers unfinished jobs) with the error handler,
#: the mod log and the commands already in place.
EXTENSIONS = ("cogs.errors", "cogs.modlog", "cogs.inpaint", "cogs.history", "cogs.settings", "cogs.presenter")

SETUP_HELP = """\
The bot needs a Discord bot token to start.

  1. Create an application at https://discord.com/developers/applications, add a Bot, copy its token.
  2. Put it in a file named .env in the folder you start the bot from (cp .env.example .env lists every
     setting), or in the environment:

       DISCORD_TOKEN=your-token-here

  3. Choose a backend (optional):
       FAL_KEY=key-id:key-secret          use hosted fal.ai (fal-ai/fast-sdxl/inpainting)
       WORKER_URL=http://127.0.0.1:8000   use your own GPU worker
     With neither, a CPU-only fill runs inside the bot (no prompt, for trying it out).

  4. Invite the bot: .venv/bin/python bot.py --invite prints the link (bot and applications.commands scopes,
     exactly the permissions it needs). Then run:
       .venv/bin/python bot.py --sync      (once, to register the slash commands everywhere)
     or set DEV_GUILD_ID=<server id> to register them instantly in one server while developing.

  Then run the same command again.
"""


class InpaintBot(commands.Bot):
    """The Discord client. Everything it runs on is in `services`; the cogs reach it through the client."""

    def __init__(self, config: BotConfig, services: Services, *, sync_globally: bool = False) -> None:
        # what the bot reads: interactions arrive without any intent; `guilds` keeps servers, channels and roles
        # cached (permissions, upload limits). No privileged intents.
        super().__init__(command_prefix=commands.when_mentioned, intents=discord.Intents(guilds=True))
        self.config = config
        self.services = services
        self.sync_globally = sync_globally
        #: every post and edit in a channel, within Discord's budget for it (cogs/posting.py)
        self.posting = ChannelPosting(limit=config.channel_budget_ops, per_s=config.channel_budget_s)

    async def setup_hook(self) -> None:
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        self.add_dynamic_items(*JOB_BUTTONS, *DRAFT_BUTTONS, *MODLOG_BUTTONS)
        await self.sync_commands()

    async def close(self) -> None:
        """Stop running jobs first (they resume on the next start), while Discord and the extensions that show
        what happens to them are still there; then close the client, which unloads the extensions."""
        await self.services.dispatcher.close()
        await super().close()
        await self.posting.close()

    async def sync_commands(self) -> None:
        if self.config.dev_guild_id is not None:
            guild = discord.Object(self.config.dev_guild_id)
            self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
            log.info("synced %d commands to the dev guild %s", len(synced), self.config.dev_guild_id)
        if self.sync_globally:
            synced = await self.tree.sync()
            log.info("synced %d global commands (they can take a while to appear)", len(synced))


def invite_url(token: str) -> str:
    """The URL that adds the bot to a server, with the `bot` and `applications.commands` scopes and exactly the
    permissions it needs. A bot token's first part is its application's id, base64-encoded."""
    first = token.split(".")[0]
    try:
        client_id = base64.urlsafe_b64decode(first + "=" * (-len(first) % 4)).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise StartupError("DISCORD_TOKEN doesn't look like a bot token (copy it again from the developer "
                           "portal's Bot page)") from exc
    if not client_id.isdigit():
        raise StartupError("DISCORD_TOKEN doesn't look like a bot token (copy it again from the developer "
                           "portal's Bot page)")
    return discord.utils.oauth_url(client_id, permissions=NEEDED, scopes=("bot", "applications.commands"))


async def run(config: BotConfig, token: str, *, sync_globally: bool) -> None:
    """Build the services, log in (which loads the extensions and syncs the commands), then stay connected. What
    stops the start is a `StartupError` saying what to change; later errors are the bot's own, with tracebacks."""
    async with build_services(config) as services, InpaintBot(config, services, sync_globally=sync_globally) as bot:
        try:
            await bot.login(token)
        except Exception as exc:
            problem = startup_problem(exc)
            if problem is None:
                raise
            raise StartupError(problem) from exc
        await bot.connect()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the inpaint bot.", epilog=SETUP_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sync", action="store_true", help="register the slash commands globally, then run")
    parser.add_argument("--invite", action="store_true", help="print the URL that adds the bot to a server, and exit")
    args = parser.parse_args(argv)
    try:
        config = load_config()
    except ValidationError as exc:
        print(f"The bot can't start: a setting is invalid: {'; '.join(validation_problems(exc))}", file=sys.stderr)
        return 2
    if config.discord_token is None or not config.discord_token.get_secret_value().strip():
        print("DISCORD_TOKEN is not set.\n\n" + SETUP_HELP, file=sys.stderr)
        return 2
    try:
        if args.invite:
            print(invite_url(config.discord_token.get_secret_value().strip()))
            return 0
        discord.utils.setup_logging(level=logging.INFO, root=True)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per backend poll
        asyncio.run(run(config, config.discord_token.get_secret_value().strip(), sync_globally=args.sync))
    except KeyboardInterrupt:
        pass
    except StartupError as exc:  # one line saying what to change, no traceback
        print(f"The bot can't start: {exc}", file=sys.stderr)
        return 1
    return 0


def startup_problem(exc: BaseException) -> str | None:
    """One line for what stopped the bot logging in to Discord (None: a bug, shown with its traceback)."""
    match exc:
        case discord.LoginFailure():
            return ("Discord refused DISCORD_TOKEN. Check it is the bot's current token (the developer portal's "
                    "Bot page, Reset Token); python bot.py --help for the setup steps.")
        case discord.Forbidden() | discord.NotFound() if "/commands" in str(getattr(exc.response, "url", "")):
            return ("Discord refused to register the slash commands in DEV_GUILD_ID: check the id, and that the bot "
                    "was invited there with the applications.commands scope (python bot.py --invite).")
        case aiohttp.ClientConnectorError() | aiohttp.ServerTimeoutError() | discord.GatewayNotFound():
            return (f"Discord can't be reached ({exc}). Check this machine's network, DNS and firewall "
                    "(discord.com, port 443).")
        case TimeoutError():
            return "Discord didn't answer in time. Check this machine's network, then try again."
        case aiohttp.ClientError():
            return f"talking to Discord failed ({exc}). Try again; if it persists, check the network."
    return None


if __name__ == "__main__":
    raise SystemExit(main())
