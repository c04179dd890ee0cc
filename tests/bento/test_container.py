"""The bento as a container image, built and served here: `bentoml build` -> `containerize` -> run.

Everything is real: a private dockerd (own roots and socket, no bridge: see
/work/shared/notes/containers.md), a Python 3.11 base image made from Debian's mirror (no registry
is reachable), BentoML's own Dockerfile plus our HEALTHCHECK (deploy/docker/). The local base is
for this build only: the committed bentofile keeps BentoML's public base image.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc
import yaml

from image_classifier.serving.settings import Settings
from loadtest.servers import BIN, REPO, free_port
from tests.figures import measured
from tests.pictures import encode

BASE_IMAGE = "localhost/pybase:3.11"  # never pushed: it trusts this machine's extra CAs
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bento-image-classifier"
NEEDED = ("dockerd", "docker", "mmdebstrap")


def _run(cmd: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert result.returncode == 0, f"{cmd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@dataclass
class Docker:
    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 300, check: bool = True):
        cmd = ["docker", *args]
        if check:
            return _run(cmd, timeout=timeout, env=self.env)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env)


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    """A dockerd of our own, stopped by its pid and wiped afterwards, whatever happens."""
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    assert not missing, f"{missing} missing: `make test` apt-installs docker.io and mmdebstrap"
    root = Path(tempfile.mkdtemp(prefix="dockerd-", dir="/var/tmp"))  # overlay2 needs a real fs
    socket = root / "docker.sock"
    env = {**os.environ, "DOCKER_HOST": f"unix://{socket}", "DOCKER_BUILDKIT": "0"}
    log = open(root / "dockerd.log", "wb")  # noqa: SIM115 - closed in finally
    daemon = subprocess.Popen(
        ["dockerd", "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
         "--pidfile", str(root / "dockerd.pid"), "-H", f"unix://{socket}",
         "--storage-driver=overlay2", "--iptables=false", "--ip-forward=false", "--bridge=none"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        client = Docker(env)
        deadline = time.monotonic() + 60
        while client("version", check=False, timeout=10).returncode != 0:
            assert daemon.poll() is None, (root / "dockerd.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (root / "dockerd.log").read_text()[-3000:]
            time.sleep(0.5)
        yield client
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(10)
        log.close()
        _unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)


def _unmount_under(root: Path) -> None:
    """dockerd leaves its netns bind-mounted (exec/netns/default): unmount it, deepest first."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(f"{root}/")), reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def base_image(docker: Docker) -> str:
    """Python 3.11 from Debian's mirror, fixed as containers.md says; tarball cached weekly."""
    week = datetime.date.today().strftime("%G-W%V")
    tarball = CACHE / f"pybase-bookworm-{week}.tar"
    if not tarball.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        for old in CACHE.glob("pybase-bookworm-*.tar"):
            old.unlink()
        partial = tarball.with_suffix(".partial")
        _run(
            ["mmdebstrap", "--variant=minbase", "--quiet",
             "--include=python3,python3-venv,python3-pip,ca-certificates",
             # BentoML pip-installs uv with the system pip: no PEP 668 marker.
             "--customize-hook=rm -f \"$1\"/usr/lib/python3*/EXTERNALLY-MANAGED",
             # HTTPS to the package index goes through this machine's proxy: trust its CAs.
             "--customize-hook=cp /usr/local/share/ca-certificates/*.crt"
             " \"$1\"/usr/local/share/ca-certificates/ 2>/dev/null || true",
             "--customize-hook=chroot \"$1\" update-ca-certificates",
             "--format=tar", "bookworm", str(partial)],
            timeout=400,
        )  # fmt: skip
        partial.rename(tarball)
    docker(
        "import",
        "--change", "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
        "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        str(tarball), BASE_IMAGE,
    )  # fmt: skip
    return BASE_IMAGE


@pytest.fixture(scope="module")
def image(docker: Docker, base_image: str, trained_store: Path, tmp_path_factory) -> Iterator[str]:
    """`bentoml build` (labelled) then `bentoml containerize`, on the local base for this build."""
    bentofile = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    bentofile["docker"]["base_image"] = base_image
    local_bentofile = tmp_path_factory.mktemp("bentofile") / "bentofile.yaml"
    local_bentofile.write_text(yaml.safe_dump(bentofile))
    model_version = Settings.from_env().model_tag.split(":")[1]
    commit = _run(["git", "rev-parse", "HEAD"], cwd=REPO).stdout.strip()
    built = _run(
        [str(BIN / "bentoml"), "build", "-f", str(local_bentofile), "--output", "tag",
         "--label", f"model_version={model_version}", "--label", f"git_commit={commit}"],
        cwd=REPO,
    )  # fmt: skip
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    manifest = yaml.safe_load(
        (trained_store / "bentos" / Path(tag.replace(":", "/")) / "bento.yaml").read_text()
    )
    assert manifest["labels"]["model_version"] == model_version
    assert manifest["labels"]["git_commit"] == commit

    started = time.monotonic()
    # BentoML 1.4.39 refuses a dockerfile_template outside the working directory, and it copies
    # the bento to a temporary directory first: containerize from that directory's parent.
    _run(
        [str(BIN / "bentoml"), "containerize", tag, "--backend", "docker",
         "--opt", "network=host", "--image-tag", tag],
        cwd=tempfile.gettempdir(), env=docker.env, timeout=600,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    size = int(docker("image", "inspect", "-f", "{{.Size}}", tag).stdout)
    measured(
        f"\n[container] {tag}: containerize {elapsed:.1f} s, image {size / 1e6:.0f} MB",
        doc="deploy",
    )
    try:
        yield tag
    finally:
        docker("rmi", "-f", tag, base_image, check=False)


@contextlib.contextmanager
def running(docker: Docker, image: str, *options: str) -> Iterator[tuple[str, str, float]]:
    """`docker run` on host networking and a free loopback port; yields (url, name, s to ready)."""
    port, grpc_port = free_port(), free_port()
    name = f"image-classifier-test-{port}"
    started = time.monotonic()
    docker(
        "run", "-d", "--name", name, "--network", "host",
        # BENTOML_PORT rather than --port: the HEALTHCHECK script reads it to find the server.
        "-e", f"BENTOML_PORT={port}", "-e", "BENTOML_HOST=127.0.0.1",
        "-e", f"GRPC_PORT={grpc_port}", *options, image,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            state = docker("inspect", "-f", "{{.State.Status}}", name).stdout.strip()
            assert state == "running", f"container {state}:\n{_logs(docker, name)}"
            assert time.monotonic() < deadline, f"not ready in 90 s:\n{_logs(docker, name)}"
            time.sleep(0.2)
        yield url, name, time.monotonic() - started
    finally:
        docker("rm", "-f", name, check=False)


def _env_of(docker: Docker, name: str) -> dict[str, str]:
    variables = json.loads(docker("inspect", "-f", "{{json .Config.Env}}", name).stdout)
    return dict(variable.split("=", 1) for variable in variables)


def grpc_label(target: str, image: bytes) -> str:
    """The top-1 label tritonclient.grpc gets for one encoded image."""
    client = tritonclient.grpc.InferenceServerClient(target)
    tensor = tritonclient.grpc.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=object))
    result = client.infer("digits-cnn", [tensor], outputs=[
        tritonclient.grpc.InferRequestedOutput("label")])  # fmt: skip
    return result.as_numpy("label")[0].decode()


def _logs(docker: Docker, name: str, tail: int | None = 4000) -> str:
    result = docker("logs", name, check=False)
    return (result.stdout + result.stderr)[-tail if tail else 0 :]


def _analyze(url: str, picture) -> dict:
    response = httpx.post(
        f"{url}/analyze",
        files={"image": ("digit.png", encode(picture, "PNG"), "image/png")},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_image_classifies_read_only_as_non_root_and_turns_healthy(docker, image, heldout):
    """The production settings: read-only root, only /tmp writable, not root, HEALTHCHECK real."""
    with running(docker, image, "--read-only", "--tmpfs", "/tmp") as (url, name, to_ready):
        measured(
            f"[container] docker run -> /readyz 200 in {to_ready:.1f} s (read-only root)",
            doc="deploy",
        )
        sample = heldout[:10]
        right = sum(_analyze(url, picture)["prediction"]["label"] == str(label)
                    for picture, label in sample)  # fmt: skip
        assert right >= 9, f"only {right}/10 held-out digits right"
        assert docker("exec", name, "id", "-u").stdout.strip() != "0"
        # The same checker on a port nobody serves must fail: it is not a no-op.
        refused = docker("exec", "-e", "BENTOML_PORT=9", name, "bento-healthcheck", check=False)
        assert refused.returncode != 0, refused.stdout

        healthcheck = json.loads(
            docker("inspect", "-f", "{{json .Config.Healthcheck}}", image).stdout
        )
        assert healthcheck["Test"] == ["CMD", "/usr/local/bin/bento-healthcheck"]
        started = time.monotonic()
        while (status := _health(docker, name))["Status"] != "healthy":
            assert status["Status"] == "starting", f"{status}\n{_logs(docker, name)}"
            assert time.monotonic() - started < 60, status
            time.sleep(1)
        last = status["Log"][-1]
        assert last["ExitCode"] == 0 and last["Output"].startswith("healthy: label="), last
        # Open Inference gRPC from the container, with Triton's client (the port is exposed).
        exposed = json.loads(docker("inspect", "-f", "{{json .Config.ExposedPorts}}", image).stdout)
        assert "3001/tcp" in exposed, exposed
        grpc_port = _env_of(docker, name)["GRPC_PORT"]
        picture, truth = heldout[0]
        label = grpc_label(f"127.0.0.1:{grpc_port}", encode(picture, "PNG"))
        assert label == str(truth), label
        measured(f"[container] HEALTHCHECK healthy: {last['Output'].strip()}", doc="deploy")


def test_workers_come_from_the_environment(docker, image, heldout):
    """WORKERS=2 starts two server processes (BentoML names each worker's lines `[:N]`)."""
    with running(docker, image, "-e", "WORKERS=2", "-e", "THREADS=1") as (url, name, to_ready):
        measured(f"[container] WORKERS=2: /readyz 200 in {to_ready:.1f} s", doc="deploy")
        # /readyz is answered by whichever worker takes the connection: wait for both models.
        deadline = time.monotonic() + 60
        while not all(_worker_loaded(logs := _logs(docker, name, None), n) for n in (1, 2)):
            assert time.monotonic() < deadline, logs[-4000:]
            time.sleep(0.5)
        picture, label = heldout[0]
        assert _analyze(url, picture)["success"] is True


def _worker_loaded(logs: str, worker: int) -> bool:
    # JSON lines; BentoML's CLI writes a few text lines before the service (and its log
    # configuration) is imported, and the tail may start mid-line.
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith('{"')]
    return any(
        line.get("component") == f"[:{worker}]" and "loaded and warmed up" in line["message"]
        for line in lines
    )


def _health(docker: Docker, name: str) -> dict:
    return json.loads(docker("inspect", "-f", "{{json .State.Health}}", name).stdout)
