"""One machine playing a cluster: redis-server, N replicas, nginx in front, prometheus scraping.

Every part is a real Debian or project process on a free 127.0.0.1 port with its files in a
temporary directory, started and stopped (SIGTERM, then SIGKILL) by the test that asks for it.
`make test` installs redis-server and nginx; prometheus comes with promtool.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
import yaml

from loadtest.servers import Server, free_port, serve, stop, wait_until_ready

MONITORING = Path(__file__).resolve().parent.parent / "deploy" / "monitoring"


def need(program: str) -> str:
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/bin")
    assert path, f"{program} missing: `make test` installs it (Debian package)"
    return path


@contextlib.contextmanager
def process(command: list[str], log_path: Path) -> Iterator[subprocess.Popen]:
    with open(log_path, "wb") as log_file:
        started = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield started
    finally:
        stop(started, grace=10)


def wait_for(check, what: str, timeout: float = 30, every: float = 0.1):
    """`check()`'s first truthy value, polled (exceptions count as not yet) until `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if value := check():
                return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout} s")


@dataclass
class RedisServer:
    url: str
    process: subprocess.Popen

    def stop(self) -> None:
        stop(self.process, grace=10)


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    """An empty, memory-only redis-server."""
    port = free_port()
    command = [need("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "no", "--dir", str(directory)]  # fmt: skip
    with process(command, directory / "redis.log") as running:
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url, socket_timeout=1)
        wait_for(client.ping, "redis-server answering PING", timeout=15)
        client.close()
        yield RedisServer(url, running)


@dataclass
class Replicas:
    """N `bentoml serve` replicas of the service, each on its own fixed port (a restarted replica
    comes back where the balancer expects it) and its own BENTOML_HOME (`serve`)."""

    store: Path
    logs: Path
    env: dict[str, str]
    count: int = 2
    ports: list[int] = field(default_factory=list)
    servers: list[Server | None] = field(default_factory=list)
    _stacks: list[contextlib.ExitStack] = field(default_factory=list)
    _starts: int = 0

    def __post_init__(self) -> None:
        self.ports = [free_port() for _ in range(self.count)]
        self.servers = [None] * self.count
        self._stacks = [contextlib.ExitStack() for _ in range(self.count)]

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    def start(self, index: int, ready: bool = True) -> Server:
        self._starts += 1
        log_path = self.logs / f"replica-{index}-start-{self._starts}.log"
        server = self._stacks[index].enter_context(
            serve(self.store, log_path, env=self.env, ready=ready, port=self.ports[index])
        )
        self.servers[index] = server
        return server

    def start_all(self) -> None:
        """All at once (they load their models in parallel), then wait for each to be ready."""
        started = [self.start(index, ready=False) for index in range(self.count)]
        for server in started:
            wait_until_ready(server.url, server.process, server.log_path, timeout=120)

    def stop(self, index: int) -> None:
        """SIGTERM (the service drains), then the process is waited for."""
        self._stacks[index].close()
        self._stacks[index] = contextlib.ExitStack()
        self.servers[index] = None

    def close(self) -> None:
        for index in range(self.count):
            self.stop(index)


@contextlib.contextmanager
def replicas(store: Path, logs: Path, env: dict[str, str], count: int = 2) -> Iterator[Replicas]:
    group = Replicas(store, logs, env, count)
    try:
        group.start_all()
        yield group
    finally:
        group.close()


NGINX_CONF = """
worker_processes 1;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    log_format upstreams '$status $upstream_addr $upstream_status $request_time';
    access_log {dir}/access.log upstreams;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 16m;
    client_body_buffer_size 16m;  # uploads stay in memory: no temp files for nginx's own user
    upstream replicas {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # A refused connection (replica restarting) or a 502/503 (draining, loading, full)
            # is tried on the next replica. Classification changes nothing, so a POST may be
            # sent twice ("non_idempotent"). 429 is never retried: the limit is global.
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_next_upstream_tries {tries};
            proxy_next_upstream_timeout 10s;
            proxy_connect_timeout 1s;
            proxy_read_timeout 40s;
            add_header X-Upstream $upstream_addr always;  # which replica(s) answered
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx(directory: Path, upstream_ports: list[int]) -> Iterator[str]:
    """nginx balancing the replicas round-robin, with retries and passive health checks: a
    replica that fails once is left out for 2 s."""
    port = free_port()
    servers = "\n".join(
        f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;" for p in upstream_ports
    )
    conf = directory / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(dir=directory, servers=servers, port=port, tries=len(upstream_ports) + 1)
    )
    directory.chmod(0o755)
    command = [need("nginx"), "-p", str(directory), "-c", str(conf), "-g", "daemon off;"]
    with process(command, directory / "nginx.out") as running:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: running.poll() is None and httpx.get(url + "/livez", timeout=2).is_success,
                 "nginx answering /livez", timeout=15)  # fmt: skip
        yield url


def shortened_rules(destination: Path, for_seconds: int) -> Path:
    """deploy/monitoring/alerts.yml with every `for:` cut to `for_seconds` (a copy, for a test)."""
    text = (MONITORING / "alerts.yml").read_text()
    shortened, count = re.subn(r"(?m)^(\s+for: )\d+[smh]$", rf"\g<1>{for_seconds}s", text)
    assert count == text.count("for: "), "every `for:` must be rewritten"
    destination.write_text(shortened)
    return destination


PROMETHEUS_CONF = """
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [{rules}]
scrape_configs:
  - job_name: image-classifier
    honor_labels: {honor_labels}
    static_configs:
      - targets: [{targets}]
    relabel_configs:
      - target_label: endpoint
        replacement: {port_name}
"""
SERVICE_MONITOR = Path(__file__).resolve().parent.parent / "deploy/k8s/servicemonitor.yaml"


def scraped_as_the_service_monitor_says() -> dict[str, str]:
    """What the Prometheus Operator makes of the shipped ServiceMonitor, in a scrape config: it
    labels every target `endpoint=<the endpoint's port name>` (prometheus-operator,
    pkg/prometheus/promcfg.go), so without `honorLabels` BentoML's own `endpoint` label, which
    the alerts and the autoscaler's metric select on, became `exported_endpoint`."""
    (endpoint,) = yaml.safe_load(SERVICE_MONITOR.read_text())["spec"]["endpoints"]
    honor = "true" if endpoint.get("honorLabels", False) else "false"
    return {"honor_labels": honor, "port_name": endpoint["port"]}


@dataclass
class Prometheus:
    url: str

    def alerts(self) -> dict[str, str]:
        """Alert name -> its most advanced state (firing > pending)."""
        found = httpx.get(f"{self.url}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
        states: dict[str, str] = {}
        for alert in found:
            name = alert["labels"]["alertname"]
            if states.get(name) != "firing":
                states[name] = alert["state"]
        return states

    def targets_up(self) -> int:
        active = httpx.get(f"{self.url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        return sum(target["health"] == "up" for target in active)


@contextlib.contextmanager
def prometheus(directory: Path, targets: list[int], rules: Path) -> Iterator[Prometheus]:
    port = free_port()
    conf = directory / "prometheus.yml"
    listed = ", ".join(f"'127.0.0.1:{p}'" for p in targets)
    conf.write_text(
        PROMETHEUS_CONF.format(rules=rules, targets=listed, **scraped_as_the_service_monitor_says())
    )
    command = [need("prometheus"), f"--config.file={conf}",
               f"--storage.tsdb.path={directory / 'data'}",
               f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    with process(command, directory / "prometheus.log"):
        running = Prometheus(f"http://127.0.0.1:{port}")
        wait_for(lambda: httpx.get(running.url + "/-/ready", timeout=2).is_success,
                 "prometheus ready", timeout=30)  # fmt: skip
        yield running
