"""deploy/k8s/ checked offline: Kubernetes 1.37 schemas, and the references between the manifests.

No cluster can be had here, so each manifest is validated strictly against the API schemas
(kubernetes-validate), and what a schema cannot see is checked by hand: labels that must match,
ports by name, probe paths on a real server, and a grace period long enough for the drain.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml

from image_classifier.serving.settings import Settings, variable_names
from loadtest.servers import REPO
from tests.http.responses import metric_names
from tests.http.test_operations import promtool

K8S = REPO / "deploy" / "k8s"
REDIS_COMPONENT = K8S / "components" / "redis"
WITH_REDIS = REPO / "deploy" / "k8s-with-redis"  # the overlay: base + component
ADAPTER_RULES = REPO / "deploy" / "monitoring" / "prometheus-adapter.yaml"
KUBERNETES_VERSION = "1.37.0"
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}  # not in the core schemas


def _documents(folder: Path = K8S) -> list[tuple[Path, dict]]:
    return [
        (path, doc)
        for path in sorted(folder.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def _all_documents() -> list[tuple[Path, dict]]:
    return _documents() + _documents(REDIS_COMPONENT)


def _one(kind: str) -> dict:
    (doc,) = [
        doc for path, doc in _documents() if doc["kind"] == kind and "example" not in path.name
    ]
    return doc


def _container() -> dict:
    (container,) = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container["env"]}


@pytest.mark.parametrize(
    "path,doc", _all_documents(), ids=[f"{p.name}:{d['kind']}" for p, d in _all_documents()]
)
def test_manifest_is_valid_against_the_kubernetes_schemas(path: Path, doc: dict):
    if doc["kind"] in ("Kustomization", "Component"):
        listed = doc["resources"] + [patch["path"] for patch in doc.get("patches", [])]
        missing = [r for r in listed if not (path.parent / r).exists()]
        assert not missing, missing
        return
    if path.name.endswith(".patch.yaml"):
        return  # a partial Deployment: checked in test_redis_component_points_the_service_at_it
    if (doc["apiVersion"], doc["kind"]) in CRDS:
        return  # structurally checked in test_service_monitor_scrapes_the_service
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_secret_example():
    listed = set(_one("Kustomization")["resources"])
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == {m for m in manifests if "example" not in m}


def test_service_selects_the_deployment_pods_on_the_container_port():
    deployment, service = _one("Deployment"), _one("Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    targets = {port["name"]: port["targetPort"] for port in service["spec"]["ports"]}
    assert targets == {"http": "http", "grpc": "grpc"}, targets
    assert targets.keys() == container_ports.keys(), container_ports
    # gRPC listens on the container's grpc port (the probes stay on HTTP).
    assert _env(_container())["GRPC_PORT"]["value"] == str(container_ports["grpc"])
    # The server listens where the container port says.
    args = _container()["args"]
    assert args[args.index("--port") + 1] == str(container_ports["http"])
    assert _env(_container())["BENTOML_PORT"]["value"] == str(container_ports["http"])


def test_pdb_and_hpa_target_the_deployment():
    deployment = _one("Deployment")
    pdb, hpa = _one("PodDisruptionBudget"), _one("HorizontalPodAutoscaler")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]  # drains can proceed
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    by_type = {metric["type"]: metric for metric in hpa["spec"]["metrics"]}
    assert by_type.keys() == {"Resource", "Pods"}
    assert by_type["Resource"]["resource"]["name"] == "cpu"
    assert "cpu" in _container()["resources"]["requests"]  # Utilization is relative to it
    # The per-pod metric is one the Prometheus adapter's rules serve.
    served = {rule["name"]["as"] for rule in _adapter_rules()}
    assert by_type["Pods"]["pods"]["metric"]["name"] in served, served


def _adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_RULES.read_text())["rules"]


def test_adapter_queries_parse_and_their_series_exist_on_a_real_server(server, tmp_path):
    live = metric_names(httpx.get(server.url + "/metrics", timeout=10).text)
    recorded = []
    for index, rule in enumerate(_adapter_rules()):
        series = rule["seriesQuery"].split("{")[0]
        assert series in live, f"{series} is not on /metrics"
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        query = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="default",pod="image-classifier-0"')
            .replace("<<.GroupBy>>", "pod")
        )
        assert "<<" not in query, query
        selected = set(re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\{", query))
        assert series in selected and selected <= live, f"{selected - live} not on /metrics"
        recorded.append({"record": f"adapter:rule_{index}", "expr": query})
    path = tmp_path / "adapter-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": recorded}]}))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_replicas_spread_over_nodes_and_zones():
    pod = _one("Deployment")["spec"]["template"]
    constraints = pod["spec"]["topologySpreadConstraints"]
    keys = {c["topologyKey"] for c in constraints}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    labels = pod["metadata"]["labels"].items()
    for constraint in constraints:
        assert constraint["labelSelector"]["matchLabels"].items() <= labels


def test_only_the_service_s_pods_may_reach_redis():
    """Redis is a trust boundary: what it holds is served (docs/deploy.md)."""
    docs = {(doc["kind"], path.name): doc for path, doc in _documents(REDIS_COMPONENT)}
    policy = docs[("NetworkPolicy", "redis.yaml")]["spec"]
    redis_pods = docs[("Deployment", "redis.yaml")]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_pods.items()
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    service_pods = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert source["podSelector"]["matchLabels"].items() <= service_pods.items()
    assert not source["podSelector"]["matchLabels"].items() <= redis_pods.items()
    (container,) = docs[("Deployment", "redis.yaml")]["spec"]["template"]["spec"]["containers"]
    assert [p["port"] for p in rule["ports"]] == [p["name"] for p in container["ports"]]


def test_redis_component_points_the_service_at_it():
    docs = {(doc["kind"], path.name): doc for path, doc in _documents(REDIS_COMPONENT)}
    component = docs[("Component", "kustomization.yaml")]
    assert component["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    redis_pods = docs[("Deployment", "redis.yaml")]["spec"]["template"]
    service = docs[("Service", "redis.yaml")]
    assert service["spec"]["selector"].items() <= redis_pods["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    (container,) = redis_pods["spec"]["containers"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    patch = docs[("Deployment", "redis-url.patch.yaml")]
    assert patch["metadata"]["name"] == _one("Deployment")["metadata"]["name"]
    (patched,) = patch["spec"]["template"]["spec"]["containers"]
    assert patched["name"] == _container()["name"]
    url = _env(patched)["REDIS_URL"]["value"]
    assert url == f"redis://{service['metadata']['name']}:{port['port']}/0"
    assert Settings.from_env({"REDIS_URL": url}).redis_url == url
    overlay = yaml.safe_load((WITH_REDIS / "kustomization.yaml").read_text())
    assert [(WITH_REDIS / r).resolve() for r in overlay["resources"]] == [K8S]
    assert [(WITH_REDIS / c).resolve() for c in overlay["components"]] == [REDIS_COMPONENT]


def test_service_monitor_scrapes_the_service():
    monitor, service = _one("ServiceMonitor"), _one("Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    port_names = {p["name"] for p in service["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    # The service's `endpoint` label (the alerts and the autoscaler select on it) is kept.
    assert endpoint["honorLabels"] is True


def test_grace_period_covers_pre_stop_and_the_drain():
    pod = _one("Deployment")["spec"]["template"]["spec"]
    command = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = float(_env(_container())["SHUTDOWN_GRACE_S"]["value"])
    assert drain == Settings().shutdown_grace_s  # the manifest states the service default
    assert pod["terminationGracePeriodSeconds"] >= float(command[1]) + drain + 5


def test_pod_runs_non_root_on_a_read_only_root_with_a_writable_tmp():
    pod = _one("Deployment")["spec"]["template"]["spec"]
    container = _container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    (mount,) = container["volumeMounts"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mount["mountPath"] == "/tmp" and "emptyDir" in volumes[mount["name"]]
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys() <= resources["limits"].keys()


def test_settings_env_is_known_and_tokens_come_from_a_secret():
    env = _env(_container())
    known = variable_names()
    assert {"WORKERS", "THREADS", "MODEL_TAG", "API_TOKENS"} <= env.keys()
    assert env.keys() - {"BENTOML_PORT"} <= known
    assert "value" not in env["API_TOKENS"]
    assert env["API_TOKENS"]["valueFrom"]["secretKeyRef"]["key"] == "api-tokens"
    Settings.from_env({k: v["value"] for k, v in env.items() if "value" in v})  # valid values


def test_probe_paths_answer_200_on_a_real_server(server):
    container = _container()
    paths = {
        probe: container[probe]["httpGet"]["path"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert paths["readinessProbe"] == "/readyz" and paths["livenessProbe"] == "/livez"
    for probe, path in paths.items():
        assert container[probe]["httpGet"]["port"] == "http"
        assert httpx.get(server.url + path, timeout=5).status_code == 200, (probe, path)
