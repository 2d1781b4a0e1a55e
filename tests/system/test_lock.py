"""The locks in requirements/ (written by `make lock`) against pyproject.toml, offline.

A lock is stale when pyproject.toml declares a requirement it does not pin, or pins
a version the declared specifier no longer allows: run `make lock` and commit the
result. The three locks agree on every version they share, none of them pins a
CUDA torch, and the images' locks carry hashes (the Dockerfiles use --require-hashes).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass

import pytest
import tomllib
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.paths import ROOT as REPO_ROOT

ROOT = REPO_ROOT
LOCKS = ROOT / "requirements"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# runtime*.txt are universal (markers on the pins); dev.txt is resolved for this platform.
DEV_ENV = {
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "python_version": "3.11",
    "python_full_version": "3.11.0",
}
NOT_LOCKED = {"torch"}  # installed by the Makefile from TORCH_SPEC (the CPU build)


@dataclass(frozen=True)
class Pin:
    name: str
    version: Version
    marker: Marker | None
    hashes: int


def read_lock(name: str) -> list[Pin]:
    text = re.sub(r"\\\n", " ", (LOCKS / name).read_text())  # join continued lines
    pins = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-")):
            continue
        requirement = Requirement(line.split(" --hash=")[0].split(" #")[0].strip())
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{name}: {line[:80]} is not an exact pin"
        pins.append(
            Pin(
                canonicalize_name(requirement.name),
                Version(specifier.version),
                requirement.marker,
                line.count("--hash=sha256:"),
            )
        )
    return pins


def runtime_requirements(onnxruntime: str) -> list[Requirement]:
    spec = importlib.util.spec_from_file_location(
        "runtime_requirements", ROOT / "docker" / "runtime_requirements.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines = module.runtime_requirements(ROOT / "pyproject.toml", onnxruntime)
    return [Requirement(line) for line in lines]


def dev_requirements() -> list[Requirement]:
    lines = [*PYPROJECT["dependencies"]]
    for extra in ("train", "dev"):
        lines += PYPROJECT["optional-dependencies"][extra]
    requirements = [Requirement(line) for line in lines]
    return [
        r
        for r in requirements
        if canonicalize_name(r.name) not in NOT_LOCKED
        and (r.marker is None or r.marker.evaluate(DEV_ENV))
    ]


LOCK_INPUTS = {
    "runtime.txt": lambda: runtime_requirements("onnxruntime"),
    "runtime-gpu.txt": lambda: runtime_requirements("onnxruntime-gpu"),
    "dev.txt": dev_requirements,
}


@pytest.mark.parametrize("lock", sorted(LOCK_INPUTS))
def test_lock_pins_every_declared_requirement(lock: str) -> None:
    """Fails when pyproject.toml changed after the last `make lock`."""
    pins = read_lock(lock)
    header = (LOCKS / lock).read_text().splitlines()[:2]
    assert "make lock" in header[1], f"{lock} was not written by `make lock`"
    stale = []
    for requirement in LOCK_INPUTS[lock]():
        name = canonicalize_name(requirement.name)
        versions = [p.version for p in pins if p.name == name]
        if not versions:
            stale.append(f"{requirement} is not pinned")
        for version in versions:  # a universal lock may pin one version per Python range
            if not requirement.specifier.contains(version, prereleases=True):
                stale.append(f"{requirement} does not allow the pinned {name}=={version}")
    assert not stale, f"{lock} is stale against pyproject.toml (run `make lock`): {stale}"


def test_onnxruntime_distribution_per_lock() -> None:
    names = {lock: {p.name for p in read_lock(lock)} for lock in LOCK_INPUTS}
    assert "onnxruntime" in names["runtime.txt"]
    assert "onnxruntime-gpu" not in names["runtime.txt"]
    assert "onnxruntime-gpu" in names["runtime-gpu.txt"]
    assert "onnxruntime" not in names["runtime-gpu.txt"]


def test_no_torch_and_no_cuda_in_the_development_lock() -> None:
    names = {p.name for p in read_lock("dev.txt")}
    assert "torch" not in names
    cuda = sorted(n for n in names if n == "triton" or n.startswith(("nvidia-", "cuda-")))
    assert not cuda, f"dev.txt pins CUDA packages (resolved against a CUDA torch?): {cuda}"
    for lock in ("runtime.txt", "runtime-gpu.txt"):
        assert "torch" not in {p.name for p in read_lock(lock)}


@pytest.mark.parametrize("lock", ["runtime.txt", "runtime-gpu.txt"])
def test_image_locks_carry_hashes(lock: str) -> None:
    unhashed = [f"{p.name}=={p.version}" for p in read_lock(lock) if p.hashes == 0]
    assert not unhashed, f"{lock}: no hash for {unhashed} (the images use --require-hashes)"


def test_locks_agree_on_shared_versions() -> None:
    """Each lock is resolved within the ones before it: a shared package has one version."""

    def versions(lock: str, env: dict[str, str] | None) -> dict[str, Version]:
        return {
            p.name: p.version
            for p in read_lock(lock)
            if env is None or p.marker is None or p.marker.evaluate(env)
        }

    for env in (DEV_ENV, {**DEV_ENV, "python_version": "3.12", "python_full_version": "3.12.0"}):
        cpu, gpu = versions("runtime.txt", env), versions("runtime-gpu.txt", env)
        shared = cpu.keys() & gpu.keys()
        assert {n: cpu[n] for n in shared} == {n: gpu[n] for n in shared}
    dev, gpu = versions("dev.txt", None), versions("runtime-gpu.txt", DEV_ENV)
    differ = {n: (gpu[n], dev[n]) for n in dev.keys() & gpu.keys() if gpu[n] != dev[n]}
    assert not differ, f"runtime-gpu.txt and dev.txt disagree: {differ}"


def test_installs_use_the_locks() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "install --require-hashes -r $(RUNTIME_LOCK)" in makefile
    assert "install --require-hashes -r $(LOCK)/dev.txt" in makefile
    assert 'install --no-deps -e ".[train,dev]"' in makefile
    for dockerfile, lock in (("Dockerfile", "runtime.txt"), ("Dockerfile.gpu", "runtime-gpu.txt")):
        text = (ROOT / "docker" / dockerfile).read_text()
        assert re.search(rf"^COPY requirements/{re.escape(lock)} ", text, re.M), dockerfile
        assert "--require-hashes -r requirements.txt" in text, dockerfile
