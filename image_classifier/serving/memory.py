"""Bounded memory per worker process: glibc's malloc arenas capped before threads start."""

from __future__ import annotations

import ctypes

_M_ARENA_MAX = -8  # glibc mallopt parameter


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's per-thread malloc arenas for this process (call before threads start).

    Every thread that decodes or runs the model otherwise gets an arena of its own, and each keeps
    the peak of what passed through it: a MobileNetV2 worker after 16 clients' 640x480 JPEGs held
    600 MB RSS with the default arenas and 270 MB with 2, at the same throughput (measured with
    BATCH_MAX_SIZE 4; docs/benchmarks.md).
    Returns False where the C library has no mallopt (not glibc)."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False
