"""What the worker processes of one server tell each other, in files in the server's metric
directory (`PROMETHEUS_MULTIPROC_DIR`, which BentoML creates for each server and clears when it
starts and stops): marks named after each worker's pid, and pages of numbers with a slot per
worker. Without that directory (one process, tests) there is nobody to tell."""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def directory() -> Path | None:
    shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(shared) if shared else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def loaded() -> None:
    """Say that this worker has loaded its models, for `every_worker_loaded`."""
    shared = directory()
    if shared is not None:
        (shared / f"loaded_{os.getpid()}").touch()


def exiting() -> None:
    """Say that this worker ends by design, drained after SIGTERM (a shutdown, or a reload on
    SIGHUP, which replaces every worker): not a death for its replacement to count and alert on,
    and no longer a loaded worker for readiness."""
    shared = directory()
    if shared is not None:
        (shared / f"loaded_{os.getpid()}").unlink(missing_ok=True)
        (shared / f"exited_{os.getpid()}").touch()


def exited(pid: int) -> bool:
    """True when that worker said it was exiting (`exiting`)."""
    shared = directory()
    return shared is not None and (shared / f"exited_{pid}").exists()


def every_worker_loaded(workers: int) -> bool:
    """True once `workers` workers of this server have loaded their models (a dead one's mark
    counts), so /readyz answers 200 only once every worker can answer: each worker listens on its
    own socket, and the kernel would hand part of the traffic to one still loading (503
    NOT_READY). A replacement for a dead worker loads before it listens, and the dead one's mark
    keeps the others ready meanwhile."""
    shared = directory()
    return shared is None or workers < 2 or len(list(shared.glob("loaded_*"))) >= workers


class SharedCount:
    """One number per worker, in a page all of the server's workers map (a slot each, by worker
    number): a change is a memory write, no syscall, and every worker's number is read back. A
    worker that dies leaves its number until its replacement, which takes the same slot, clears
    it. Without the directory, or if the page cannot be made, only this worker's number is known.
    """

    SLOTS = 1024

    def __init__(self, name: str, slot: int = 0) -> None:
        self.mine = 0
        self._lock = threading.Lock()  # changes may come from several threads
        self._slot = slot % self.SLOTS
        self._everyone: np.ndarray | None = None
        shared = directory()
        if shared is None:
            return
        try:
            fd = os.open(shared / name, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if os.fstat(fd).st_size < self.SLOTS * 4:
                    os.ftruncate(fd, self.SLOTS * 4)  # every worker may: the same size, zeros
                page = mmap.mmap(fd, self.SLOTS * 4)
            finally:
                os.close(fd)
        except OSError:
            return
        self._everyone = np.frombuffer(page, dtype=np.int32)
        self._everyone[self._slot] = 0

    def change(self, by: int) -> None:
        with self._lock:
            self.mine += by
            if self._everyone is not None:
                self._everyone[self._slot] = self.mine

    def total(self) -> int:
        """Every worker's number added up (this one's included)."""
        return self.mine if self._everyone is None else int(self._everyone.sum())

    def of(self, slot: int) -> int:
        """Another worker's number (0 when it cannot be known)."""
        if slot % self.SLOTS == self._slot:
            return self.mine
        return 0 if self._everyone is None else int(self._everyone[slot % self.SLOTS])

    def others_zero(self) -> bool:
        everyone, slot = self._everyone, self._slot
        return everyone is None or not (everyone[:slot].any() or everyone[slot + 1 :].any())


class InWork(SharedCount):
    """How many images this worker has in work (decoding, waiting or in a model run), for
    `alone`: whether an image is the only one in work in the whole server, the one case where its
    model run may take every CPU (`Classifier.run(solo=True)`); with anything else in work, here
    or in another worker, those CPUs are busy and a wider run only competes. A dead worker's slot
    left set means no solo run until its replacement: latency lost, not answers."""

    def __init__(self, slot: int = 0) -> None:
        super().__init__("in_work", slot)

    @contextmanager
    def counting(self) -> Iterator[None]:
        """One image in work for the duration of the block."""
        self.change(1)
        try:
            yield
        finally:
            self.change(-1)

    def alone(self) -> bool:
        """True when this worker's one image in work is the server's only one."""
        return self.mine == 1 and self.others_zero()
