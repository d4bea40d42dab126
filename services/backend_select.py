"""Which backend the bot talks to: hosted fal (FAL_KEY), our worker (WORKER_URL), or — with neither — the worker
app started inside the bot's own process on 127.0.0.1 (still over HTTP, so there is one code path)."""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

from pydantic import SecretStr

from services.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendChoice:
    name: str  # "fal", "worker" or "embedded"
    base_url: str | None  # None for "embedded" until it has started
    key: SecretStr | None
    safety_checker: bool = True


def choose_backend(settings: Settings) -> BackendChoice:
    if settings.fal_key is not None:
        return BackendChoice("fal", settings.fal_queue_base, settings.fal_key)
    if settings.worker_url:
        return BackendChoice("worker", settings.worker_url, settings.worker_key)
    return BackendChoice("embedded", None, None, safety_checker=False)


class EmbeddedWorker:
    """The worker app served by uvicorn on a task of the bot's own event loop, bound to 127.0.0.1."""

    def __init__(self) -> None:
        self._server: object | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None
        self.base_url = ""
        self.description = ""

    async def start(self) -> str:
        import uvicorn

        from services.worker.app import create_app
        from services.worker.settings import WorkerSettings

        worker_settings = WorkerSettings()
        if worker_settings.model_path is None:
            worker_settings = worker_settings.model_copy(update={"pipeline": "classic"})
        worker_settings = worker_settings.model_copy(update={"worker_key": None, "host": "127.0.0.1"})
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self._socket = sock
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(worker_settings), log_level="warning", lifespan="on"))
        self._server = server
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name="embedded-worker")
        while not server.started:
            if self._task.done():
                self._task.result()  # raises the startup error
                raise RuntimeError("the embedded worker stopped during startup")
            await asyncio.sleep(0.02)
        self.base_url = f"http://127.0.0.1:{port}"
        self.description = f"{worker_settings.pipeline} pipeline" + (
            f" ({worker_settings.model_path})" if worker_settings.model_path else "")
        log.warning("NO BACKEND CONFIGURED (neither FAL_KEY nor WORKER_URL): running the worker inside the bot at "
                    "%s with the %s. Set FAL_KEY or WORKER_URL for SDXL.", self.base_url, self.description)
        return self.base_url

    async def stop(self) -> None:
        server = self._server
        if server is not None:
            server.should_exit = True  # type: ignore[attr-defined]
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 10)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
        if self._socket is not None:
            self._socket.close()
