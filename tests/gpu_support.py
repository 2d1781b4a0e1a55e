"""Run tests on CPU and, where a CUDA GPU is really usable, on CUDA too.

    from tests.gpu_support import provider_params, providers_for

    @pytest.fixture(params=provider_params())
    def provider(request): return request.param  # "cpu", or "cuda" (marked `gpu`)

The "cuda" parameter carries the `gpu` marker (select with `-m gpu`, leave out with
`-m "not gpu"`) and is skipped, with a reason, where no usable CUDA GPU is found.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# A small real artifact that is always there (the fixture's tiny ones are built later,
# after collection, where skip conditions are evaluated).
PROBE_MODEL = Path(__file__).resolve().parent.parent / "service" / "models" / "gru" / "model.onnx"
NO_CUDA = "no usable CUDA GPU (onnxruntime lacks CUDAExecutionProvider or fell back to CPU)"


@functools.cache
def cuda_usable(onnx_path: Path = PROBE_MODEL) -> bool:
    """True only when onnxruntime lists CUDA and a session on `onnx_path` really gets it.

    onnxruntime-gpu lists CUDAExecutionProvider wherever it is installed, and falls back
    to CPU silently when the CUDA libraries or a GPU are missing: only a session says.
    """
    import onnxruntime as ort

    from service.engine.runtime import check_cuda

    if not check_cuda().usable:  # the service's own quiet check: driver, device, libraries
        return False
    ort.set_default_logger_severity(4)  # the failed CUDA load is logged at error level
    try:
        session = ort.InferenceSession(str(onnx_path), providers=[CUDA, CPU])
    except Exception:
        return False
    finally:
        ort.set_default_logger_severity(2)
    return session.get_providers()[0] == CUDA


def providers_for(name: str) -> list[str]:
    """The execution providers an OrtModel is given for a "cpu" or "cuda" parameter."""
    return {"cpu": [CPU], "cuda": [CUDA, CPU]}[name]


def cuda_param() -> Any:
    """The "cuda" parameter: marked `gpu`, skipped without a usable CUDA GPU."""
    return pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not cuda_usable(), reason=NO_CUDA)]
    )


def provider_params(cpu: bool = True) -> list[Any]:
    """["cpu", <cuda param>], or the cuda one alone with cpu=False."""
    return (["cpu"] if cpu else []) + [cuda_param()]
