"""Painter links: `<session id>.<HMAC>` where the MAC covers the session id and what it is bound to (user,
channel, image, expiry), so a link can't be forged or moved to another image or person."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from services.store.painter_sessions import PainterSession


def new_session_id() -> str:
    return secrets.token_urlsafe(18)


def sign(secret: bytes, session: PainterSession) -> str:
    return f"{session.id}.{_mac(secret, session)}"


def verify(secret: bytes, token: str, session: PainterSession | None) -> bool:
    """True when `token` is the signature of exactly this session (constant-time comparison)."""
    if session is None or "." not in token:
        return False
    session_id, _, mac = token.partition(".")
    return session_id == session.id and hmac.compare_digest(mac, _mac(secret, session))


def session_id_of(token: str) -> str:
    return token.partition(".")[0]


def _mac(secret: bytes, session: PainterSession) -> str:
    bound = f"{session.id}|{session.user_id}|{session.guild_id}|{session.channel_id}|{session.image_sha256}|" \
            f"{session.expires_at:.3f}"
    digest = hmac.new(secret, bound.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def browser_key(cookie: str) -> str:
    """What is stored for a browser's cookie (its hash: the cookie itself is never stored)."""
    return hashlib.sha256(cookie.encode()).hexdigest()
