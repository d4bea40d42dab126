"""Waiting for something asynchronous to happen, with a deadline (never a bare sleep)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def wait_until(predicate: Callable[[], bool], *, what: str, within_s: float = 20.0) -> None:
    """Poll `predicate` every 5 ms until it holds; fail saying `what` was awaited after `within_s`."""
    deadline = asyncio.get_running_loop().time() + within_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def wait_for(check: Callable[[], Awaitable[bool]], *, what: str, within_s: float = 20.0) -> None:
    """`wait_until` for an async check (e.g. a database read)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)
