"""The mask painter against hostile requests, over real HTTP to the painter app served on loopback (with a real
store): cross-site submits, huge and endless bodies, huge prompts, stolen or invented cookies, browsers racing for a
link, and what caches and `Referer` headers could keep. (The flow through the bot is in test_painter.py.)"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.blob import Blob
from services.images import to_data_uri
from services.painter.app import (
    ANOTHER_BROWSER,
    MAX_BODY_BYTES,
    NOT_FROM_PAGE,
    NOT_OPENED_HERE,
    PainterConfig,
    create_painter_app,
)
from services.painter.same_origin import from_own_page, origin_of
from services.painter.tokens import browser_key, new_session_id, sign
from services.requester import Requester
from services.store import Store
from services.store.painter_sessions import PainterSession
from services.text_limits import PROMPT_MAX_CHARS
from tests.helpers.imagegen import box_mask, encode, photo

PUBLIC = "http://painter.example"
FROM_PAGE = {"Origin": PUBLIC}
SECRET = b"painter-test-secret"


class BodyCounter:
    """ASGI middleware counting the request-body bytes the server handed to the app (what it read off the wire)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.received = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                self.received += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


@dataclass
class Painter:
    store: Store
    base: str
    counter: BodyCounter
    submitted: list[tuple[str, str, int]] = field(default_factory=list)

    async def link(self, prompt: str = "a kite") -> tuple[str, PainterSession]:
        """A new link (as this machine reaches it) and its session."""
        who = Requester(guild_id=1, channel_id=2, user_id=3)
        session = await self.store.painter_sessions.create(
            new_session_id(), who=who, image=Blob(encode(photo(64, 48), "PNG"), "image/png"),
            params={"prompt": prompt}, expires_at=time.time() + 600)
        return f"{self.base}/paint/{sign(SECRET, session)}", session

    async def browser_key(self, session: PainterSession) -> str | None:
        found = await self.store.painter_sessions.get(session.id)
        assert found is not None
        return found.browser_key


@asynccontextmanager
async def running_painter(tmp_path: Path, public_url: str = PUBLIC) -> AsyncIterator[Painter]:
    from services.http_server import LoopServer

    store = await Store.open(tmp_path / "painter.db")
    submitted: list[tuple[str, str, int]] = []

    async def on_submit(session: PainterSession, prompt: str, mask: bytes) -> int:
        """A job stored as the bot would, with no backend behind it: what was submitted is what matters here."""
        submitted.append((session.id, prompt, len(mask)))
        job = await store.jobs.create(user_id=session.user_id, input={"prompt": prompt}, backend="none")
        return job.id

    config = PainterConfig(secret=SECRET, sessions=store.painter_sessions, load_image=store.blobs.get,
                           on_submit=on_submit, public_url=public_url)
    counter = BodyCounter(create_painter_app(config))
    server = LoopServer(counter)
    try:
        base = await server.start()
        yield Painter(store, base, counter, submitted)
    finally:
        await server.stop()
        await store.close()


@pytest.fixture
async def painter(tmp_path: Path) -> AsyncIterator[Painter]:
    async with running_painter(tmp_path) as running:
        yield running


def _mask_uri() -> str:
    return to_data_uri(encode(box_mask((64, 48), (8, 8, 40, 40))), "image/png")


@asynccontextmanager
async def _opened(painter: Painter) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    """A link opened in a browser (a client holding its cookie)."""
    url, _ = await painter.link()
    async with httpx.AsyncClient() as client:
        assert (await client.get(url)).status_code == 200
        yield url, client


# --- Origin / Sec-Fetch-Site ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    {},  # no browser page sent this
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Origin": "http://painter.example:8080"},
    {"Origin": "https://painter.example"},
    {"Origin": "http://painter.example.evil.example"},
    {"Origin": PUBLIC, "Sec-Fetch-Site": "cross-site"},
    {"Origin": PUBLIC, "Sec-Fetch-Site": "same-site"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "none"},
])
async def test_a_submit_from_anywhere_but_the_page_is_refused(painter: Painter, headers: dict[str, str],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    async with _opened(painter) as (url, owner):
        refused = await owner.post(f"{url}/submit", headers=headers, json={"prompt": "x", "mask": _mask_uri()})
        assert refused.status_code == 403 and refused.json() == {"error": NOT_FROM_PAGE}
        assert f"submits must come from {PUBLIC} (PAINTER_PUBLIC_URL's origin)" in caplog.text  # the operator sees why
        assert painter.counter.received == 0  # refused before its body was read
        # nothing was used up: the page itself can still submit
        ok = await owner.post(f"{url}/submit", headers=FROM_PAGE, json={"prompt": "x", "mask": _mask_uri()})
        assert ok.status_code == 200 and ok.json() == {"job_id": 1}


@pytest.mark.parametrize("headers", [
    FROM_PAGE,
    {"Origin": "HTTP://Painter.Example:80"},  # the same origin, spelled otherwise
    {"Sec-Fetch-Site": "same-origin"},
    {"Origin": PUBLIC, "Sec-Fetch-Site": "same-origin"},
])
async def test_a_submit_from_the_page_is_accepted(painter: Painter, headers: dict[str, str]) -> None:
    async with _opened(painter) as (url, owner):
        ok = await owner.post(f"{url}/submit", headers=headers, json={"prompt": "a kite", "mask": _mask_uri()})
    assert ok.status_code == 200 and painter.submitted[0][1] == "a kite"


def test_origins_compare_normalised() -> None:
    assert origin_of("https://Bot.Example.com:443/painter/") == "https://bot.example.com"
    assert origin_of("http://bot.example.com:8765") == "http://bot.example.com:8765"
    assert origin_of("http://[2001:DB8::1]:80") == "http://[2001:db8::1]"
    for bad in ("null", "", "ftp://bot.example.com", "http://", "http://x:99999"):
        assert origin_of(bad) == "", bad
    own = origin_of("https://bot.example.com")
    assert from_own_page({"origin": "https://bot.example.com", "sec-fetch-site": "same-origin"}, own)
    assert not from_own_page({"origin": "null"}, "")  # an unset origin matches nothing


# --- the body's size ----------------------------------------------------------------------------------------------


async def _stream(total: int, sent: list[int], chunk: bytes = b" " * (1 << 20)) -> AsyncIterator[bytes]:
    """`total` bytes of JSON whitespace, one (reused) MiB at a time, counting what the client handed over."""
    while sent[0] < total:
        piece = chunk[: total - sent[0]]
        sent[0] += len(piece)
        yield piece


async def test_a_huge_declared_body_is_refused_before_it_is_read(painter: Painter) -> None:
    sent = [0]
    body = 200 << 20
    async with _opened(painter) as (url, owner):
        refused = await owner.post(f"{url}/submit", content=_stream(body, sent),
                                   headers={**FROM_PAGE, "Content-Length": str(body)})
        assert refused.status_code == 413 and "too large" in refused.json()["error"]
        assert painter.counter.received <= 1 << 20  # at most what arrived with the headers
        # the link is still usable
        ok = await owner.post(f"{url}/submit", headers=FROM_PAGE, json={"prompt": "x", "mask": _mask_uri()})
        assert ok.status_code == 200


async def test_an_endless_streamed_body_stops_being_read_at_the_cap(painter: Painter) -> None:
    """200 MiB sent chunked (no length declared): the painter reads up to the cap and no further, and answers 413;
    the rest of the body is read off the connection and dropped as it comes (so the client can read the answer), and
    all the while this process (where the painter runs) holds at most about the cap."""
    sent = [0]
    async with _opened(painter) as (url, owner):
        tracemalloc.start()
        try:
            refused = await owner.post(f"{url}/submit", content=_stream(200 << 20, sent), headers=FROM_PAGE)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert refused.status_code == 413 and "too large" in refused.json()["error"]
    assert MAX_BODY_BYTES < painter.counter.received <= MAX_BODY_BYTES + (1 << 20)  # stopped at the cap
    assert sent[0] == 200 << 20  # the whole body went through the server…
    assert peak < MAX_BODY_BYTES + (16 << 20), f"{peak / 2**20:.0f} MiB traced"  # …and was never held
    assert painter.submitted == []


async def test_the_cap_is_exact(painter: Painter) -> None:
    """A body of exactly `MAX_BODY_BYTES` is read and judged (here: a valid request with padding); one byte more
    is not."""
    request = f'{{"prompt": "a kite", "mask": "{_mask_uri()}"}}'.encode()
    async with _opened(painter) as (url, owner):
        for extra, status in ((1, 413), (0, 200)):
            padded = request + b" " * (MAX_BODY_BYTES - len(request) + extra)
            answer = await owner.post(f"{url}/submit", content=_chunked(padded), headers=FROM_PAGE)
            assert answer.status_code == status, answer.text
    assert [prompt for _, prompt, _ in painter.submitted] == ["a kite"]


async def _chunked(body: bytes) -> AsyncIterator[bytes]:
    """`body` sent chunked (no length declared), so the cap is met while streaming."""
    for start in range(0, len(body), 1 << 20):
        yield body[start:start + (1 << 20)]


# --- the prompt's length ------------------------------------------------------------------------------------------


def test_the_prompt_cap_is_the_inpaint_commands() -> None:
    from cogs import fit

    assert fit.PROMPT == PROMPT_MAX_CHARS == 1000


@pytest.mark.parametrize("length", [PROMPT_MAX_CHARS + 1, 5 << 20])
async def test_a_prompt_over_the_cap_is_refused_and_the_link_kept(painter: Painter, length: int) -> None:
    async with _opened(painter) as (url, owner):
        page = await owner.get(url)
        assert f'maxlength="{PROMPT_MAX_CHARS}"' in page.text
        long = await owner.post(f"{url}/submit", headers=FROM_PAGE, json={"prompt": "é" * length, "mask": _mask_uri()})
        assert long.status_code == 400
        assert long.json()["error"] == f"The prompt is too long: at most 1,000 characters (this one has {length:,})."
        exact = await owner.post(f"{url}/submit", headers=FROM_PAGE,
                                 json={"prompt": "é" * PROMPT_MAX_CHARS, "mask": _mask_uri()})
        assert exact.status_code == 200
    assert [len(prompt) for _, prompt, _ in painter.submitted] == [PROMPT_MAX_CHARS]


# --- who holds a link ---------------------------------------------------------------------------------------------


async def test_only_the_first_browser_ever_claims_a_link(painter: Painter) -> None:
    url, session = await painter.link()
    cookie_name = f"painter_{session.id[:12]}"
    async with httpx.AsyncClient(cookies={cookie_name: "made-up"}) as stranger, httpx.AsyncClient() as owner:
        # an invented cookie claims nothing through the image or the submit, before anyone opened the page
        image = await stranger.get(f"{url}/image")
        assert image.status_code == 403 and image.json() == {"error": NOT_OPENED_HERE}
        submit = await stranger.post(f"{url}/submit", headers=FROM_PAGE, json={"prompt": "x", "mask": _mask_uri()})
        assert submit.status_code == 403 and submit.json() == {"error": NOT_OPENED_HERE}
        assert await painter.browser_key(session) is None and painter.counter.received == 0

        # the first browser to open the page holds the link, with a cookie the server made
        page = await owner.get(url)
        assert page.status_code == 200 and owner.cookies[cookie_name] != "made-up"
        key = await painter.browser_key(session)
        assert key is not None

        # everyone else is refused everything, clearly, and nothing moves the claim
        for answer in (await stranger.get(url), await stranger.get(f"{url}/image"),
                       await stranger.post(f"{url}/submit", headers=FROM_PAGE,
                                           json={"prompt": "x", "mask": _mask_uri()})):
            assert answer.status_code == 403
            assert "opened in another browser" in answer.text
        async with httpx.AsyncClient() as newcomer:  # no cookie at all: also refused, not given a new one
            again = await newcomer.get(url)
            assert again.status_code == 403 and "opened in another browser" in again.text
            assert not newcomer.cookies
        assert await painter.browser_key(session) == key

        # the owner comes back: the page again, with no new cookie
        back = await owner.get(url)
        assert back.status_code == 200 and "set-cookie" not in back.headers
        assert (await owner.get(f"{url}/image")).status_code == 200


async def test_browsers_racing_for_a_link_exactly_one_wins(painter: Painter) -> None:
    url, session = await painter.link()
    clients = [httpx.AsyncClient() for _ in range(6)]
    try:
        answers = await asyncio.gather(*(client.get(url) for client in clients))
        statuses = sorted(answer.status_code for answer in answers)
        assert statuses == [200, 403, 403, 403, 403, 403]
        winner = clients[[answer.status_code for answer in answers].index(200)]
        assert await painter.browser_key(session) == browser_key(winner.cookies[f"painter_{session.id[:12]}"])
        for client, answer in zip(clients, answers, strict=True):
            image = await client.get(f"{url}/image")
            assert image.status_code == (200 if client is winner else 403)
            if client is not winner:
                assert ANOTHER_BROWSER.replace("'", "&#x27;") in answer.text and not client.cookies
    finally:
        for client in clients:
            await client.aclose()

    # in the store itself: of 20 claims at once, exactly one succeeds, and a later one never does
    _, other = await painter.link()
    claims = await asyncio.gather(*(painter.store.painter_sessions.claim_browser(other.id, f"key{i}")
                                    for i in range(20)))
    assert claims.count(True) == 1
    assert not await painter.store.painter_sessions.claim_browser(other.id, "late")
    assert await painter.browser_key(other) == f"key{claims.index(True)}"


# --- caches, referrers, cookies -----------------------------------------------------------------------------------


async def test_no_answer_is_cached_or_leaks_the_link(painter: Painter) -> None:
    async with _opened(painter) as (url, owner), httpx.AsyncClient() as stranger:
        answers = {
            "page": await owner.get(url),
            "image": await owner.get(f"{url}/image"),
            "refused page": await stranger.get(url),
            "refused image": await stranger.get(f"{url}/image"),
            "forged": await owner.get(url[:-4] + "AAAA"),
            "bad submit": await owner.post(f"{url}/submit", headers=FROM_PAGE, content=b"[1, 2"),
            "cross-site submit": await owner.post(f"{url}/submit", json={}),
            "wrong method": await owner.get(f"{url}/submit"),
            "submit": await owner.post(f"{url}/submit", headers=FROM_PAGE, json={"prompt": "x", "mask": _mask_uri()}),
            "used": await owner.get(url),
        }
        static = await owner.get(f"{painter.base}/painter/static/painter.js")
    assert [answers["bad submit"].status_code, answers["submit"].status_code] == [400, 200]
    for name, answer in answers.items():
        assert answer.headers.get("cache-control") == "no-store", name
        assert answer.headers.get("referrer-policy") == "no-referrer", name
        assert answer.headers.get("x-content-type-options") == "nosniff", name
    assert static.status_code == 200 and "no-store" not in static.headers.get("cache-control", "")
    assert static.headers["referrer-policy"] == "no-referrer"


@pytest.mark.parametrize(("public_url", "secure"), [
    ("https://painter.example", True), ("HTTPS://Painter.Example:443", True), ("http://painter.example", False)])
async def test_cookies_are_secure_whenever_the_public_url_is_https(tmp_path: Path, public_url: str,
                                                                   secure: bool) -> None:
    async with running_painter(tmp_path, public_url) as https_painter, httpx.AsyncClient() as browser:
        url, _ = await https_painter.link()
        page = await browser.get(url)
        assert page.status_code == 200
        cookie = page.headers["set-cookie"]
        attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
        assert ("secure" in attributes) is secure
        assert {"httponly", "samesite", "path", "max-age"} <= attributes
        assert "samesite=lax" in cookie.lower() and f"path=/paint/{url.rsplit('/', 1)[1]}".lower() in cookie.lower()
        # and the page's own origin (https) is the one a submit must come from; the cookie is sent back as a
        # browser would over https (this client, on plain http, keeps a Secure cookie to itself)
        submit = await browser.post(f"{url}/submit", json={"prompt": "x", "mask": _mask_uri()},
                                    headers={"Origin": origin_of(public_url), "Cookie": cookie.split(";")[0]})
        assert submit.status_code == 200
