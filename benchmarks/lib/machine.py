"""What a benchmark ran on: the machine and the versions, as data and as a table header."""

from __future__ import annotations

import importlib
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (the machine type where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (its affinity), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def version(module: str) -> str:
    """A module's version, or "not installed"."""
    try:
        return str(getattr(importlib.import_module(module), "__version__", "?"))
    except ImportError:
        return "not installed"


def machine(modules: Sequence[str]) -> dict[str, object]:
    """CPU, cores, load and the versions of `modules`."""
    return {
        "cpu": cpu_model(),
        "nproc": usable_cores(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **{name: version(name) for name in modules},
    }


def machine_lines(info: dict[str, object], modules: Sequence[str]) -> list[str]:
    """The header every table starts with."""
    return [
        f"machine: {info['cpu']}, nproc {info['nproc']} (cpu_count {info['cpu_count']}), "
        f"load average {info['load_average_1m']} at start, {info['platform']}",
        "versions: Python "
        + str(info["python"])
        + ", "
        + ", ".join(f"{name} {info[name]}" for name in modules),
    ]


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """How this run was started, as `python -m benchmarks.<name> ARGS`."""
    args = list(argv) if argv is not None else sys.argv[1:]
    return " ".join(["python", "-m", module, *args])
