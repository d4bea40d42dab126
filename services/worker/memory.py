"""Giving freed memory back to the operating system.

A request's inputs are large (a data URI of up to MAX_IMAGE_BYTES × 4/3, its bytes, its decoded pixels) and are
allocated and freed in threads. glibc's allocator serves blocks below its mmap threshold from its heaps, and that
threshold rises (up to 32 MiB) each time a large mapped block is freed: after a few requests, every data URI and
every decoded image comes from heaps that keep what was freed, so the worker's resident memory stays near its
peak long after the requests are gone, and grows with fragmentation.

- `map_large_blocks` (called once at the standalone worker's start) fixes the threshold at `LARGE_BLOCK_BYTES`:
  larger blocks are always mapped, and unmapped — given back — as soon as they are freed. The cost is a system
  call and fresh pages per large block, small beside decoding the image it holds.
- `release_freed_memory` (called by the queue when it falls idle) returns what the heaps hold free
  (`malloc_trim(0)`).

Elsewhere than glibc on Linux both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

#: blocks at least this large are mapped on their own (and unmapped when freed) once `map_large_blocks` ran
LARGE_BLOCK_BYTES = 1024 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim, libc.mallopt  # noqa: B018 (not glibc: musl has neither)
    except (OSError, AttributeError):
        return None
    return libc


def map_large_blocks() -> bool:
    """Map every block of at least `LARGE_BLOCK_BYTES` on its own, so that freeing it gives it back (once per
    process, at start). True when the C library took the setting."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES))


def release_freed_memory() -> bool:
    """Return freed heap memory to the OS where the C library can (blocking for a few milliseconds: call it in a
    thread). True when it could."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
