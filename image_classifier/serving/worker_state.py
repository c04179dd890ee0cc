"""What the worker processes of one server tell each other: small files in the server's metric
directory (`PROMETHEUS_MULTIPROC_DIR`, which BentoML creates for each server and clears when it
starts and stops), each named after the worker's pid, so a dead worker's files are recognised by
its pid and ignored. Without that directory (one process, tests) there is nobody to tell."""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterator
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


def live_workers(prefix: str) -> Iterator[tuple[int, Path]]:
    """(pid, file) of each live worker's `<prefix>_<pid>` file, this worker's included."""
    shared = directory()
    if shared is None:
        return
    for file in shared.glob(f"{prefix}_*"):
        pid = file.name.rsplit("_", 1)[1]
        if pid.isdigit() and alive(int(pid)):
            yield int(pid), file


def loaded() -> None:
    """Say that this worker has loaded its models, for `every_worker_loaded`."""
    shared = directory()
    if shared is not None:
        (shared / f"loaded_{os.getpid()}").touch()


def every_worker_loaded(workers: int) -> bool:
    """True once `workers` workers of this server have loaded their models (a dead one's mark
    counts), so /readyz answers 200 only once every worker can answer: each worker listens on its
    own socket, and the kernel would hand part of the traffic to one still loading (503
    NOT_READY). A replacement for a dead worker loads before it listens, and the dead one's mark
    keeps the others ready meanwhile."""
    shared = directory()
    return shared is None or workers < 2 or len(list(shared.glob("loaded_*"))) >= workers


class ConnectionCount:
    """This worker's open connections, published for the others (one write per change, a few
    microseconds), and everyone's, read back."""

    def __init__(self) -> None:
        self.open = 0
        self._fd: int | None = None

    def changed(self, by: int) -> None:
        self.open += by
        shared = directory()
        if shared is None:
            return
        try:  # a count that cannot be published only leaves the balance less even
            if self._fd is None:
                path = shared / f"connections_{os.getpid()}"
                self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            os.pwrite(self._fd, b"%10d" % self.open, 0)
        except OSError:
            pass

    @staticmethod
    def everyone() -> list[int]:
        """The open connections of each live worker (this one's included, once it has had one)."""
        counts = []
        for _, file in live_workers("connections"):
            try:
                counts.append(int(file.read_bytes() or b"0"))
            except (OSError, ValueError):  # being created or just removed
                continue
        return counts


class InWork:
    """How many images this worker has in work (decoding, waiting or in a model run), published
    in one page shared by the server's workers, a slot each: a memory write per change, no
    syscall. `alone` says whether an image is the only one in work in the whole server, the one
    case where its model run may take every CPU (`Classifier.run(solo=True)`): with anything else
    in work, here or in another worker, those CPUs are busy and a wider run only competes.

    A worker that dies with images in work leaves its slot set until its replacement, which takes
    the same slot, clears it: until then no run is solo, which costs latency, not answers."""

    SLOTS = 1024

    def __init__(self, slot: int = 0) -> None:
        self._lock = threading.Lock()
        self._mine = 0
        self._slot = slot % self.SLOTS
        self._everyone: np.ndarray | None = None
        shared = directory()
        if shared is None:
            return
        try:
            fd = os.open(shared / "in_work", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if os.fstat(fd).st_size < self.SLOTS * 4:
                    os.ftruncate(fd, self.SLOTS * 4)  # every worker may: the same size, zeros
                page = mmap.mmap(fd, self.SLOTS * 4)
            finally:
                os.close(fd)
        except OSError:  # not shared: each worker then judges by its own images only
            return
        self._everyone = np.frombuffer(page, dtype=np.int32)
        self._everyone[self._slot] = 0

    def change(self, by: int) -> None:
        with self._lock:
            self._mine += by
            if self._everyone is not None:
                self._everyone[self._slot] = self._mine

    def alone(self) -> bool:
        """True when this worker's one image in work is the server's only one."""
        if self._mine != 1:
            return False
        everyone, slot = self._everyone, self._slot
        return everyone is None or not (everyone[:slot].any() or everyone[slot + 1 :].any())
