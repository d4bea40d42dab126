"""Starting the bot: without a token it explains what to set; a bad token, Discord out of reach, a backend that
can't serve the moderation policy or a bad setting each stop it with one line saying what to do (exit 1 or 2, no
traceback); settings never show secrets."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from services.backend_select import choose_backend
from services.config import BotConfig

ROOT = Path(__file__).resolve().parents[2]


def test_missing_token_prints_setup_and_exits_nonzero(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DISCORD_TOKEN", "FAL_KEY", "WORKER_URL")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, str(ROOT / "bot.py")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "DISCORD_TOKEN is not set" in proc.stderr and "DISCORD_TOKEN=your-token-here" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_settings_from_env_file_hide_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("DISCORD_TOKEN=discord-secret-token\nFAL_KEY=abc:fal-secret-value\n")
    monkeypatch.chdir(tmp_path)
    for name in ("DISCORD_TOKEN", "FAL_KEY", "WORKER_URL"):
        monkeypatch.delenv(name, raising=False)
    settings = BotConfig()
    assert settings.discord_token is not None
    assert settings.discord_token.get_secret_value() == "discord-secret-token"
    shown = repr(settings) + str(settings) + settings.model_dump_json()
    assert "discord-secret-token" not in shown and "fal-secret-value" not in shown
    choice = choose_backend(settings)
    assert (choice.name, choice.base_url, choice.key) == ("fal", "https://queue.fal.run", settings.fal_key)


def test_worker_url_selects_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAL_KEY", raising=False)
    settings = BotConfig(_env_file=None, worker_url="http://127.0.0.1:8000")
    choice = choose_backend(settings)
    assert (choice.name, choice.base_url) == ("worker", "http://127.0.0.1:8000")
    bare = choose_backend(BotConfig(_env_file=None))
    assert (bare.name, bare.base_url) == ("embedded", None)


TOKEN = "OTAwMDAwMDAwMDAwMDAwMDAx.GhIjKl.not-a-real-secret-but-shaped-like-one"


@asynccontextmanager
async def _http(routes: dict[str, tuple[int, object]]) -> AsyncIterator[str]:
    """A small HTTP server on 127.0.0.1 answering `path: (status, json)` (Discord's API, or a worker's /health)."""
    async def answer(request: web.Request) -> web.Response:
        status, body = routes.get(request.path, (404, {"message": "404: Not Found", "code": 0}))
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _start(tmp_path: Path, discord_api: str, *args: str, **settings: str) -> tuple[int, str]:
    """`python bot.py` in a fresh process, its Discord at `discord_api`; returns (exit code, stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISCORD_TOKEN", "FAL_KEY", "WORKER_URL")}
    env.update({"PYTHONPATH": str(ROOT), "DISCORD_TOKEN": TOKEN, "DATABASE_PATH": str(tmp_path / "bot.sqlite3"),
                "PAINTER_PORT": "0", **settings})
    code = ("import sys, discord.http; discord.http.Route.BASE = sys.argv[1]; import bot; "
            "raise SystemExit(bot.main(sys.argv[2:]))")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, f"{discord_api}/api/v10", *args,
                                                cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def _one_line(stderr: str, expected: str) -> None:
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("The bot can't start: ") and expected in last, stderr


async def test_discord_out_of_reach(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    code, err = await _start(tmp_path, closed)
    assert code == 1
    _one_line(err, "Discord can't be reached")


async def test_a_token_discord_refuses(tmp_path: Path) -> None:
    async with _http({"/api/v10/users/@me": (401, {"message": "401: Unauthorized", "code": 0})}) as api:
        code, err = await _start(tmp_path, api)
    assert code == 1
    _one_line(err, "Discord refused DISCORD_TOKEN")
    assert TOKEN not in err and TOKEN.split(".")[-1] not in err


async def test_a_generative_worker_without_a_safety_checker(tmp_path: Path) -> None:
    health = {"ready": True, "pipeline": "sdxl", "safety_checker": False, "expand_prompt": False}
    async with _http({"/health": (200, health)}) as worker:  # Discord is never reached: the check comes first
        code, err = await _start(tmp_path, "http://127.0.0.1:9", WORKER_URL=worker)
    assert code == 1
    _one_line(err, "runs the sdxl pipeline without a safety checker")
    assert "SAFETY_CHECKER_PATH" in err


async def test_bad_settings_and_a_malformed_token(tmp_path: Path) -> None:
    code, err = await _start(tmp_path, "http://127.0.0.1:9", PAINTER_PORT="eighty")
    assert code == 2 and "Traceback" not in err and "painter_port" in err and len(err.strip().splitlines()) == 1
    code, err = await _start(tmp_path, "http://127.0.0.1:9", "--invite", DISCORD_TOKEN="not a token")
    assert code == 1
    _one_line(err, "DISCORD_TOKEN doesn't look like a bot token")
    with socket.socket() as busy:  # the painter's port taken
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, err = await _start(tmp_path, "http://127.0.0.1:9", PAINTER_PORT=str(busy.getsockname()[1]),
                                 PAINTER_PUBLIC_URL="https://paint.example.com")
    assert code == 1
    _one_line(err, "the mask painter can't listen on 127.0.0.1:")
    code, err = await _start(tmp_path, "http://127.0.0.1:9", PAINTER_PUBLIC_URL="paint.example.com")
    assert code == 1
    _one_line(err, "PAINTER_PUBLIC_URL must start with https:// or http://")


async def test_a_classic_worker_without_a_checker_serves_like_the_embedded_default(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The worker answers 422 to a request for a checker it hasn't got, so the bot reads its /health first: a
    classic (non-generative) worker is used without the checker, and the log says so loudly."""
    from services.worker.app import create_app
    from services.worker.config import WorkerConfig
    from tests.helpers.bot_env import ALICE, bot_config, ephemeral_text, result_message, running_bot, uploads
    from tests.helpers.discord_harness import FakeDiscord
    from tests.helpers.fal_server import FalTestServer
    from tests.helpers.worker_harness import serve

    app = create_app(WorkerConfig(_env_file=None, pipeline="classic", warmup=False))
    async with serve(app) as worker, FalTestServer() as unused:
        fake = FakeDiscord()
        with fake.installed(), caplog.at_level(logging.WARNING):
            config = bot_config(tmp_path, unused, fal_key=None, worker_url=worker)
            async with running_bot(config, fake) as (bot, driver):
                record = await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="a boat")
                assert "Queued as job #1" in ephemeral_text(record)
                await result_message(fake, 1, bot)
                job = await bot.services.store.jobs.get(1)
                assert job.input["enable_safety_checker"] is False
    assert any("HAS NO SAFETY CHECKER" in r.getMessage() and worker in r.getMessage() for r in caplog.records)


async def test_a_worker_still_starting_is_asked_again_before_jobs(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Started together (compose), the bot may find the worker's /health not answering yet: it doesn't decide then,
    but asks again before the next job, and serves a classic worker without a checker as it should."""
    from typing import cast

    from starlette.applications import Starlette

    from services.worker.app import create_app
    from services.worker.config import WorkerConfig
    from tests.helpers.bot_env import ALICE, bot_config, ephemeral_text, result_message, running_bot, uploads
    from tests.helpers.discord_harness import FakeDiscord
    from tests.helpers.fal_server import FalTestServer
    from tests.helpers.worker_harness import serve

    worker_app = create_app(WorkerConfig(_env_file=None, pipeline="classic", warmup=False))
    starting = True

    async def app(scope: dict[str, object], receive: object, send: object) -> None:  # /health: 503 while starting
        if scope["type"] == "http" and scope["path"] == "/health" and starting:
            reply = cast(Callable[[dict[str, object]], Awaitable[None]], send)
            await reply({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"text/plain")]})
            await reply({"type": "http.response.body", "body": b"starting"})
            return
        await worker_app(scope, receive, send)  # type: ignore[arg-type]

    async with serve(cast(Starlette, app)) as worker, FalTestServer() as unused:
        fake = FakeDiscord()
        with fake.installed(), caplog.at_level(logging.WARNING):
            config = bot_config(tmp_path, unused, fal_key=None, worker_url=worker)
            async with running_bot(config, fake) as (bot, driver):
                assert not bot.services.launcher.backend.checker_known
                starting = False
                bot.services.launcher.capabilities.recheck_s = 0.0
                record = await driver.slash(ALICE, "inpaint", **uploads(fake), prompt="a boat")
                assert "Queued as job #1" in ephemeral_text(record)
                await result_message(fake, 1, bot)
                assert (await bot.services.store.jobs.get(1)).input["enable_safety_checker"] is False
    assert any("HAS NO SAFETY CHECKER" in r.getMessage() for r in caplog.records)
