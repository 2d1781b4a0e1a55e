"""Can ONNX Runtime's CUDA provider run here? Asked of the driver and the dynamic loader,
never of ONNX Runtime, in a process of its own:

    python service/engine/cuda_probe.py CAPI_DIR      prints {"usable": bool, "reason": str}

onnxruntime-gpu lists CUDAExecutionProvider wherever it is installed, and a session that
asks for it on a machine without a GPU prints several error blocks before it falls back to
CPU. The probe checks, in order: the NVIDIA driver (`libcuda.so.1`) loads and sees a
device; the CUDA provider's library in onnxruntime's `capi` directory loads, with the CUDA
libraries it links (the loader's message names the first one missing); cuDNN loads. It
runs in a child process (`service.engine.runtime.check_cuda`) so that loading the provider
outside ONNX Runtime, and whatever those libraries print, stay out of the service. This
module imports nothing but the standard library: it starts in a few milliseconds.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

DRIVER_LIB = "libcuda.so.1"
SHARED_PROVIDER_LIB = "libonnxruntime_providers_shared.so"
CUDA_PROVIDER_LIB = "libonnxruntime_providers_cuda.so"
CUDNN_LIB = "libcudnn.so.9"  # onnxruntime-gpu 1.19+ is built against cuDNN 9


def probe(capi_dir: str) -> tuple[bool, str]:
    """(usable, why not) for the CUDA provider of the onnxruntime whose `capi` is given."""
    try:
        driver = ctypes.CDLL(DRIVER_LIB)
    except OSError:
        return False, f"no NVIDIA driver ({DRIVER_LIB} not found)"
    status = driver.cuInit(0)
    count = ctypes.c_int(0)
    if status == 0:
        status = driver.cuDeviceGetCount(ctypes.byref(count))
    if status != 0:
        name = ctypes.c_char_p()
        driver.cuGetErrorName(status, ctypes.byref(name))
        return False, f"no CUDA device ({(name.value or b'').decode() or f'error {status}'})"
    if count.value == 0:
        return False, "no CUDA device"
    try:
        # The provider takes its host interface from the shared library at load time:
        # ONNX Runtime loads that one globally first, and so does this.
        ctypes.CDLL(os.path.join(capi_dir, SHARED_PROVIDER_LIB), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(os.path.join(capi_dir, CUDA_PROVIDER_LIB))
        ctypes.CDLL(CUDNN_LIB)
    except OSError as exc:
        return False, f"CUDA libraries missing: {exc}"
    return True, ""


def main(argv: list[str]) -> int:
    usable, reason = probe(argv[0])
    print(json.dumps({"usable": usable, "reason": reason}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
