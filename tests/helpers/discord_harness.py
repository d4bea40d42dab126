"""A small in-memory Discord for driving the real bot through discord.py's own interaction handling.

discord.py runs unchanged: command tree, transformers, checks, views, dynamic items, modals. Only its network
layer is replaced: `HTTPClient.request` (REST), `HTTPClient.get_from_cdn` (attachment downloads) and
`AsyncWebhookAdapter.request` (interaction responses and follow-ups) are answered by `FakeDiscord`, which keeps
the channels' messages, interaction responses and uploaded files. The bot logs in with `bot.login()` (which runs
the real `setup_hook`); interactions are fed to `ConnectionState.parse_interaction_create`.

Every private discord.py name used here is listed in `PRIVATE_NAMES` (tests check they still exist).
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import itertools
import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import discord
from discord.http import HTTPClient, Route
from discord.webhook.async_ import AsyncWebhookAdapter
from multidict import CIMultiDict

from tests.helpers.waits import wait_until

#: (object, attribute) pairs this harness patches or calls that are not public discord.py API.
PRIVATE_NAMES: tuple[tuple[object, str], ...] = (
    (HTTPClient, "request"),
    (HTTPClient, "get_from_cdn"),
    (AsyncWebhookAdapter, "request"),
    (discord.state.ConnectionState, "parse_interaction_create"),
    (discord.Client, "_connection"),
    (discord.state.ConnectionState, "_add_guild_from_data"),
)

CDN = "https://cdn.discordapp.com"
ALL_PERMISSIONS = discord.Permissions.all().value
MEMBER_PERMISSIONS = (discord.Permissions.text() | discord.Permissions(view_channel=True)).value & ~(
    discord.Permissions(manage_messages=True).value)


@dataclass
class FakeMessage:
    id: int
    channel_id: int
    author_id: int
    content: str = ""
    embeds: list[dict[str, Any]] = field(default_factory=list)
    components: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    flags: int = 0
    deleted: bool = False
    edits: int = 0
    interaction_token: str | None = None
    created_at: float = field(default_factory=time.time)  # when the bot created it (wall clock)
    nonce: str | None = None  # as sent; with enforce_nonce, a repeat within NONCE_WINDOW_S returns this message

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & 64)

    def custom_ids(self) -> list[str]:
        return [c["custom_id"] for row in self.components for c in row.get("components", []) if "custom_id" in c]

    def field(self, name: str) -> str | None:
        for embed in self.embeds:
            for f in embed.get("fields", []):
                if f["name"] == name:
                    return str(f["value"])
        return None


@dataclass
class InteractionRecord:
    """One interaction we sent, and everything the bot answered to it."""

    id: int
    token: str
    responses: list[dict[str, Any]] = field(default_factory=list)  # raw callback bodies (type + data)
    followups: list[FakeMessage] = field(default_factory=list)
    original: FakeMessage | None = None
    #: for a button press: the message the button is on (what "@original" means after a deferred update)
    source: FakeMessage | None = None
    source_edits: int = 0  # the source message's edits before the press
    sent_at: float = field(default_factory=time.monotonic)  # when Discord delivered it to the bot
    answered_at: float | None = None  # when the bot's first answer (a response or a defer) arrived

    def texts(self) -> list[str]:
        """Every text the user saw in reply (callback messages, the edited original, follow-ups)."""
        out = [r.get("data", {}).get("content") or "" for r in self.responses if r["type"] in (4, 7)]
        if self.original is not None:
            out.append(self.original.content)
        out += [m.content for m in self.followups]
        return [t for t in out if t]

    @property
    def modal(self) -> dict[str, Any] | None:
        for r in self.responses:
            if r["type"] == 9:
                data: dict[str, Any] = r["data"]
                return data
        return None


class _Response:
    """Stands in for aiohttp's response in discord.py's HTTP exceptions (they read status and reason)."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason


def _http_error(status: int, message: str, code: int = 0) -> discord.HTTPException:
    response: Any = _Response(status, message)
    cls = discord.NotFound if status == 404 else discord.HTTPException
    return cls(response, {"message": message, "code": code})


#: Discord's window for the first answer to an interaction, and how long its token works for follow-ups and edits
ANSWER_WINDOW_S = 3.0
TOKEN_LIFETIME_S = 15 * 60
#: how long Discord remembers a message's nonce for `enforce_nonce` ("the past few minutes"; taken as 2 here)
NONCE_WINDOW_S = 120.0


class FakeDiscord:
    def __init__(self, *, app_id: int = 900_000_000_000_000_001) -> None:
        self.app_id = app_id
        self.bot_user = {"id": str(app_id), "username": "inpaint", "discriminator": "0", "global_name": None,
                         "avatar": None, "bot": True}
        self._ids = itertools.count(1_100_000_000_000_000_000)
        self.messages: dict[int, FakeMessage] = {}
        self.interactions: dict[str, InteractionRecord] = {}
        self.cdn: dict[str, tuple[bytes, str]] = {}
        self.commands: dict[int | None, list[dict[str, Any]]] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail_routes: dict[str, int] = {}  # "METHOD path-regex" → HTTP status to answer with
        self.on_create: Callable[[FakeMessage], None] | None = None  # called for every message the bot creates
        #: Discord's per-channel budget for message operations (posts, edits, deletes in one channel share it):
        #: (operations, seconds). None: unlimited. Past it, the answer is a 429 with Retry-After, as Discord's.
        self.channel_budget: tuple[int, float] | None = None
        #: the driver fails an interaction the bot answers later than this (our target; Discord's is 3 s)
        self.answer_deadline_s = 1.0
        self.rate_limited: list[tuple[str, str]] = []  # every 429 served: (method, path)
        self.channel_log: list[tuple[float, str, str]] = []  # every budgeted operation: (when, method, path)
        self._channel_ops: dict[int, list[float]] = {}
        self.session = _FakeSession(self)
        #: permissions the bot is denied per channel (by a channel overwrite): in interactions' `app_permissions`
        #: and in the bot's own member's view of the channel
        self.bot_denied: dict[int, int] = {}

    def deny(self, bot: discord.Client, guild_id: int, channel_id: int, permissions: discord.Permissions) -> None:
        """Deny the bot `permissions` in a channel, as a server manager's channel overwrite would."""
        self.bot_denied[channel_id] = self.bot_denied.get(channel_id, 0) | permissions.value
        add_guild(bot, guild_id, {channel_id: False}, denied=self.bot_denied, rebuild=True)

    def app_permissions(self, channel_id: int) -> int:
        return ALL_PERMISSIONS & ~self.bot_denied.get(channel_id, 0)

    def age_interactions(self, seconds: float) -> None:
        """Let `seconds` pass for every interaction so far (their tokens expire after 15 minutes)."""
        for record in self.interactions.values():
            record.sent_at -= seconds

    def snowflake(self) -> int:
        return next(self._ids)

    # --- installing ---------------------------------------------------------------------------------

    @contextmanager
    def installed(self) -> Iterator[FakeDiscord]:
        """discord.py runs as is down to its aiohttp session: `HTTPClient.request` itself (rate-limit buckets,
        429 retries, error mapping) talks to `session`, which answers from this fake Discord."""
        fake = self
        real_request = HTTPClient.request

        async def http_request(http: HTTPClient, route: Route, *, files: Any = None, form: Any = None,
                               **kwargs: Any) -> Any:
            session = getattr(http, "_HTTPClient__session", None)
            if session is not fake.session:
                if session is not None and hasattr(session, "close"):
                    await session.close()  # the real aiohttp session login opened: never used
                http._HTTPClient__session = fake.session  # type: ignore[attr-defined]
            parts = _REQUEST.set((route, form, files))
            try:
                return await real_request(http, route, files=files, form=form, **kwargs)
            finally:
                _REQUEST.reset(parts)

        async def get_from_cdn(_http: HTTPClient, url: str) -> bytes:
            return fake._cdn_get(url)

        async def webhook_request(_adapter: AsyncWebhookAdapter, route: Route, session: Any = None, *,
                                  payload: Any = None, multipart: Any = None, files: Any = None,
                                  params: Any = None, **_: Any) -> Any:
            return await fake._webhook(route, payload=payload, multipart=multipart, files=files, params=params)

        saved = (HTTPClient.request, HTTPClient.get_from_cdn, AsyncWebhookAdapter.request)
        HTTPClient.request = http_request  # type: ignore[method-assign,assignment]
        HTTPClient.get_from_cdn = get_from_cdn  # type: ignore[method-assign,assignment]
        AsyncWebhookAdapter.request = webhook_request  # type: ignore[method-assign,assignment]
        try:
            yield self
        finally:
            HTTPClient.request, HTTPClient.get_from_cdn, AsyncWebhookAdapter.request = saved  # type: ignore[method-assign]

    # --- REST ---------------------------------------------------------------------------------------

    def _maybe_fail(self, method: str, path: str) -> None:
        for pattern, status in self.fail_routes.items():
            m, _, rx = pattern.partition(" ")
            if m == method and re.fullmatch(rx, path):
                raise _http_error(status, "injected")

    async def _rest(self, route: Route, *, files: Any, form: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0)
        method, path = route.method, urlsplit(route.url).path.removeprefix("/api/v10")
        self.calls.append((method, path))
        self._maybe_fail(method, path)
        if (method, path) == ("GET", "/users/@me"):
            return self.bot_user
        if (method, path) == ("GET", "/oauth2/applications/@me"):
            return {"id": str(self.app_id), "name": "inpaint", "icon": None, "description": "", "rpc_origins": [],
                    "bot_public": True, "bot_require_code_grant": False, "owner": self.bot_user, "summary": "",
                    "verify_key": "0" * 64, "team": None, "flags": 0, "interactions_endpoint_url": None}
        m = re.fullmatch(r"/applications/\d+(?:/guilds/(\d+))?/commands", path)
        if m and method == "PUT":
            guild = int(m.group(1)) if m.group(1) else None
            body = kwargs.get("json") or []
            stored = [{**c, "id": str(self.snowflake()), "application_id": str(self.app_id), "version": "1",
                       **({"guild_id": str(guild)} if guild else {})} for c in body]
            self.commands[guild] = stored
            return stored
        m = re.fullmatch(r"/channels/(\d+)/messages", path)
        if m and method == "POST":
            payload, uploads = _unpack(kwargs.get("json"), form, files)
            return self._payload(self._create(int(m.group(1)), payload, uploads))
        m = re.fullmatch(r"/channels/(\d+)/messages/(\d+)", path)
        if m:
            message = self.messages.get(int(m.group(2)))
            if message is None or message.deleted:
                raise _http_error(404, "Unknown Message", 10008)
            if method == "PATCH":
                payload, uploads = _unpack(kwargs.get("json"), form, files)
                return self._payload(self._edit(message, payload, uploads))
            if method == "DELETE":
                message.deleted = True
                return None
            if method == "GET":
                return self._payload(message)
        raise AssertionError(f"the fake Discord has no route for {method} {path}")

    async def _serve(self, route: Route, data: Any, form: Any, files: Any) -> tuple[int, str, dict[str, str]]:
        """One REST request as Discord answers it: (status, body, headers), rate limits included."""
        path = urlsplit(route.url).path.removeprefix("/api/v10")
        headers = {"X-Ratelimit-Bucket": f"{route.method} {route.path}", "X-Ratelimit-Limit": "50",
                   "X-Ratelimit-Remaining": "49", "X-Ratelimit-Reset-After": "1.0",
                   "Content-Type": "application/json", "Via": "1.1 google"}
        channel = re.match(r"/channels/(\d+)/messages", path)
        if channel is not None and self.channel_budget is not None:
            limit, per = self.channel_budget
            now = time.monotonic()
            ops = [t for t in self._channel_ops.get(int(channel.group(1)), []) if now - t < per]
            if len(ops) >= limit:
                retry = round(per - (now - ops[0]), 3) + 0.001
                self.rate_limited.append((route.method, path))
                headers.update({"X-Ratelimit-Limit": str(limit), "X-Ratelimit-Remaining": "0",
                                "X-Ratelimit-Reset-After": str(retry), "Retry-After": str(retry),
                                "X-Ratelimit-Scope": "shared"})
                return 429, json.dumps({"message": "You are being rate limited.", "retry_after": retry,
                                        "global": False}), headers
            ops.append(now)
            self._channel_ops[int(channel.group(1))] = ops
            self.channel_log.append((now, route.method, path))
            headers.update({"X-Ratelimit-Limit": str(limit), "X-Ratelimit-Remaining": str(limit - len(ops)),
                            "X-Ratelimit-Reset-After": str(round(per - (now - ops[0]), 3))})
        body = json.loads(data) if isinstance(data, str) and data else None
        try:
            answer = await self._rest(route, files=files, form=form, json=body)
        except discord.HTTPException as exc:
            return exc.status, json.dumps({"message": exc.text, "code": exc.code}), headers
        if answer is None:
            headers.pop("Content-Type")
            return 204, "", headers
        return 200, json.dumps(answer), headers

    def _cdn_get(self, url: str) -> bytes:
        self.calls.append(("CDN", url))
        if url not in self.cdn:
            raise _http_error(404, "404: Not Found")
        return self.cdn[url][0]

    # --- webhooks: interaction responses and follow-ups ---------------------------------------------

    async def _webhook(self, route: Route, *, payload: Any, multipart: Any, files: Any, params: Any) -> Any:
        await asyncio.sleep(0)
        method, path = route.method, urlsplit(route.url).path.removeprefix("/api/v10")
        self.calls.append((method, path))
        self._maybe_fail(method, path)
        body, uploads = _unpack(payload, multipart, files)
        m = re.fullmatch(r"/interactions/(\d+)/([^/]+)/callback", path)
        if m:
            record = self.interactions[m.group(2)]
            if record.responses:
                raise _http_error(400, "Interaction has already been acknowledged.", 40060)
            if time.monotonic() - record.sent_at > ANSWER_WINDOW_S:
                raise _http_error(404, "Unknown interaction", 10062)
            _validate(body.get("data") or {}, modal=body["type"] == 9)
            record.answered_at = time.monotonic()
            record.responses.append(body)
            kind = body["type"]
            result: dict[str, Any] = {"interaction": {"id": str(record.id), "type": 2,
                                                      "response_message_loading": kind == 5,
                                                      "response_message_ephemeral": bool(
                                                          body.get("data", {}).get("flags", 0) & 64)}}
            if kind in (4, 5):
                data = body.get("data", {}) or {}
                original = self._create(0, data, uploads)
                original.interaction_token = record.token
                record.original = original
                result["interaction"]["response_message_id"] = str(original.id)
                result["resource"] = {"type": kind, "message": self._payload(original)}
            elif kind == 6 and record.source is not None:  # deferred update: @original is the button's message
                record.original = record.source
            return result
        m = re.fullmatch(r"/webhooks/\d+/([^/]+)(?:/messages/(@original|\d+))?", path)
        if m:
            record = self.interactions[m.group(1)]
            if time.monotonic() - record.sent_at > TOKEN_LIFETIME_S:
                raise _http_error(404, "Unknown Webhook", 10015)  # the interaction's token has expired
            target = m.group(2)
            if target is None and method == "POST":
                message = self._create(0, body, uploads)
                message.interaction_token = record.token
                record.followups.append(message)
                return self._payload(message)
            found = record.original if target == "@original" else self.messages.get(int(target or 0))
            assert found is not None, f"no message {target} for interaction {record.id}"
            message = found
            if method == "PATCH":
                return self._payload(self._edit(message, body, uploads))
            if method == "DELETE":
                message.deleted = True
                return None
            return self._payload(message)
        raise AssertionError(f"the fake Discord has no webhook route for {method} {path}")

    # --- messages -----------------------------------------------------------------------------------

    def _create(self, channel_id: int, payload: dict[str, Any], uploads: dict[str, bytes]) -> FakeMessage:
        _validate(payload)
        nonce = payload.get("nonce")
        if nonce is not None and payload.get("enforce_nonce"):  # the same author's message with it, within minutes
            for earlier in self.messages.values():
                if (earlier.channel_id == channel_id and earlier.nonce == str(nonce) and not earlier.deleted
                        and time.time() - earlier.created_at < NONCE_WINDOW_S):
                    return earlier
        message = FakeMessage(id=self.snowflake(), channel_id=channel_id, author_id=self.app_id,
                              nonce=str(nonce) if nonce is not None else None)
        self.messages[message.id] = message
        self._apply(message, payload, uploads, new=True)
        if self.on_create is not None:
            self.on_create(message)
        return message

    def _edit(self, message: FakeMessage, payload: dict[str, Any], uploads: dict[str, bytes]) -> FakeMessage:
        _validate(payload)
        message.edits += 1
        self._apply(message, payload, uploads, new=False)
        return message

    def _apply(self, message: FakeMessage, payload: dict[str, Any], uploads: dict[str, bytes], *, new: bool) -> None:
        if "content" in payload:
            message.content = payload["content"] or ""
        if "embeds" in payload:
            message.embeds = payload["embeds"] or []
        elif "embed" in payload:
            message.embeds = [payload["embed"]] if payload["embed"] else []
        if "components" in payload:
            message.components = payload["components"] or []
        if "flags" in payload and payload["flags"] is not None:
            message.flags = int(payload["flags"])
        if uploads or "attachments" in payload:
            kept = [a for a in message.attachments
                    if any(str(a["id"]) == str(p.get("id")) for p in payload.get("attachments", []))] if not new else []
            added = []
            for i, (name, data) in enumerate(uploads.items()):
                attachment_id = self.snowflake()
                url = f"{CDN}/attachments/{message.channel_id}/{attachment_id}/{name}"
                self.cdn[url] = (data, "")
                message.files[name] = data
                added.append({"id": str(attachment_id), "filename": name, "size": len(data), "url": url,
                              "proxy_url": url, "content_type": _guess_type(name), "index": i})
            message.attachments = kept + added
            names = {a["filename"] for a in message.attachments}
            message.files = {name: data for name, data in message.files.items() if name in names}

    def _payload(self, message: FakeMessage) -> dict[str, Any]:
        return {"id": str(message.id), "channel_id": str(message.channel_id), "author": self.bot_user,
                "content": message.content, "timestamp": dt.datetime.now(dt.UTC).isoformat(),
                "edited_timestamp": None, "tts": False, "mention_everyone": False, "mentions": [],
                "mention_roles": [], "attachments": message.attachments, "embeds": message.embeds, "pinned": False,
                "type": 0, "components": message.components, "flags": message.flags}

    def channel_messages(self, channel_id: int, *, include_deleted: bool = False) -> list[FakeMessage]:
        return [m for m in self.messages.values()
                if m.channel_id == channel_id and (include_deleted or not m.deleted)]

    # --- making things users send -------------------------------------------------------------------

    def upload(self, channel_id: int, filename: str, data: bytes, content_type: str | None = None) -> dict[str, Any]:
        """An attachment payload whose bytes the bot can download from the fake CDN."""
        attachment_id = self.snowflake()
        url = f"{CDN}/attachments/{channel_id}/{attachment_id}/{filename}"
        self.cdn[url] = (data, content_type or "")
        payload = {"id": str(attachment_id), "filename": filename, "size": len(data), "url": url, "proxy_url": url}
        if content_type is not None:
            payload["content_type"] = content_type
        return payload

    def user_message(self, channel_id: int, author: dict[str, Any],
                     attachments: list[dict[str, Any]]) -> dict[str, Any]:
        """A message a user posted (for message context menus)."""
        return {"id": str(self.snowflake()), "channel_id": str(channel_id), "author": author, "content": "",
                "timestamp": dt.datetime.now(dt.UTC).isoformat(), "edited_timestamp": None, "tts": False,
                "mention_everyone": False, "mentions": [], "mention_roles": [], "attachments": attachments,
                "embeds": [], "pinned": False, "type": 0, "components": [], "flags": 0}


#: Discord's limits (the API reference: messages, embeds, components, modals), checked on everything the bot sends.
LIMITS = {"content": 2000, "embeds": 10, "title": 256, "description": 4096, "fields": 25, "field_name": 256,
          "field_value": 1024, "footer": 2048, "author": 256, "embed_total": 6000, "label": 80, "custom_id": 100,
          "modal_title": 45, "input_label": 45, "input_value": 4000, "rows": 5, "row_items": 5, "attachments": 10}


def _invalid(problem: str) -> discord.HTTPException:
    return _http_error(400, f"Invalid Form Body: {problem}", 50035)


def _validate(payload: dict[str, Any], *, modal: bool = False) -> None:
    """Refuse what Discord would refuse (400 Invalid Form Body), so the bot's builders are tested against it."""
    if len(payload.get("content") or "") > LIMITS["content"]:
        raise _invalid(f"content is {len(payload['content'])} characters")
    if len(str(payload.get("nonce") or "")) > 25:  # an integer or a string of at most 25 characters
        raise _invalid("nonce is longer than 25 characters")
    embeds = payload.get("embeds") or []
    if len(embeds) > LIMITS["embeds"]:
        raise _invalid("more than 10 embeds")
    if sum(_validate_embed(embed) for embed in embeds) > LIMITS["embed_total"]:
        raise _invalid("the message's embeds are more than 6000 characters together")
    if len(payload.get("attachments") or []) > LIMITS["attachments"]:
        raise _invalid("more than 10 attachments")
    if modal:
        if len(payload.get("title") or "") > LIMITS["modal_title"]:
            raise _invalid("modal title too long")
        for row in payload.get("components") or []:
            inner = row.get("component") or (row.get("components") or [{}])[0]
            label = row.get("label") or inner.get("label") or ""
            if len(label) > LIMITS["input_label"]:
                raise _invalid(f"text input label {label!r} too long")
            value, cap = inner.get("value") or "", min(inner.get("max_length") or 4000, LIMITS["input_value"])
            if len(value) > cap:
                raise _invalid(f"text input value is {len(value)} characters, longer than its max_length {cap}")
        return
    rows = payload.get("components") or []
    if len(rows) > LIMITS["rows"]:
        raise _invalid("more than 5 action rows")
    for row in rows:
        items = row.get("components") or []
        if len(items) > LIMITS["row_items"]:
            raise _invalid("more than 5 components in a row")
        for item in items:
            if len(item.get("label") or "") > LIMITS["label"] or len(item.get("custom_id") or "") > LIMITS["custom_id"]:
                raise _invalid("a button label or custom id is too long")


def _validate_embed(embed: dict[str, Any]) -> int:
    """Refuse an embed over Discord's limits; returns the characters it counts against the message's 6,000."""
    fields = embed.get("fields") or []
    parts = [("title", embed.get("title")), ("description", embed.get("description")),
             ("footer", (embed.get("footer") or {}).get("text")), ("author", (embed.get("author") or {}).get("name"))]
    for limit, text in parts:
        if len(text or "") > LIMITS[limit]:
            raise _invalid(f"embed {limit} is {len(text or '')} characters")
    if len(fields) > LIMITS["fields"]:
        raise _invalid(f"embed has {len(fields)} fields")
    for shown in fields:
        if len(shown.get("name") or "") > LIMITS["field_name"] or len(shown.get("value") or "") > LIMITS["field_value"]:
            raise _invalid(f"embed field {shown.get('name')!r} is too long")
    total = sum(len(text or "") for _, text in parts) + sum(len(f.get("name") or "") + len(f.get("value") or "")
                                                           for f in fields)
    if total > LIMITS["embed_total"]:
        raise _invalid(f"embed is {total} characters in all")
    return total


#: the request being made (route, multipart form, files): the session gets only what aiohttp would
_REQUEST: contextvars.ContextVar[tuple[Route, Any, Any]] = contextvars.ContextVar("fake_discord_request")


class _FakeResponse:
    """What discord.py reads of an aiohttp response: status, reason, headers, text."""

    def __init__(self, status: int, body: str, headers: dict[str, str]) -> None:
        self.status = status
        self.reason = {200: "OK", 204: "No Content", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
                       429: "Too Many Requests"}.get(status, "Error")
        self.headers = CIMultiDict(headers)
        self._body = body

    async def text(self, encoding: str = "utf-8") -> str:
        return self._body

    async def __aenter__(self) -> _FakeResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class _FakeSession:
    """Stands in for discord.py's aiohttp session: each request is answered by the fake Discord."""

    closed = False

    def __init__(self, fake: FakeDiscord) -> None:
        self.fake = fake

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        route, form, files = _REQUEST.get()
        fake = self.fake

        class _Pending:
            async def __aenter__(self) -> _FakeResponse:
                await asyncio.sleep(0)
                status, body, headers = await fake._serve(route, kwargs.get("data"), form, files)
                return _FakeResponse(status, body, headers)

            async def __aexit__(self, *exc: object) -> None:
                return None

        return _Pending()

    async def close(self) -> None:
        return None


def _unpack(payload: Any, form: Any, files: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A request's JSON body and uploaded files, from either a JSON payload or a multipart form."""
    body: dict[str, Any] = dict(payload or {})
    uploads: dict[str, bytes] = {}
    for part in form or []:
        if part["name"] == "payload_json":
            body = json.loads(part["value"])
    for file in files or []:
        file.fp.seek(0)
        uploads[file.filename] = file.fp.read()
    return body, uploads


def _guess_type(name: str) -> str:
    return {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}.get(
        name.rsplit(".", 1)[-1].lower(), "application/octet-stream")


# --- users, guilds, interactions ------------------------------------------------------------------------

@dataclass
class Place:
    guild_id: int
    channel_id: int
    nsfw: bool = False


@dataclass(frozen=True)
class Channel:
    """A channel option's value (it resolves to a text channel in the bot's cache)."""

    id: int
    nsfw: bool = False


def user(user_id: int, name: str, *, roles: tuple[int, ...] = ()) -> dict[str, Any]:
    """A user; `roles` are the ids (from `GUILD_ROLES`) they have as a member of the test guild."""
    data: dict[str, Any] = {"id": str(user_id), "username": name, "discriminator": "0", "global_name": name,
                            "avatar": None}
    if roles:
        data["member_roles"] = [str(r) for r in roles]
    return data


GUILD_ROLES = (555, 556)  # roles every test guild has, besides @everyone


def add_guild(bot: discord.Client, guild_id: int, channels: dict[int, bool], *,
              denied: dict[int, int] | None = None, rebuild: bool = False) -> discord.Guild:
    """Put a guild with text channels (id → age-restricted), the `GUILD_ROLES` and the bot's own member in the
    bot's cache, as the gateway's GUILD_CREATE would, so channel options, member roles and the bot's permissions
    (`FakeDiscord.bot_denied`, as channel overwrites) resolve."""
    state = bot._connection
    existing = state._get_guild(guild_id)
    known = {c.id: bool(getattr(c, "nsfw", False)) for c in existing.channels} if existing else {}
    if existing is not None and set(channels) <= set(known) and not rebuild:
        return existing
    denied = denied or {}
    me = bot.user.id if bot.user else 0
    payload: dict[str, Any] = {
        "id": str(guild_id), "name": "art server", "icon": None, "owner_id": "1", "features": [], "emojis": [],
        "stickers": [], "member_count": 3, "premium_tier": 0, "verification_level": 0, "mfa_level": 0,
        "roles": [{"id": str(role_id), "name": "@everyone" if role_id == guild_id else f"role-{role_id}",
                   "permissions": str(MEMBER_PERMISSIONS if role_id == guild_id else 0), "position": i,
                   "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0}
                  for i, role_id in enumerate((guild_id, *GUILD_ROLES))],
        "channels": [{"id": str(cid), "type": 0, "name": f"channel-{cid}", "position": i, "nsfw": nsfw,
                      "permission_overwrites": [{"id": str(me), "type": 1, "allow": "0", "deny": str(denied[cid])}]
                      if cid in denied else [], "parent_id": None}
                     for i, (cid, nsfw) in enumerate(sorted({**known, **channels}.items()))],
        "members": [{"user": {"id": str(me), "username": "inpaint", "discriminator": "0", "bot": True,
                              "avatar": None, "global_name": None}, "roles": [str(GUILD_ROLES[0])],
                     "joined_at": "2026-01-01T00:00:00+00:00", "deaf": False, "mute": False, "flags": 0}],
        "threads": [], "stage_instances": [], "guild_scheduled_events": [], "soundboard_sounds": [],
    }
    return state._add_guild_from_data(payload)  # type: ignore[arg-type]


class Driver:
    """Sends interactions from users into a logged-in bot and waits for it to finish handling them."""

    def __init__(self, fake: FakeDiscord, bot: discord.Client, place: Place) -> None:
        self.fake = fake
        self.bot = bot
        self.place = place
        self.patience_s = 20.0  # how long the bot may take to finish handling an interaction (after answering it)
        add_guild(bot, place.guild_id, {place.channel_id: place.nsfw}, denied=fake.bot_denied)

    def _base(self, kind: int, member: dict[str, Any], permissions: int) -> tuple[dict[str, Any], InteractionRecord]:
        record = InteractionRecord(id=self.fake.snowflake(), token=f"tok{self.fake.snowflake()}")
        self.fake.interactions[record.token] = record
        payload: dict[str, Any] = {
            "id": str(record.id), "application_id": str(self.fake.app_id), "type": kind, "token": record.token,
            "version": 1, "guild_id": str(self.place.guild_id), "channel_id": str(self.place.channel_id),
            "channel": {"id": str(self.place.channel_id), "type": 0, "guild_id": str(self.place.guild_id),
                        "name": "art", "position": 0, "nsfw": self.place.nsfw, "permission_overwrites": [],
                        "parent_id": None},
            "member": {"user": {k: v for k, v in member.items() if k != "member_roles"},
                       "roles": member.get("member_roles", []), "joined_at": "2026-01-01T00:00:00+00:00", "deaf": False,
                       "mute": False, "flags": 0, "permissions": str(permissions)},
            "guild": {"id": str(self.place.guild_id), "locale": "en-US", "features": []},
            "app_permissions": str(self.fake.app_permissions(self.place.channel_id)), "locale": "en-US",
            "guild_locale": "en-US",
            "entitlements": [], "authorizing_integration_owners": {"0": str(self.place.guild_id)}, "context": 0,
            "attachment_size_limit": 26214400,
        }
        return payload, record

    async def slash(self, member: dict[str, Any], name: str, *, permissions: int = MEMBER_PERMISSIONS,
                    **options: Any) -> InteractionRecord:
        """Run `/name` (or `/group sub` with a space) with options: attachments are payloads from
        `FakeDiscord.upload`, channels are `Channel`s."""
        payload, record = self._base(2, member, permissions)
        resolved: dict[str, Any] = {}
        wire = []
        for key, value in options.items():
            if isinstance(value, Channel):
                add_guild(self.bot, self.place.guild_id, {value.id: value.nsfw}, denied=self.fake.bot_denied)
                resolved.setdefault("channels", {})[str(value.id)] = {
                    "id": str(value.id), "type": 0, "name": f"channel-{value.id}", "nsfw": value.nsfw,
                    "permissions": str(ALL_PERMISSIONS), "guild_id": str(self.place.guild_id)}
                wire.append({"name": key, "type": 7, "value": str(value.id)})
            elif isinstance(value, dict) and "url" in value:
                resolved.setdefault("attachments", {})[value["id"]] = value
                wire.append({"name": key, "type": 11, "value": value["id"]})
            elif isinstance(value, bool):
                wire.append({"name": key, "type": 5, "value": value})
            elif isinstance(value, int):
                wire.append({"name": key, "type": 4, "value": value})
            elif isinstance(value, float):
                wire.append({"name": key, "type": 10, "value": value})
            else:
                wire.append({"name": key, "type": 3, "value": value})
        root, _, sub = name.partition(" ")
        top = [{"name": sub, "type": 1, "options": wire}] if sub else wire
        payload["data"] = {"id": str(self.fake.snowflake()), "name": root, "type": 1, "options": top,
                           "resolved": resolved, "guild_id": str(self.place.guild_id)}
        return await self._send(payload, record)

    async def message_command(self, member: dict[str, Any], name: str, target: dict[str, Any], *,
                              permissions: int = MEMBER_PERMISSIONS) -> InteractionRecord:
        payload, record = self._base(2, member, permissions)
        payload["data"] = {"id": str(self.fake.snowflake()), "name": name, "type": 3, "target_id": target["id"],
                           "resolved": {"messages": {target["id"]: target}}, "guild_id": str(self.place.guild_id)}
        return await self._send(payload, record)

    async def click(self, member: dict[str, Any], message: FakeMessage, custom_id: str, *,
                    permissions: int = MEMBER_PERMISSIONS) -> InteractionRecord:
        assert custom_id in message.custom_ids(), f"{custom_id} is not on message {message.id}"
        payload, record = self._base(3, member, permissions)
        record.source, record.source_edits = message, message.edits
        payload["message"] = self.fake._payload(message)
        payload["data"] = {"custom_id": custom_id, "component_type": 2}
        return await self._send(payload, record)

    async def submit_modal(self, member: dict[str, Any], shown: InteractionRecord, values: dict[str, Any], *,
                           permissions: int = MEMBER_PERMISSIONS) -> InteractionRecord:
        """Submit the modal `shown` displayed; `values` maps an input's label to its text (or attachment payloads
        for a file upload)."""
        modal = shown.modal
        assert modal is not None, "that interaction showed no modal"
        payload, record = self._base(5, member, permissions)
        resolved: dict[str, Any] = {}
        rows: list[dict[str, Any]] = []
        for row in modal["components"]:
            if row["type"] == 1:  # action row holding a text input
                inner = row["components"][0]
                rows.append({"type": 1, "id": len(rows) * 2 + 1, "components": [
                    {"type": 4, "id": len(rows) * 2 + 2, "custom_id": inner["custom_id"],
                     "value": values.get(inner["label"], inner.get("value", ""))}]})
            elif row["type"] == 18:  # label wrapping a component
                inner = row["component"]
                given = values.get(row["label"])
                if inner["type"] == 19:  # file upload
                    uploads = given or []
                    for a in uploads:
                        resolved.setdefault("attachments", {})[a["id"]] = a
                    rows.append({"type": 18, "id": len(rows) * 2 + 1, "component": {
                        "type": 19, "id": len(rows) * 2 + 2, "custom_id": inner["custom_id"],
                        "values": [a["id"] for a in uploads]}})
                else:
                    rows.append({"type": 18, "id": len(rows) * 2 + 1, "component": {
                        "type": 4, "id": len(rows) * 2 + 2, "custom_id": inner["custom_id"],
                        "value": given if given is not None else ""}})
        payload["data"] = {"custom_id": modal["custom_id"], "components": rows, "resolved": resolved}
        return await self._send(payload, record)

    async def _send(self, payload: dict[str, Any], record: InteractionRecord) -> InteractionRecord:
        state = self.bot._connection
        record.sent_at = time.monotonic()
        state.parse_interaction_create(payload)  # type: ignore[arg-type]
        await wait_until(lambda: bool(record.responses), what=f"a response to interaction {record.id}")
        assert record.answered_at is not None
        waited = record.answered_at - record.sent_at
        assert waited <= self.fake.answer_deadline_s, f"interaction {record.id} answered after {waited:.2f} s"
        # let the handler finish its follow-up work (defer → … → followup)
        await wait_until(lambda: not _is_thinking(record) or bool(record.followups) or _edited(record),
                         what=f"interaction {record.id} to finish", within_s=self.patience_s)
        await asyncio.sleep(0.01)
        return record


def _is_thinking(record: InteractionRecord) -> bool:
    """Deferred: a "thinking…" reply (5), or a button press that will update its message later (6)."""
    return bool(record.responses) and record.responses[-1]["type"] in (5, 6)


def _edited(record: InteractionRecord) -> bool:
    if record.original is None:
        return False
    before = record.source_edits if record.original is record.source else 0
    return record.original.edits > before
