"""Errors a user can cause, carrying a message that is safe and friendly to show them."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix (bad option, not allowed, nothing to act on). Shown to them as is."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
