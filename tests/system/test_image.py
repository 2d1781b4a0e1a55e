"""The CPU image, built from docker/Dockerfile and run as the Kubernetes Deployment runs it.

Runs wherever podman or docker can build and run containers (tests/container_engine.py),
and skips with the reason elsewhere. Where no registry serves python:3.11-slim, the
stand-in base is made first by docker/build-offline-base.sh (root and debootstrap;
reused while the script is unchanged). Every container gets the constraints of
deploy/kubernetes/base/deployment.yaml, read from the manifest: its uid and gid, a
read-only root filesystem with /tmp its only writable path, every capability dropped,
no new privileges; and its own port on the host's network. Checked there:

- the image: non-root USER, HEALTHCHECK kept, size bounded; no torch, no compiler;
- the container: ready, running as that uid, unable to write its root filesystem;
  the HEALTHCHECK command passes inside it; REST and WebSocket give the words the
  service gives outside the container;
- SIGTERM while streaming: every received message answered, close 1001, exit 0
  within the Deployment's grace period;
- two containers on one Redis: a session continues on the second after a SIGKILL
  of the first;
- Dockerfile.gpu: the stage without a CUDA base is built; the rest only where the
  CUDA base image is already present (never pulled by the tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.api_support import assert_same_predictions
from tests.container_engine import Container, ContainerEngine, EngineUnavailable
from tests.live_server import BUNDLED_MODELS, LiveServer
from tests.paths import ROOT as REPO_ROOT
from tests.redis_server import RedisServer, free_port, needs_redis, running_redis

pytestmark = [pytest.mark.slow, pytest.mark.container]

ROOT = REPO_ROOT
DOCKER = ROOT / "docker"
DEPLOYMENT = ROOT / "deploy" / "kubernetes" / "base" / "deployment.yaml"
BASE_SCRIPT = DOCKER / "build-offline-base.sh"
BASE_IMAGE = "docker.io/library/python:3.11-slim"
# One tag per checkout: two checkouts on one machine never run each other's image, and a
# rebuild in the same checkout reuses the engine's layer cache.
TAG = "localhost/nextword-test:" + hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]
MAX_IMAGE_BYTES = 600_000_000  # measured 406 MB on the stand-in base (docs/operations.md)
TEXT = "the cat and the dog went home . they were very good and i think we should"
K = 5


# ---- the engine, the base and the image ------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> ContainerEngine:
    try:
        return ContainerEngine.find(tmp_path_factory.mktemp("engine"))
    except EngineUnavailable as unavailable:
        pytest.skip(f"no container engine that works here: {unavailable}")


@pytest.fixture(scope="module")
def base(engine: ContainerEngine) -> str:
    """python:3.11-slim: present, pulled, or the stand-in made by docker/build-offline-base.sh."""
    result = subprocess.run(
        [BASE_SCRIPT],
        env={**engine.env, "CONTAINER_ENGINE": engine.name},
        capture_output=True,
        text=True,
        timeout=900,
    )
    bootstrap = shutil.which("mmdebstrap") or shutil.which("debootstrap")
    can_build = os.geteuid() == 0 and bootstrap is not None
    if result.returncode != 0 and not can_build:
        pytest.skip(
            f"{BASE_IMAGE} is not here, cannot be pulled, and the stand-in needs root and "
            f"debootstrap ({BASE_SCRIPT.relative_to(ROOT)})"
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert engine.has_image(BASE_IMAGE)
    # An engine can answer `info` and still be unable to start a container (no user
    # namespaces, a runtime refused by the host): that is this host's limit, not the image's.
    probe = engine.call(["run", "--rm", "--network", "host", BASE_IMAGE, "true"], check=False)
    if probe.returncode != 0:
        pytest.skip(f"{engine.name} cannot run a container here: {probe.stderr.strip()[-300:]}")
    return BASE_IMAGE


@pytest.fixture(scope="module")
def image(engine: ContainerEngine, base: str) -> dict[str, Any]:
    """The CPU image built from docker/Dockerfile; its `image inspect` record."""
    engine.build(ROOT, DOCKER / "Dockerfile", TAG)
    return engine.inspect_image(TAG)


# ---- the Deployment's constraints -------------------------------------------


class Deployment:
    """What deploy/kubernetes/base/deployment.yaml asks of the nextword container."""

    def __init__(self) -> None:
        pod = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["spec"]
        (self.container,) = [c for c in pod["containers"] if c["name"] == "nextword"]
        self.pod_security = pod["securityContext"]
        self.security = self.container["securityContext"]
        self.grace_s = float(pod["terminationGracePeriodSeconds"])
        empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        self.scratch = [
            m["mountPath"] for m in self.container["volumeMounts"] if m["name"] in empty
        ]

    @property
    def user(self) -> str:
        return f"{self.pod_security['runAsUser']}:{self.pod_security['runAsGroup']}"

    def run_options(self, engine: ContainerEngine) -> list[str]:
        """The engine's options for the same constraints."""
        options = [f"--user={self.user}"]
        if self.security["readOnlyRootFilesystem"]:
            options.append("--read-only")
            if engine.is_podman:  # podman would add writable /run, /tmp, /var/tmp of its own
                options.append("--read-only-tmpfs=false")
        options += [f"--tmpfs={path}" for path in self.scratch]
        options += [f"--cap-drop={cap}" for cap in self.security["capabilities"]["drop"]]
        if self.security["allowPrivilegeEscalation"] is False:
            options += ["--security-opt", "no-new-privileges"]
        return options


DEPLOYMENT_SPEC = Deployment()


def test_the_deployment_constrains_what_these_tests_check() -> None:
    """The constraints read from the manifest are the strict ones (else the checks weaken)."""
    d = DEPLOYMENT_SPEC
    assert d.pod_security["runAsNonRoot"] is True and d.pod_security["runAsUser"] != 0
    assert d.security["readOnlyRootFilesystem"] is True
    assert d.security["allowPrivilegeEscalation"] is False
    assert d.security["capabilities"]["drop"] == ["ALL"]
    assert d.scratch == ["/tmp"]


def start(engine: ContainerEngine, started: list[Container], **env: str) -> tuple[Container, str]:
    """A container of the image under the Deployment's constraints, once ready; its URL."""
    port = free_port()
    environment = {
        "NEXTWORD_PORT": str(port),
        "NEXTWORD_WORKERS": "1",
        "NEXTWORD_INTRA_OP_THREADS": "1",
        "NEXTWORD_PROVIDERS": "cpu",
        **env,
    }
    container = engine.run(TAG, DEPLOYMENT_SPEC.run_options(engine), environment)
    started.append(container)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return container, url
        except httpx.TransportError:
            pass
        if not container.running():
            break
        time.sleep(0.25)
    pytest.fail(
        f"container not ready (running: {container.running()}):\n{container.logs()[-6000:]}"
    )


@pytest.fixture(scope="module")
def containers(engine: ContainerEngine, image: dict[str, Any]) -> Iterator[list[Container]]:
    """Containers started by the module's tests, removed at its end."""
    started: list[Container] = []
    yield started
    for container in started:
        container.remove()


@pytest.fixture(scope="module")
def served(engine: ContainerEngine, containers: list[Container]) -> tuple[Container, str]:
    """One container of the image serving the bundled models; shared by the read-only checks."""
    return start(engine, containers)


# ---- the image ---------------------------------------------------------------


def test_the_image_is_non_root_small_and_keeps_its_healthcheck(image: dict[str, Any]) -> None:
    config = image["Config"]
    user = config.get("User", "")  # absent or empty: root
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user!r}: not a numeric non-root uid"
    assert user == DEPLOYMENT_SPEC.user  # what the Deployment runs it as
    assert "/readyz" in " ".join(config["Healthcheck"]["Test"])
    assert config["Cmd"] == ["nextword", "serve"]
    assert image["Size"] < MAX_IMAGE_BYTES, f"{image['Size'] / 1e6:.0f} MB"


def test_no_torch_and_no_compiler_in_the_image(served: tuple[Container, str]) -> None:
    container, _ = served
    probe = (
        "import importlib.util, json, shutil;"
        "tools = ['cc', 'gcc', 'g++', 'c++', 'clang', 'ld', 'as', 'make'];"
        "print(json.dumps({"
        "'torch': importlib.util.find_spec('torch') is not None,"
        "'onnxruntime': importlib.util.find_spec('onnxruntime') is not None,"
        "'tools': [t for t in tools if shutil.which(t)]}))"
    )
    result = container.exec(["python", "-c", probe])
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found == {"torch": False, "onnxruntime": True, "tools": []}, found


# ---- one container under the Deployment's constraints --------------------------


def test_ready_as_a_non_root_user_on_a_read_only_root(served: tuple[Container, str]) -> None:
    container, url = served
    assert httpx.get(f"{url}/readyz", timeout=10).json() == {"status": "ok"}
    ids = container.exec(["python", "-c", "import os; print(os.getuid(), os.getgid())"])
    assert ids.stdout.split() == DEPLOYMENT_SPEC.user.split(":"), ids
    assert container.inspect()["HostConfig"]["ReadonlyRootfs"] is True
    write = "import sys; open(sys.argv[1], 'w').write('x')"
    for path in ("/home/nextword/probe", "/opt/venv/probe", "/probe"):
        assert container.exec(["python", "-c", write, path]).returncode != 0, path
    assert container.exec(["python", "-c", write, "/tmp/probe"]).returncode == 0


def healthcheck_command(image: dict[str, Any]) -> list[str]:
    """The image's HEALTHCHECK as an argument list for exec."""
    test = image["Config"]["Healthcheck"]["Test"]
    if test[0] == "CMD":
        return list(test[1:])
    assert test[0] == "CMD-SHELL", test
    return ["/bin/sh", "-c", test[1]]


def test_the_healthcheck_passes_inside_the_container(
    image: dict[str, Any], served: tuple[Container, str]
) -> None:
    container, _ = served
    result = container.exec(healthcheck_command(image))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same bundled models served from this checkout, outside any container."""
    if not (BUNDLED_MODELS / "lstm" / "manifest.json").exists():
        pytest.skip("no bundled models in service/models")
    server = LiveServer(BUNDLED_MODELS, tmp_path_factory.mktemp("outside") / "serve.log")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def predict(url: str, text: str) -> dict[str, Any]:
    answer = httpx.post(f"{url}/v1/predict", json={"text": text, "k": K}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def receive(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(ws.recv(timeout=30))


def test_rest_and_websocket_give_the_words_of_the_service_outside(
    served: tuple[Container, str], outside: str
) -> None:
    _, url = served
    inside_models = httpx.get(f"{url}/v1/models", timeout=10).json()
    assert inside_models == httpx.get(f"{outside}/v1/models", timeout=10).json()
    for text in ("", "i am going", TEXT):
        got, want = predict(url, text), predict(outside, text)
        assert got["tokens"] == want["tokens"]
        assert_same_predictions(got["predictions"], want["predictions"])
    words = TEXT.split()
    with connect(f"{url.replace('http', 'ws')}/v1/stream?k={K}", open_timeout=30) as ws:
        assert receive(ws)["type"] == "ready"
        for n, word in enumerate(words):
            ws.send(json.dumps({"text": word, "id": n}))
            answer = receive(ws)
            want = predict(outside, " ".join(words[: n + 1]))
            assert answer["id"] == n and answer["tokens"] == want["tokens"], answer
            assert_same_predictions(answer["predictions"], want["predictions"])


# ---- stopping and failing over -------------------------------------------------


def test_sigterm_while_streaming_answers_everything_closes_1001_and_exits_0(
    engine: ContainerEngine, containers: list[Container]
) -> None:
    # Each step waits up to 150 ms for its batch to fill: SIGTERM lands mid-stream.
    container, url = start(engine, containers, NEXTWORD_MAX_WAIT_MS="150")
    answers: list[dict[str, Any]] = []
    with connect(f"{url.replace('http', 'ws')}/v1/stream", open_timeout=30) as ws:
        assert receive(ws)["type"] == "ready"
        for n in range(20):
            ws.send(json.dumps({"text": "cat", "id": n}))
        time.sleep(0.5)  # a few answered; the rest received and waiting
        container.signal("TERM")  # to PID 1, as the kubelet sends it
        try:
            while True:
                answers.append(receive(ws))
        except ConnectionClosed as closed:
            close = closed.rcvd
        except TimeoutError:
            pytest.fail(f"neither answered nor closed 30 s after SIGTERM: {len(answers)} answers")
    assert [a.get("id") for a in answers] == list(range(20)), answers
    assert all(a["type"] == "predictions" for a in answers), answers
    assert close is not None and close.code == 1001, close
    try:
        status = container.wait(timeout=DEPLOYMENT_SPEC.grace_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {DEPLOYMENT_SPEC.grace_s:.0f} s after SIGTERM (the grace)")
    logs = container.logs()
    assert status == 0, logs[-6000:]
    assert "Traceback" not in logs, logs[-6000:]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    yield from running_redis()


@needs_redis
@pytest.mark.redis
def test_two_containers_on_one_redis_continue_a_session_across_a_kill(
    engine: ContainerEngine,
    containers: list[Container],
    redis_server: RedisServer,
    outside: str,
) -> None:
    store = {"NEXTWORD_SESSION_STORE": redis_server.url, "NEXTWORD_SESSION_STORE_WRITE": "through"}
    first, first_url = start(engine, containers, **store)
    _, second_url = start(engine, containers, **store)
    words = TEXT.split()
    half = len(words) // 2
    with connect(f"{first_url.replace('http', 'ws')}/v1/stream", open_timeout=30) as ws:
        session_id = receive(ws)["session_id"]
        for word in words[:half]:
            ws.send(json.dumps({"text": word}))
            assert receive(ws)["type"] == "predictions"
    first.signal("KILL")  # no drain at all: what Redis holds is all there is
    assert first.wait(timeout=60) != 0

    stream = f"{second_url.replace('http', 'ws')}/v1/stream?session_id={session_id}"
    with connect(stream, open_timeout=30) as ws:
        ready = receive(ws)
        assert ready["type"] == "ready" and ready["tokens"] == half, ready
        for word in words[half:]:
            ws.send(json.dumps({"text": word}))
            answer = receive(ws)
    assert answer["tokens"] == len(words)
    assert_same_predictions(answer["predictions"], predict(outside, TEXT)["predictions"])


# ---- Dockerfile.gpu ----------------------------------------------------------------


def test_the_gpu_images_wheel_stage_builds(engine: ContainerEngine, base: str) -> None:
    """The stage on python:3.11-slim: the project's wheel, as the CUDA stages install it."""
    tag = f"{TAG}-gpu-wheel"
    engine.build(ROOT, DOCKER / "Dockerfile.gpu", tag, target="wheel")
    listing = engine.call(["run", "--rm", "--network", "host", tag, "ls", "/dist"]).stdout
    assert [name for name in listing.split() if name.endswith(".whl")], listing


def test_the_gpu_image_on_its_cuda_base(engine: ContainerEngine, base: str) -> None:
    text = (DOCKER / "Dockerfile.gpu").read_text()
    cuda_image = text.split("ARG CUDA_IMAGE=", 1)[1].split()[0]
    # Never pulled here: the CUDA base is gigabytes, too much to fetch in a test run.
    if not engine.has_image(cuda_image) and not engine.has_image(f"docker.io/{cuda_image}"):
        pytest.skip(f"the CUDA stages need {cuda_image}, which is not here ({engine.name} pull it)")
    tag = f"{TAG}-gpu"
    engine.build(ROOT, DOCKER / "Dockerfile.gpu", tag)
    config = engine.inspect_image(tag)["Config"]
    assert config["User"] == DEPLOYMENT_SPEC.user
    assert "/readyz" in " ".join(config["Healthcheck"]["Test"])
