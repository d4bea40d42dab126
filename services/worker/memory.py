"""Giving freed memory back to the operating system.

A request's inputs are large (a data URI of up to MAX_IMAGE_BYTES × 4/3, its bytes, its decoded pixels) and are
allocated and freed in threads. glibc's allocator keeps much of what was freed in its per-thread arenas rather
than returning it, so without help the worker's resident memory stays at its peak long after the requests are
gone. `release_freed_memory` asks glibc to return it (`malloc_trim(0)`); the queue calls it when it falls idle.
Elsewhere (another C library, another OS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    return trim


def release_freed_memory() -> bool:
    """Return freed heap memory to the OS where the C library can (blocking for a few milliseconds: call it in a
    thread). True when it could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
