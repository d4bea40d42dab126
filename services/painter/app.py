"""The painter's HTTP app (Starlette, like the worker): the page, the user's image, and submit.

    GET  /paint/{token}          the painter page (the first browser ever to open it holds the link, by cookie)
    GET  /paint/{token}/image    the user's image (only to the browser holding the link)
    POST /paint/{token}/submit   {"prompt": str, "mask": "data:image/png;base64,…"} → {"job_id": int}
    GET  /painter/static/…       the page's script and style

A link is refused when it is forged (403), opened in a second browser (403), expired (410) or already used
(410). The image is never served to anyone else. A submit must come from the painter's own page (its `Origin`,
403 otherwise), its body is read as it streams in and refused past `MAX_BODY_BYTES` (413), and its prompt is at
most `PROMPT_MAX_CHARS` long. No answer is cached or sends a `Referer` (see `headers`).
"""

from __future__ import annotations

import hmac
import html
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from services.blob import Blob
from services.errors import UserError
from services.images import ImageInputError, parse_data_uri
from services.painter.headers import STATIC_PREFIX, PainterHeaders
from services.painter.request_body import BodyTooLarge, read_capped
from services.painter.same_origin import from_own_page, origin_of
from services.painter.tokens import browser_key, session_id_of, verify
from services.refusals import Refused
from services.store.painter_sessions import PainterSession, PainterSessions
from services.text_limits import PROMPT_MAX_CHARS

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_MASK_BYTES = 20 * 1024 * 1024
_DATA_URI_PREFIX = len("data:image/png;base64,")
#: A submit's body: the largest mask as a base64 data URI, and room for the prompt (JSON-escaped) and the keys.
MAX_BODY_BYTES = (MAX_MASK_BYTES + 2) // 3 * 4 + _DATA_URI_PREFIX + 64 * 1024

#: Given the session, the prompt and the painted mask (PNG bytes): create and start the job, return its id.
SubmitHandler = Callable[[PainterSession, str, bytes], Awaitable[int]]


@dataclass
class PainterConfig:
    secret: bytes
    sessions: PainterSessions
    load_image: Callable[[str], Awaitable[Blob | None]]
    on_submit: SubmitHandler
    #: the address users reach the painter at (`PAINTER_PUBLIC_URL`): submits must come from its origin, and its
    #: cookies are `Secure` whenever it is https
    public_url: str
    clock: Callable[[], float] = time.time


class SubmitBody(BaseModel):
    """What the page posts (`painter.js`)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    mask: str = ""


class LinkRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


ANOTHER_BROWSER = "This link was opened in another browser: links are personal. Run /inpaint again for your own."
NOT_OPENED_HERE = "This link wasn't opened in this browser: open it from Discord first."
NOT_FROM_PAGE = "This request didn't come from the painter page: submit from the page the link opens."


class _Painter:
    """The painter's request handlers, sharing its configuration and page template."""

    def __init__(self, config: PainterConfig) -> None:
        self.config = config
        self.origin = origin_of(config.public_url)
        self.secure_cookies = urlsplit(config.public_url).scheme.lower() == "https"
        self.template = (STATIC / "painter.html").read_text(encoding="utf-8")  # read once, not per request

    async def valid_session(self, request: Request) -> PainterSession:
        """The session behind a link: genuine, unused and unexpired (or `LinkRefused`)."""
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
        return session

    def holds(self, request: Request, session: PainterSession) -> bool:
        """Whether this browser's cookie is the one that claimed the link (constant-time comparison)."""
        cookie = request.cookies.get(_cookie_name(session))
        return (cookie is not None and session.browser_key is not None
                and hmac.compare_digest(browser_key(cookie), session.browser_key))

    async def held_session(self, request: Request) -> PainterSession:
        """The session, for the browser that holds it only: `/image` and `/submit` never claim a link."""
        session = await self.valid_session(request)
        if not self.holds(request, session):
            raise LinkRefused(403, NOT_OPENED_HERE if session.browser_key is None else ANOTHER_BROWSER)
        return session

    async def page(self, request: Request) -> Response:
        """The page. The first browser ever to open the link claims it (atomically, in the store) with a cookie
        made here; any other browser, then or later, is refused."""
        try:
            session = await self.valid_session(request)
            new_cookie = None
            if not self.holds(request, session):
                new_cookie = secrets.token_urlsafe(24)
                if session.browser_key is not None or \
                        not await self.config.sessions.claim_browser(session.id, browser_key(new_cookie)):
                    raise LinkRefused(403, ANOTHER_BROWSER)
        except LinkRefused as exc:
            return _error_page(exc)
        token = request.path_params["token"]
        body = self.template
        for key, value in {"TOKEN": token, "PROMPT": str(session.params.get("prompt", "")),
                           "EXPIRES": str(int(session.expires_at)), "PROMPT_MAX": str(PROMPT_MAX_CHARS)}.items():
            body = body.replace("{{" + key + "}}", html.escape(value, quote=True))
        response = HTMLResponse(body)
        if new_cookie is not None:
            # Lax, not Strict: reopening the link from Discord in a browser tab is a cross-site navigation, which
            # carries Lax cookies only; a cross-site POST carries none (and is refused by its Origin anyway).
            response.set_cookie(_cookie_name(session), new_cookie,
                                max_age=max(1, int(session.expires_at - self.config.clock())), httponly=True,
                                samesite="lax", secure=self.secure_cookies, path=f"/paint/{token}")
        return response

    async def image(self, request: Request) -> Response:
        try:
            session = await self.held_session(request)
        except LinkRefused as exc:
            return JSONResponse({"error": exc.message}, exc.status)
        blob = await self.config.load_image(session.image_sha256)
        if blob is None:
            return JSONResponse({"error": "The image is gone."}, 410)
        return Response(blob.data, media_type=blob.content_type)

    async def submit(self, request: Request) -> Response:
        try:
            if not from_own_page(request.headers, self.origin):
                # (an operator whose users reach the painter at another address than PAINTER_PUBLIC_URL sees why)
                log.warning("painter submit refused: Origin %.100r, Sec-Fetch-Site %.40r; submits must come from "
                            "%s (PAINTER_PUBLIC_URL's origin)", request.headers.get("origin"),
                            request.headers.get("sec-fetch-site"), self.origin)
                raise LinkRefused(403, NOT_FROM_PAGE)
            session = await self.held_session(request)
            raw = await read_capped(request, MAX_BODY_BYTES)
            job_id = await self._submit(session, SubmitBody.model_validate_json(raw))
        except LinkRefused as exc:
            return JSONResponse({"error": exc.message}, exc.status)
        except BodyTooLarge:
            # The connection stays open: uvicorn reads and discards whatever of the body still comes (holding none
            # of it), so the client gets this answer; closing at once would reset the connection and lose it.
            return JSONResponse({"error": f"That mask is too large: at most {MAX_MASK_BYTES // 2**20} MiB."}, 413)
        except (UserError, ImageInputError) as exc:
            return JSONResponse({"error": exc.message}, 400)
        except Refused as exc:
            return JSONResponse({"error": exc.reason.plain()}, 400)
        except (ValidationError, ClientDisconnect):
            return JSONResponse({"error": "That request isn't what this page sends."}, 400)
        await self.config.sessions.set_job(session.id, job_id)
        return JSONResponse({"job_id": job_id})

    async def _submit(self, session: PainterSession, body: SubmitBody) -> int:
        """Use the link up (atomically: one submit wins) and start the job; a refusal the user can fix (e.g. an
        empty mask, a prompt too long) leaves the link usable."""
        config = self.config
        prompt = body.prompt.strip()
        if not prompt:
            raise UserError("Write a prompt: what should appear in the painted area?")
        if len(prompt) > PROMPT_MAX_CHARS:
            raise UserError(f"The prompt is too long: at most {PROMPT_MAX_CHARS:,} characters "
                            f"(this one has {len(prompt):,}).")
        mask = parse_data_uri(body.mask, max_bytes=MAX_MASK_BYTES)
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
        Mount(STATIC_PREFIX.rstrip("/"), StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(PainterHeaders)])


def _cookie_name(session: PainterSession) -> str:
    return f"painter_{session.id[:12]}"


def _error_page(exc: LinkRefused) -> HTMLResponse:
    text = html.escape(exc.message)
    return HTMLResponse(f"<!doctype html><meta charset=utf-8><title>Mask painter</title>"
                        f"<link rel=stylesheet href=/painter/static/painter.css>"
                        f"<main class=refused><h1>Mask painter</h1><p id=error>{text}</p></main>", exc.status)
