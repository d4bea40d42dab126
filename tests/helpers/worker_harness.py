"""Run the worker app for real: uvicorn on 127.0.0.1 in a thread of its own, as a separate server would."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import uvicorn
from starlette.applications import Starlette


@contextmanager
def serve_sync(app: Starlette, *, startup_timeout: float = 120.0) -> Iterator[str]:
    """Start `app` (running its lifespan: model load and warm-up) and yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"worker-{port}")
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the worker failed to start (see its log)")
            if time.monotonic() > deadline:
                raise TimeoutError("the worker did not start in time")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@asynccontextmanager
async def serve(app: Starlette, *, startup_timeout: float = 120.0) -> AsyncIterator[str]:
    """`serve_sync` for async tests: starting and stopping happen off the event loop."""
    manager = serve_sync(app, startup_timeout=startup_timeout)
    base = await asyncio.to_thread(manager.__enter__)
    try:
        yield base
    finally:
        await asyncio.to_thread(manager.__exit__, None, None, None)
