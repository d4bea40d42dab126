"""A request body read as it streams in, up to a cap: past the cap reading stops (nothing more is buffered) and
the caller answers 413. A declared `Content-Length` over the cap is refused before a byte of the body is read."""

from __future__ import annotations

from starlette.requests import Request


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over {limit} bytes")
        self.limit = limit


async def read_capped(request: Request, limit: int) -> bytearray:
    """The whole body, or `BodyTooLarge` as soon as it is known to exceed `limit` bytes (at most `limit` bytes plus
    one chunk of the server's are ever held). Raises starlette's `ClientDisconnect` if the client goes away."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise BodyTooLarge(limit)
        body += chunk
    return body
