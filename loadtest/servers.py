"""A real `bentoml serve` on a free loopback port, started and stopped for a benchmark or a test."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


_HANDED_OUT: set[int] = set()  # each port once per process: picked, not bound yet


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range: a port that bind(0) gave out
    could be given out again to the server's own process manager, whose control socket then
    took the HTTP port first (a clean-clone run: "Address already in use")."""
    try:
        first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 32768
    for _ in range(200):
        port = random.randrange(10_000, first_ephemeral)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port))
            _HANDED_OUT.add(port)
            return port
    with socket.socket() as sock:  # every one tried was taken: the kernel's pick
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path
    grpc_target: str | None = None  # host:port of its Open Inference gRPC (None: GRPC_PORT=0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def worker_pids(server_pid: int) -> list[int]:
    """Live BentoML worker processes under a server (a killed one lingers as a zombie)."""
    pids = []
    for process in psutil.Process(server_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if process.status() != psutil.STATUS_ZOMBIE and "_bentoml_impl.worker" in " ".join(
                process.cmdline()
            ):
                pids.append(process.pid)
    return pids


def wait_until_ready(url: str, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log_path.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"server not ready in {timeout}s:\n{log_path.read_text()[-3000:]}")


@contextlib.contextmanager
def serve(
    bentoml_home: Path,
    log_path: Path,
    env: dict[str, str] | None = None,
    ready: bool = True,
    port: int | None = None,
) -> Iterator[Server]:
    """A real `bentoml serve service:ImageClassifier` on a free loopback port (or on `port`: a
    replica restarted where its load balancer expects it).

    Each server gets its own BENTOML_HOME sharing the model store through a symlink: BentoML
    clears $BENTOML_HOME/prometheus_multiproc_dir when a server starts or stops, which would zero
    the metrics of any other server on the same home.
    """
    port = port or free_port()
    home = Path(tempfile.mkdtemp(prefix="bentoml-server-home-"))
    (home / "models").symlink_to(Path(bentoml_home) / "models", target_is_directory=True)
    # A free gRPC port too: with SO_REUSEPORT two servers on one port would share its calls.
    full_env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "GRPC_PORT": str(free_port()),
        **(env or {}),
    }
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [str(BIN / "bentoml"), "serve", "service:ImageClassifier",
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        if ready:
            wait_until_ready(url, process, log_path, timeout=90)
        grpc_port = int(full_env["GRPC_PORT"])
        yield Server(url, process, log_path, f"127.0.0.1:{grpc_port}" if grpc_port else None)
    finally:
        stop(process)
        shutil.rmtree(home, ignore_errors=True)


def stop(process: subprocess.Popen, grace: float = 20) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
