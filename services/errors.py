"""Errors a user can cause, carrying a message that is safe and friendly to show them."""

from __future__ import annotations

from pydantic import ValidationError


class UserError(Exception):
    """Something the user can fix (bad option, not allowed, nothing to act on). Shown to them as is."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class StartupError(Exception):
    """The bot can't run as configured: the message (one line) says what to change."""


def validation_problems(exc: ValidationError) -> tuple[str, ...]:
    """Pydantic's errors as `field: message` lines a user can read."""
    return tuple(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
