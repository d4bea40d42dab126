"""Idempotent submits: the `Idempotency-Key` request header (IETF draft-ietf-httpapi-idempotency-key-header).

A client that may send the same submit twice (it retried after a read timeout, or it restarted between sending
and recording the answer) names the request with a key of its own. A submit carrying a key the worker still knows
for the same caller and app gets the handle of the request already made with it (the same `request_id` and URLs,
whatever state it is in, completed included) instead of a second request. The worker forgets a key when its
request expires (RESULT_TTL_S). Without the header nothing changes.

The key is at most `MAX_KEY_LENGTH` printable ASCII characters, sent as the draft's quoted string
(`Idempotency-Key: "8e03978e-40d5"`) or bare (`Idempotency-Key: 8e03978e-40d5`, as most APIs take it); anything
else is a 422. The caller is the credential of the `Authorization` header (hashed; every caller is the same one on
a worker without WORKER_KEY). The payload is not compared: the key alone names the request.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from services.worker.inputs import RequestError

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 200


class BadIdempotencyKey(RequestError):
    """An `Idempotency-Key` header that is not a key (a 422 located at the header)."""

    def __init__(self, message: str) -> None:
        super().__init__("", message)
        self.detail[0]["loc"] = ["header", HEADER]


def parse_key(value: str | None) -> str | None:
    """The key a header value carries (None without the header); `BadIdempotencyKey` when it is not a valid key."""
    if value is None:
        return None
    key = value.strip(" \t")
    if len(key) >= 2 and key[0] == key[-1] == '"':  # the draft's sf-string: a quoted string, \" and \\ escaped
        key = _unquote(key[1:-1])
    if not key:
        raise BadIdempotencyKey(f"the {HEADER} header is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise BadIdempotencyKey(f"the {HEADER} is {len(key)} characters long; at most {MAX_KEY_LENGTH} are allowed")
    if not all(" " <= ch <= "~" for ch in key):
        raise BadIdempotencyKey(f"the {HEADER} must be printable ASCII characters only")
    return key


def _unquote(inner: str) -> str:
    out: list[str] = []
    chars = iter(inner)
    for ch in chars:
        if ch == "\\":
            escaped = next(chars, "")
            if escaped not in ('"', "\\"):
                raise BadIdempotencyKey(f"the {HEADER} is a malformed quoted string")
            out.append(escaped)
        elif ch == '"':
            raise BadIdempotencyKey(f"the {HEADER} is a malformed quoted string")
        else:
            out.append(ch)
    return "".join(out)


def caller_of(authorization: str | None) -> str:
    """Who submits: a digest of the `Authorization` header's credential (the scheme, `Key` or `Bearer`, aside);
    empty without one."""
    if not authorization:
        return ""
    credential = authorization.strip().partition(" ")[2].strip() or authorization.strip()
    return hashlib.sha256(credential.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class IdempotencyScope:
    """A key as the worker files it: with its caller and app, so two callers' (or apps') keys never meet."""

    caller: str
    app_id: str
    key: str


class IdempotencyKeys:
    """The keys of the requests the worker still knows: scope → request id, and back."""

    def __init__(self) -> None:
        self._requests: dict[IdempotencyScope, str] = {}
        self._scopes: dict[str, IdempotencyScope] = {}

    def find(self, scope: IdempotencyScope) -> str | None:
        """The id of the request made with this key, if the worker still knows it."""
        return self._requests.get(scope)

    def remember(self, scope: IdempotencyScope, request_id: str) -> None:
        self._requests[scope] = request_id
        self._scopes[request_id] = scope

    def forget(self, request_id: str) -> None:
        """The request expired (or was never queued): its key may name a new request."""
        scope = self._scopes.pop(request_id, None)
        if scope is not None and self._requests.get(scope) == request_id:
            del self._requests[scope]

    def __len__(self) -> int:
        return len(self._requests)
