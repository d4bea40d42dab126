"""The painter's HTTP app (Starlette, like the worker): the page, the user's image, and submit.

    GET  /paint/{token}          the painter page (binds the link to this browser with a cookie)
    GET  /paint/{token}/image    the user's image (only to the browser holding the link)
    POST /paint/{token}/submit   {"prompt": str, "mask": "data:image/png;base64,…"} → {"job_id": int}
    GET  /painter/static/…       the page's script and style

A link is refused when it is forged (403), opened in a second browser (403), expired (410) or already used
(410). The image is never served to anyone else.
"""

from __future__ import annotations

import html
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from services.blob import Blob
from services.errors import UserError
from services.images import ImageInputError, parse_data_uri
from services.painter.tokens import browser_key, session_id_of, verify
from services.refusals import Refused
from services.store.painter_sessions import PainterSession, PainterSessions

STATIC = Path(__file__).parent / "static"
MAX_MASK_BYTES = 20 * 1024 * 1024

#: Given the session, the prompt and the painted mask (PNG bytes): create and start the job, return its id.
SubmitHandler = Callable[[PainterSession, str, bytes], Awaitable[int]]


@dataclass
class PainterConfig:
    secret: bytes
    sessions: PainterSessions
    load_image: Callable[[str], Awaitable[Blob | None]]
    on_submit: SubmitHandler
    secure_cookies: bool = False
    clock: Callable[[], float] = time.time


class LinkRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Painter:
    """The painter's request handlers, sharing its configuration and page template."""

    def __init__(self, config: PainterConfig) -> None:
        self.config = config
        self.template = (STATIC / "painter.html").read_text(encoding="utf-8")  # read once, not per request

    async def session_for(self, request: Request, *, claim: bool) -> tuple[PainterSession, str | None]:
        """The session behind a link, checked; with `claim`, the first browser to open it takes it."""
        config = self.config
        token = request.path_params["token"]
        session = await config.sessions.get(session_id_of(token))
        if not verify(config.secret, token, session):
            raise LinkRefused(403, "This link isn't valid.")
        assert session is not None
        if session.used_at is not None:
            raise LinkRefused(410, "This link was already used: run /inpaint again for a new one.")
        if config.clock() > session.expires_at:
            raise LinkRefused(410, "This link has expired: run /inpaint again for a new one.")
        cookie_name = _cookie_name(session)
        cookie = request.cookies.get(cookie_name)
        new_cookie = None
        if cookie is None and claim and session.browser_key is None:
            new_cookie = secrets.token_urlsafe(24)
            cookie = new_cookie
        if cookie is None or not await config.sessions.claim_browser(session.id, browser_key(cookie)):
            raise LinkRefused(403, "This link was opened in another browser: links are personal.")
        return session, new_cookie

    async def page(self, request: Request) -> Response:
        try:
            session, new_cookie = await self.session_for(request, claim=True)
        except LinkRefused as exc:
            return _error_page(exc)
        token = request.path_params["token"]
        body = self.template
        for key, value in {"TOKEN": token, "PROMPT": str(session.params.get("prompt", "")),
                           "EXPIRES": str(int(session.expires_at))}.items():
            body = body.replace("{{" + key + "}}", html.escape(value, quote=True))
        response = HTMLResponse(body, headers=_security_headers())
        if new_cookie is not None:
            response.set_cookie(_cookie_name(session), new_cookie,
                                max_age=int(session.expires_at - self.config.clock()), httponly=True,
                                samesite="strict", secure=self.config.secure_cookies, path=f"/paint/{token}")
        return response

    async def image(self, request: Request) -> Response:
        try:
            session, _ = await self.session_for(request, claim=False)
        except LinkRefused as exc:
            return JSONResponse({"error": exc.message}, exc.status)
        blob = await self.config.load_image(session.image_sha256)
        if blob is None:
            return JSONResponse({"error": "The image is gone."}, 410)
        return Response(blob.data, media_type=blob.content_type,
                        headers={"Cache-Control": "private, no-store", **_security_headers()})

    async def submit(self, request: Request) -> Response:
        try:
            session, _ = await self.session_for(request, claim=False)
            job_id = await self._submit(session, await request.body())
        except LinkRefused as exc:
            return JSONResponse({"error": exc.message}, exc.status)
        except (UserError, ImageInputError) as exc:
            return JSONResponse({"error": exc.message}, 400)
        except Refused as exc:
            return JSONResponse({"error": exc.reason.plain()}, 400)
        except (ValueError, AttributeError):
            return JSONResponse({"error": "That request isn't what this page sends."}, 400)
        await self.config.sessions.set_job(session.id, job_id)
        return JSONResponse({"job_id": job_id})

    async def _submit(self, session: PainterSession, raw: bytes) -> int:
        """Use the link up (atomically: one submit wins) and start the job; a refusal the user can fix (e.g. an
        empty mask) leaves the link usable."""
        config = self.config
        body = json.loads(raw)
        prompt = str(body.get("prompt", "")).strip()
        if not prompt:
            raise UserError("Write a prompt: what should appear in the painted area?")
        mask = parse_data_uri(str(body.get("mask", "")), max_bytes=MAX_MASK_BYTES)
        if not await config.sessions.consume(session.id, config.clock()):
            raise LinkRefused(410, "This link was already used: run /inpaint again for a new one.")
        try:
            return await config.on_submit(session, prompt, mask)
        except (UserError, ImageInputError, Refused):
            await config.sessions.release(session.id)
            raise


def create_painter_app(config: PainterConfig) -> Starlette:
    painter = _Painter(config)
    routes = [
        Route("/paint/{token}", painter.page, methods=["GET"]),
        Route("/paint/{token}/image", painter.image, methods=["GET"]),
        Route("/paint/{token}/submit", painter.submit, methods=["POST"]),
        Mount("/painter/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes)


def _cookie_name(session: PainterSession) -> str:
    return f"painter_{session.id[:12]}"


def _security_headers() -> dict[str, str]:
    return {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                                       "script-src 'self'; connect-src 'self'"}


def _error_page(exc: LinkRefused) -> HTMLResponse:
    text = html.escape(exc.message)
    return HTMLResponse(f"<!doctype html><meta charset=utf-8><title>Mask painter</title>"
                        f"<link rel=stylesheet href=/painter/static/painter.css>"
                        f"<main class=refused><h1>Mask painter</h1><p id=error>{text}</p></main>", exc.status,
                        headers=_security_headers())
