"""Memory per worker process: glibc's malloc arenas capped before threads start, and what startup
allocated kept out of the garbage collector's way."""

from __future__ import annotations

import ctypes
import gc
import logging

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
log = logging.getLogger(__name__)


def limit_malloc_arenas(arenas: int = 2, mmap_threshold: int = 2 * 1024 * 1024) -> bool:
    """Bound what glibc's malloc keeps for this process (call before threads start).

    Every thread that decodes or runs the model otherwise gets an arena of its own, and each keeps
    the peak of what passed through it: a MobileNetV2 worker after 16 clients' 640x480 JPEGs held
    600 MB RSS with the default arenas and 270 MB with 2, at the same throughput (measured with
    BATCH_MAX_SIZE 4; docs/benchmarks.md). And blocks of `mmap_threshold` or more (phone photos'
    bodies, their decoded pixels) get pages of their own that go back to the system when freed;
    by default glibc raises that threshold after the first such block is freed, so later uploads
    land on the heap, which keeps their peak. Not lower than 2 MiB: a 640x480 picture decoded by
    Pillow (4 bytes a pixel) is 1.2 MB, and at a 1 MiB threshold every one got fresh pages from
    the system, 301 page faults an image, which added 0.6-0.8 ms to its 2.4 ms of decoding and
    preprocessing (MobileNetV2 input, in process).
    Returns False where the C library has no mallopt (not glibc)."""
    try:
        libc = ctypes.CDLL(None)
        arenas_set = libc.mallopt(_M_ARENA_MAX, arenas)
        return bool(
            arenas_set
            and libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
            and libc.mallopt(_M_TRIM_THRESHOLD, 2 * mmap_threshold)
        )
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
