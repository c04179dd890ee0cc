"""Memory per worker process: glibc's malloc arenas capped before threads start, and what
startup allocated kept out of the garbage collector's way."""

from __future__ import annotations

import ctypes
import gc
import logging

_M_ARENA_MAX = -8  # glibc mallopt parameter
log = logging.getLogger(__name__)


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


def freeze_startup_objects() -> None:
    """Move every object alive now (the frameworks, the loaded models) out of the garbage
    collector's reach (logged with how many).

    A full collection otherwise walks them all again and again while requests wait; frozen, the
    digit model's worst latency at capacity and its goodput under overload both improved in
    hand-run h2load measurements. Call once the models are loaded; what requests allocate later
    is still collected."""
    gc.collect()
    gc.freeze()
    log.info(
        "%d startup objects frozen out of the garbage collector's reach", gc.get_freeze_count()
    )
