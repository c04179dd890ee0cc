"""Load from h2load (nghttp2's compiled generator, Debian's `nghttp2-client`), for overload.

Client and server share the machine's cores: at thousands of requests a second a Python client
spends more CPU than the server it is meant to overload, and the measure is then of the client.
h2load speaks HTTP/1.1 with `--h1`, holds many connections in one thread, and writes every
request's start, status and duration to its log file. Its own CPU time is measured and reported
beside the figures.
"""

from __future__ import annotations

import re
import resource
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from loadtest.load import Outcome


@dataclass
class H2loadRun:
    outcomes: list[Outcome]  # every request answered, with its status and duration
    unanswered: int  # requests that got no HTTP answer (errored or timed out)
    client_cpu_seconds: float
    seconds: float

    def rate(self, status: int | None = None) -> float:
        """Answers per second over the run, of one status or of all."""
        count = sum(status is None or o.status == status for o in self.outcomes)
        return count / self.seconds


def h2load(
    url: str,
    body: bytes,
    content_type: str,
    *,
    connections: int,
    seconds: float,
    rate_per_connection: float = 0,
) -> H2loadRun:
    """POST `body` on `connections` keep-alive connections for `seconds`: each as fast as it is
    answered, or `rate_per_connection` requests a second (whatever the answers) when given."""
    with tempfile.TemporaryDirectory() as folder:
        body_file, log_file = Path(folder) / "body", Path(folder) / "log.tsv"
        body_file.write_bytes(body)
        command = ["h2load", "--h1", "-c", str(connections), "-D", f"{seconds:g}",
                   "-d", str(body_file), "-H", f"content-type: {content_type}",
                   "--log-file", str(log_file), url]  # fmt: skip
        if rate_per_connection:
            command[1:1] = ["--rps", f"{rate_per_connection:g}"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        # A session of its own: Linux schedules each session as a group (autogroup), and in the
        # caller's it starved the caller's own latency-sampling clients of a CPU for up to 50 ms
        # at a time (their wait for a CPU, read from /proc/<pid>/task/<tid>/schedstat by hand).
        finished = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60,
                                  start_new_session=True)  # fmt: skip
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if finished.returncode != 0:
            raise RuntimeError(f"h2load failed: {finished.stderr[-500:]}")
        outcomes = _outcomes(log_file.read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return H2loadRun(outcomes, _unanswered(finished.stdout), cpu, seconds)


def _outcomes(log: str) -> list[Outcome]:
    """The log's rows: start (µs since the epoch), status, duration (µs)."""
    rows = [line.split("\t") for line in log.splitlines() if line.strip()]
    return [
        Outcome(started=int(start) / 1e6, seconds=int(duration) / 1e6, status=int(status))
        for start, status, duration in (row[:3] for row in rows)
    ]


def _unanswered(summary: str) -> int:
    found = re.search(r"(\d+) errored, (\d+) timeout", summary)
    if found is None:
        raise RuntimeError(f"no request counts in h2load's summary: {summary[-500:]}")
    return int(found.group(1)) + int(found.group(2))
