"""A raw HTTP/1.1 server on 127.0.0.1 whose every answer is written by hand, byte for byte: how the URL fetching
tests get servers that redirect, trickle, declare a huge `Content-Length` or lie about it. It records each request
line it was sent, so a test can assert that a server was never contacted."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

#: (request path, writer) → writes a whole answer (or some of one) and returns
Answer = Callable[[str, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawServer:
    answer: Answer
    requests: list[str] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            line = (await reader.readline()).decode("latin-1").strip()
            while (await reader.readline()).strip():
                pass
            if not line:
                return
            self.requests.append(line)
            await self.answer(line.split(" ")[1], writer)
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)


def head(status: str, headers: dict[str, str]) -> bytes:
    """A status line and headers, ending with the blank line."""
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items()), "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


def body_answer(body: bytes, content_type: str = "image/png") -> Answer:
    async def answer(path: str, writer: asyncio.StreamWriter) -> None:
        writer.write(head("200 OK", {"Content-Type": content_type, "Content-Length": str(len(body))}) + body)
    return answer


def redirect_answer(location: str, status: str = "302 Found") -> Answer:
    async def answer(path: str, writer: asyncio.StreamWriter) -> None:
        writer.write(head(status, {"Location": location, "Content-Length": "0"}))
    return answer
