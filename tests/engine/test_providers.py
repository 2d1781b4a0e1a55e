"""Choosing ONNX Runtime's providers: the quiet CUDA check, "auto" and an explicit CUDA.

The probe is exercised with a stand-in for the dynamic loader (each way a machine can lack
CUDA, and one where everything loads); `check_cuda` runs the real probe in its child
process; the start of a real `nextword serve` on this machine shows what a newcomer sees.
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.config import Settings
from service.engine import core, cuda_probe, runtime
from service.engine.runtime import CPU, CUDA, CudaCheck, check_cuda, choose_providers
from tests.live_server import BUNDLED_MODELS, ROOT, LiveServer

ORT_NOISE = (
    "[ONNXRuntimeError]",
    "Failed to load library",
    "Failed to create CUDAExecutionProvider",
)


@pytest.fixture(autouse=True)
def fresh_check() -> Iterator[None]:
    """Each test sees its own machine: the once-per-process answer is forgotten."""
    check_cuda.cache_clear()
    yield
    check_cuda.cache_clear()


class FakeDriver:
    """libcuda.so.1's three calls the check makes, answering as told."""

    def __init__(self, init: int = 0, devices: int = 1) -> None:
        self.init, self.devices = init, devices

    def cuInit(self, flags: int) -> int:
        return self.init

    def cuDeviceGetCount(self, count: Any) -> int:
        count._obj.value = self.devices
        return 0

    def cuGetErrorName(self, status: int, name: Any) -> int:
        name._obj.value = {100: b"CUDA_ERROR_NO_DEVICE"}.get(status, b"")
        return 0


def fake_loader(
    monkeypatch: pytest.MonkeyPatch, driver: FakeDriver | None, missing: str | None = None
) -> list[str]:
    """Replace ctypes.CDLL: the driver is `driver` (None: absent), the library whose name
    ends with `missing` fails as the loader says; returns the names loaded, in order."""
    loaded: list[str] = []

    def load(name: str, mode: int = 0) -> Any:
        if name == "libcuda.so.1":
            if driver is None:
                raise OSError(f"{name}: cannot open shared object file: No such file or directory")
            return driver
        if missing is not None and name.endswith(missing):
            raise OSError(f"{missing}: cannot open shared object file: No such file or directory")
        loaded.append(Path(name).name)
        return object()

    monkeypatch.setattr(ctypes, "CDLL", load)
    return loaded


def machine(monkeypatch: pytest.MonkeyPatch, usable: bool, reason: str = "") -> None:
    """onnxruntime-gpu on a machine whose probe answers (usable, reason)."""
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(runtime, "check_cuda", lambda: CudaCheck(usable, reason))


NO_DRIVER = "no NVIDIA driver (libcuda.so.1 not found)"


def test_no_driver_means_no_cuda_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_loader(monkeypatch, driver=None)
    assert cuda_probe.probe("/capi") == (False, NO_DRIVER)


def test_a_driver_without_a_device_means_no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_loader(monkeypatch, FakeDriver(init=100))
    assert cuda_probe.probe("/capi") == (False, "no CUDA device (CUDA_ERROR_NO_DEVICE)")
    fake_loader(monkeypatch, FakeDriver(devices=0))
    assert cuda_probe.probe("/capi") == (False, "no CUDA device")


def test_a_missing_cuda_library_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    # The loader fails on the provider when a library it links is missing.
    fake_loader(monkeypatch, FakeDriver(), missing="libonnxruntime_providers_cuda.so")
    usable, reason = cuda_probe.probe("/capi")
    assert not usable
    assert reason.startswith("CUDA libraries missing: libonnxruntime_providers_cuda.so")
    fake_loader(monkeypatch, FakeDriver(), missing="libcudnn.so.9")
    assert cuda_probe.probe("/capi") == (
        False,
        "CUDA libraries missing: libcudnn.so.9: cannot open shared object file: "
        "No such file or directory",
    )


def test_everything_loadable_means_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = fake_loader(monkeypatch, FakeDriver(devices=2))
    assert cuda_probe.probe("/capi") == (True, "")
    # The host interface first (the provider takes it at load time), then the provider.
    assert loaded == [
        "libonnxruntime_providers_shared.so",
        "libonnxruntime_providers_cuda.so",
        "libcudnn.so.9",
    ]


def test_the_check_runs_the_probe_in_a_child_and_keeps_its_answer() -> None:
    # This machine, as the probe's own process sees it; whatever the libraries print stays
    # in the child.
    import onnxruntime as ort

    cuda = check_cuda()
    assert check_cuda() is cuda  # once per process
    if CUDA not in ort.get_available_providers():
        assert cuda == CudaCheck(False, "this onnxruntime build has no CUDA provider")
    else:
        assert cuda == CudaCheck(*cuda_probe.probe(runtime._CAPI_DIR))


def test_auto_is_cuda_first_only_where_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    machine(monkeypatch, usable=True)
    assert choose_providers("auto") == [CUDA, CPU]
    assert choose_providers("cuda,cpu") == [CUDA, CPU]
    machine(monkeypatch, usable=False, reason=NO_DRIVER)
    assert choose_providers("auto") == [CPU]


def test_a_build_without_cuda_is_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [CPU])
    assert check_cuda() == CudaCheck(False, "this onnxruntime build has no CUDA provider")
    assert choose_providers("auto") == [CPU]


def test_cuda_named_where_it_is_unusable_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    machine(monkeypatch, usable=False, reason=NO_DRIVER)
    for setting in ("cuda", "CUDAExecutionProvider", "cuda, cpu"):
        with pytest.raises(ValueError, match="not usable here: no NVIDIA driver"):
            choose_providers(setting)
    assert choose_providers("cpu") == [CPU]  # CPU named alone needs no GPU


def test_one_line_per_model_says_where_it_runs_and_why_not_cuda(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tiny_artifacts: Path
) -> None:
    machine(monkeypatch, usable=False, reason=NO_DRIVER)
    settings = Settings(models_dir=tiny_artifacts, providers="auto", state_pool=False)
    with caplog.at_level(logging.INFO, logger="service.engine.core"):
        models = core.load_models(settings)
    lines = [r.getMessage() for r in caplog.records if "runs on" in r.getMessage()]
    assert sorted(lines) == [
        f"model {name} ({models[name].cell}) runs on {CPU}; CUDA not used: {NO_DRIVER}"
        for name in sorted(models)
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records if "runs on" in r.getMessage())


def test_a_cuda_session_that_falls_back_fails_an_explicit_start(
    monkeypatch: pytest.MonkeyPatch, tiny_artifacts: Path
) -> None:
    # The check passes but ONNX Runtime still starts on CPU (an unsupported GPU, say).
    monkeypatch.setattr(core, "choose_providers", lambda setting: [CUDA, CPU])
    real = runtime.ort.InferenceSession
    monkeypatch.setattr(
        runtime.ort,
        "InferenceSession",
        lambda path, options, providers: real(path, options, providers=[CPU]),
    )
    explicit = Settings(models_dir=tiny_artifacts, providers="cuda", state_pool=False)
    with pytest.raises(ValueError, match="could not start its CUDA provider"):
        core.load_models(explicit)
    auto = Settings(models_dir=tiny_artifacts, providers="auto", state_pool=False)
    models = core.load_models(auto)  # "auto" falls back, and the pool would ask for CPU only
    assert all(model.providers == [CPU] and model.cuda_fallback for model in models.values())


@pytest.mark.slow
def test_a_first_start_prints_no_onnx_runtime_error(tmp_path: Path) -> None:
    # What `make serve` runs, with its default "auto", on this machine: whether or not
    # CUDA is usable here, the console carries no ONNX Runtime error block.
    server = LiveServer(BUNDLED_MODELS, tmp_path / "serve.log", NEXTWORD_PROVIDERS="auto")
    try:
        server.start()
    finally:
        server.stop()
    log = server.log()
    for noise in ORT_NOISE:
        assert noise not in log, log
    cuda = check_cuda()
    for name in ("gru", "lstm"):
        line = next(line for line in log.splitlines() if f"model {name} ({name}) runs on" in line)
        assert (CUDA in line) == cuda.usable, line
        if not cuda.usable:
            assert f"CUDA not used: {cuda.reason}" in line


def test_an_explicit_cuda_without_a_gpu_stops_the_start_clearly(tmp_path: Path) -> None:
    cuda = check_cuda()
    if cuda.usable:
        pytest.skip("CUDA is usable here: an explicit cuda starts")
    done = subprocess.run(
        [sys.executable, "-m", "service", "--port", "1"],
        cwd=ROOT,
        env={"NEXTWORD_PROVIDERS": "cuda", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert done.stdout == ""
    assert done.stderr.strip() == (
        f"nextword: NEXTWORD_PROVIDERS: providers 'cuda' ask for CUDA, which is not usable "
        f'here: {cuda.reason} (use "auto" to fall back to CPU)'
    )


# A stand-in NVIDIA driver that reports one device: with it, the probe goes on to the CUDA
# provider's real libraries, which this machine lacks (the case of the noisy first start).
FAKE_DRIVER_C = """
int cuInit(unsigned int flags) { return 0; }
int cuDeviceGetCount(int *count) { *count = 1; return 0; }
int cuGetErrorName(int status, const char **name) { *name = 0; return 0; }
"""


@pytest.fixture
def driver_without_cuda_libraries(tmp_path: Path) -> Path:
    """A directory holding a fake libcuda.so.1, for LD_LIBRARY_PATH."""
    import onnxruntime as ort

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build a stand-in driver")
    if CUDA not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider to probe")
    if check_cuda().usable:
        pytest.skip("a real GPU is usable here")
    check_cuda.cache_clear()
    (tmp_path / "cuda.c").write_text(FAKE_DRIVER_C)
    subprocess.run(
        [
            compiler,
            "-shared",
            "-fPIC",
            "-o",
            str(tmp_path / "libcuda.so.1"),
            str(tmp_path / "cuda.c"),
        ],
        check=True,
        timeout=120,
    )
    return tmp_path


def test_a_device_without_the_cuda_libraries_is_named_by_the_loader(
    monkeypatch: pytest.MonkeyPatch, driver_without_cuda_libraries: Path
) -> None:
    monkeypatch.setenv("LD_LIBRARY_PATH", str(driver_without_cuda_libraries))
    cuda = check_cuda()
    assert not cuda.usable
    assert cuda.reason.startswith("CUDA libraries missing: lib")
    assert "cannot open shared object file" in cuda.reason


@pytest.mark.slow
def test_a_device_without_the_cuda_libraries_starts_quietly_on_cpu(
    tmp_path: Path, driver_without_cuda_libraries: Path
) -> None:
    server = LiveServer(
        BUNDLED_MODELS,
        tmp_path / "serve.log",
        NEXTWORD_PROVIDERS="auto",
        LD_LIBRARY_PATH=str(driver_without_cuda_libraries),
    )
    try:
        server.start()
    finally:
        server.stop()
    log = server.log()
    for noise in ORT_NOISE:
        assert noise not in log, log
    line = next(line for line in log.splitlines() if "model lstm (lstm) runs on" in line)
    assert f"runs on {CPU}; CUDA not used: CUDA libraries missing: lib" in line
