"""Operating-system names for the engine's threads.

Python names its threads for Python only: `top -H`, /proc/<pid>/task/<tid>/comm and a
profiler's per-thread CPU all read "python" for each of them. The engine process names
the threads that share its work, so that its CPU can be split by what each one does
(`benchmarks/bench_e2e.py` reads /proc):

    (the process's own id)  the event loop: intake, scheduling, store, answers
    nw-run-<model>          a model's runs (the scheduler's executor): ONNX Runtime, adaptation
    nw-input                frames received from the API processes and decoded
    nw-control              the supervisor's control pipe (idle)
    ZMQbg/...               ZeroMQ's own I/O threads (named by libzmq)
    python                  what is left: ONNX Runtime's intra-op pool threads

A name is at most 15 bytes (the kernel's limit); longer ones are cut.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_PR_SET_NAME = 15  # prctl(2)
_LIBC = (
    ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None
)


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` at the OS level (Linux; elsewhere nothing)."""
    if _LIBC is None:
        return
    _LIBC.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
