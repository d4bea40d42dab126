"""The mask painter as a service: personal links offered when /inpaint has no mask, the web server that serves
the painter page, and a submitted mask turned into a job through the launcher like any other."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import urlsplit

from services.errors import StartupError
from services.http_server import LoopServer
from services.images import IntakeLimits, PreparedInputs, normalized_image, sniff_format
from services.launch import Launched, Launcher, NewImages, prepare_stored
from services.painter.app import PainterConfig, create_painter_app
from services.painter.tokens import new_session_id, sign
from services.requester import Requester
from services.store import Store
from services.store.painter_sessions import PainterSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PainterLink:
    url: str
    ttl_s: int


class PainterNotReachable(RuntimeError):
    """Links would point at an address Discord users can't open (no PAINTER_PUBLIC_URL, or a loopback one)."""


def reachable_by_users(url: str) -> bool:
    """Whether a link to `url` can open on someone else's device: not localhost, a loopback or an unspecified
    (0.0.0.0) address, in any of the forms browsers accept (127.1, 2130706433, ::ffff:127.0.0.1, a trailing dot)."""
    host = (urlsplit(url).hostname or "").lower().rstrip(".")
    if not host or host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:  # the shorthand IPv4 forms (127.1, a single number) that ip_address refuses but browsers accept
            address = ipaddress.ip_address(socket.inet_aton(host))
        except OSError:
            return True  # a name: whoever set it means users to reach it
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not (address.is_loopback or address.is_unspecified)


class PainterLinks:
    """`async with PainterLinks(...) as painter:` serves the painter page until the block ends."""

    def __init__(self, store: Store, launcher: Launcher, limits: IntakeLimits, *, host: str, port: int,
                 public_url: str | None, secret: str | None, ttl_s: int) -> None:
        self.store = store
        self.launcher = launcher
        self.limits = limits
        self.host, self.port = host, port
        self.public_url = (public_url or "").rstrip("/")
        if self.public_url and urlsplit(self.public_url).scheme not in ("http", "https"):
            raise StartupError(f"PAINTER_PUBLIC_URL must start with https:// or http:// (it is {self.public_url!r})")
        #: whether links can be offered: PAINTER_PUBLIC_URL set to an address users can open
        self.reachable = reachable_by_users(self.public_url)
        self.local_url = ""
        self.secret = (secret or secrets.token_hex(32)).encode()
        self.ttl_s = ttl_s
        self.clock: Callable[[], float] = time.time
        self._server: LoopServer | None = None

    async def __aenter__(self) -> Self:
        if not self.reachable:  # no links to offer: no page to serve (and no port to hold)
            log.warning("PAINTER_PUBLIC_URL is %s: painter links wouldn't open for Discord users, so the bot offers "
                        "none (it lists the other ways to make a mask). Set PAINTER_PUBLIC_URL to the address users "
                        "reach the painter at (see the README).",
                        repr(self.public_url) if self.public_url else "not set")
            return self
        config = PainterConfig(secret=self.secret, sessions=self.store.painter_sessions,
                               load_image=self.store.blobs.get, on_submit=self.submit,
                               public_url=self.public_url, clock=lambda: self.clock())
        self._server = LoopServer(create_painter_app(config), host=self.host, port=self.port)
        try:
            self.local_url = await self._server.start()
        except OSError as exc:
            raise StartupError(f"the mask painter can't listen on {self.host}:{self.port}: {exc.strerror or exc} "
                               "(set PAINTER_PORT to a free port, or PAINTER_ENABLED=false)") from exc
        log.info("mask painter listening on %s (links point at %s)", self.local_url, self.public_url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            await self._server.stop()

    async def offer(self, who: Requester, image_bytes: bytes, options: dict[str, Any], *,
                    parent_job_id: int | None = None) -> PainterLink:
        """A personal, single-use link to paint the mask of this image; the job gets `options` and the prompt
        typed on the page (and is a child of `parent_job_id`: Vary Region on a result). Raises
        `PainterNotReachable` when users couldn't open it (check `reachable` first)."""
        if not self.reachable:
            raise PainterNotReachable(self.public_url)
        _, blob = await asyncio.to_thread(normalized_image, image_bytes, self.limits)
        session = await self.store.painter_sessions.create(new_session_id(), who=who, image=blob, params=options,
                                                           expires_at=self.clock() + self.ttl_s,
                                                           parent_job_id=parent_job_id,
                                                           source_format=sniff_format(image_bytes))
        return PainterLink(f"{self.public_url}/paint/{sign(self.secret, session)}", self.ttl_s)

    async def submit(self, session: PainterSession, prompt: str, mask: bytes) -> int:
        """A painted mask arrived: start the job in its channel; returns the job id (or raises `Refused`)."""

        async def prepare() -> PreparedInputs:
            return await prepare_stored(self.store, self.limits, session.image_sha256, mask,
                                        source_format=session.source_format)

        outcome = await self.launcher.launch(session.requester, {**session.params, "prompt": prompt},
                                             NewImages(prepare, may_draft=False, parent_id=session.parent_job_id))
        assert isinstance(outcome, Launched)
        await self.store.jobs.add_event(outcome.job.id, "note", "mask painted in the web painter")
        return outcome.job.id
