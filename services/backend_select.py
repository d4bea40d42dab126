"""Which backend the bot talks to: hosted fal (FAL_KEY), our worker (WORKER_URL), or — with neither — the worker
app started inside the bot's own process on 127.0.0.1 (still over HTTP, so there is one code path)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydantic import SecretStr

from services.config import BotConfig
from services.http_server import LoopServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendChoice:
    name: str  # "fal", "worker" or "embedded"
    base_url: str | None  # None for "embedded" until it has started
    key: SecretStr | None
    safety_checker: bool = True


def choose_backend(config: BotConfig) -> BackendChoice:
    if config.fal_key is not None:
        return BackendChoice("fal", config.fal_queue_base, config.fal_key)
    if config.worker_url:
        return BackendChoice("worker", config.worker_url, config.worker_key)
    return BackendChoice("embedded", None, None, safety_checker=False)


class EmbeddedWorker:
    """The worker app served on the bot's own event loop, bound to 127.0.0.1 (`async with`, or start/stop)."""

    def __init__(self) -> None:
        self._server: LoopServer | None = None
        self.base_url = ""
        self.description = ""

    async def start(self) -> str:
        from services.worker.app import create_app
        from services.worker.config import WorkerConfig

        config = WorkerConfig()
        if config.model_path is None:
            config = config.model_copy(update={"pipeline": "classic"})
        config = config.model_copy(update={"worker_key": None, "host": "127.0.0.1"})
        self._server = LoopServer(create_app(config))
        self.base_url = await self._server.start()
        self.description = f"{config.pipeline} pipeline" + (f" ({config.model_path})" if config.model_path else "")
        log.warning("NO BACKEND CONFIGURED (neither FAL_KEY nor WORKER_URL): running the worker inside the bot at "
                    "%s with the %s. Set FAL_KEY or WORKER_URL for SDXL.", self.base_url, self.description)
        return self.base_url

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()

    async def __aenter__(self) -> str:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
