"""Keep-alive connections spread evenly over the workers.

Each worker listens on its own socket and the kernel picks one for a new connection by a hash of
its addresses: 16 keep-alive clients that connect together can land 11 and 5, and the worker with
11 then answers its clients slower for as long as they stay. So every worker publishes how many
connections it holds that have had an answer (a `worker_state.SharedCount`; a connection only
opened, or still sending its first request, such as a slow upload, would make its worker look
full and send every keep-alive client to the other one), and one holding more than its share (all
the workers' connections over the number of workers, rounded up) answers one request with
`Connection: close` every `LOOK_EVERY_S`: its client reconnects, and the kernel hashes the new
connection afresh. To a client this is an ordinary end of keep-alive, which HTTP clients handle by
opening a new connection for their next request. With one worker nothing ever happens.
"""

from __future__ import annotations

import math
import time

from ..serving.worker_state import SharedCount

LOOK_EVERY_S = 0.25  # at most one connection closed this often per worker: no stampede


class ConnectionBalance:
    def __init__(self, workers: int, slot: int = 0, clock=time.monotonic) -> None:  # noqa: ANN001
        self.workers = workers
        self.count = SharedCount("connections", slot)  # slot: this worker's number
        self.clock = clock
        self._next_look = 0.0

    def opened(self) -> None:
        if self.workers > 1:
            self.count.change(1)

    def closed(self) -> None:
        if self.workers > 1:
            self.count.change(-1)

    def close_after_this_request(self) -> bool:
        """Asked at each request's head: True for at most one request every LOOK_EVERY_S, while
        this worker holds more than its share of the connections."""
        if self.workers < 2:
            return False
        now = self.clock()
        if now < self._next_look:
            return False
        self._next_look = now + LOOK_EVERY_S
        return self.count.mine > math.ceil(self.count.total() / self.workers)
