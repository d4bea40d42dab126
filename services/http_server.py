"""An ASGI app served by uvicorn on a task of the current event loop (the embedded worker, the mask painter)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvicorn


class LoopServer:
    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    async def start(self) -> str:
        """Bind, serve, and return the base URL once the app has started (its lifespan included)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self._socket = sock
        self.port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self._server = server
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name=f"http-{self.port}")
        while not server.started:
            if self._task.done():
                self._task.result()  # raises the startup error
                raise RuntimeError(f"the server on port {self.port} stopped during startup")
            await asyncio.sleep(0.02)
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 10)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
        if self._socket is not None:
            self._socket.close()
