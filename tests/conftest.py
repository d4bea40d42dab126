"""Shared fixtures: the fal-protocol backend and the bot on an in-memory Discord (per test), and tiny SDXL model
folders and safety checkers (built once per test session, on CPU, in seconds)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot import InpaintBot
from tests.helpers.bot_env import KEY, bot_env
from tests.helpers.discord_harness import Driver, FakeDiscord
from tests.helpers.fal_server import FalTestServer

BotEnv = tuple[InpaintBot, FakeDiscord, Driver]


@pytest.fixture
async def server() -> AsyncIterator[FalTestServer]:
    """The bot's backend: a fal-protocol server on 127.0.0.1 that queues one poll and logs three lines."""
    async with FalTestServer(key=KEY, queue_polls=1, progress_logs=3) as srv:
        yield srv


@pytest.fixture
async def discord_env(tmp_path: Path, server: FalTestServer) -> AsyncIterator[BotEnv]:
    """A logged-in bot on a fresh in-memory Discord, backed by `server`."""
    async with bot_env(tmp_path, server) as env:
        yield env


def _needs_worker_extra() -> None:
    pytest.importorskip("diffusers", reason="SDXL tests need the [worker] extra (pip install -e '.[dev,worker]')")


@pytest.fixture(scope="session")
def tiny_inpaint_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 9-channel (inpainting checkpoint) SDXL pipeline folder, saved with save_pretrained."""
    _needs_worker_extra()
    from tests.helpers.tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl-inpaint-9ch"), in_channels=9)


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-channel (base checkpoint) SDXL pipeline folder."""
    _needs_worker_extra()
    from tests.helpers.tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl-base-4ch"), in_channels=4)


@pytest.fixture(scope="session")
def checker_flags_all(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _needs_worker_extra()
    from tests.helpers.tiny_sdxl import build_tiny_safety_checker

    return build_tiny_safety_checker(tmp_path_factory.mktemp("checker-all"), flag_everything=True)


@pytest.fixture(scope="session")
def checker_flags_none(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _needs_worker_extra()
    from tests.helpers.tiny_sdxl import build_tiny_safety_checker

    return build_tiny_safety_checker(tmp_path_factory.mktemp("checker-none"), flag_everything=False)
