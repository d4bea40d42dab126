"""Run the worker app for real: uvicorn on 127.0.0.1 in a thread of its own, as a separate server would."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from starlette.applications import Starlette


@asynccontextmanager
async def serve(app: Starlette, *, startup_timeout: float = 120.0) -> AsyncIterator[str]:
    """Start `app` (running its lifespan: model load and warm-up) and yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"worker-{port}")
    thread.start()

    def wait_started() -> None:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the worker failed to start (see its log)")
            if time.monotonic() > deadline:
                raise TimeoutError("the worker did not start in time")
            time.sleep(0.01)

    await asyncio.to_thread(wait_started)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.to_thread(thread.join, 15)
        sock.close()
