"""CPU seconds spent by process trees and by the whole machine (Linux /proc, via psutil)."""

from __future__ import annotations

import os
from pathlib import Path

import psutil

TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(process: psutil.Process) -> float:
    """User + system CPU seconds of one process (all its threads); 0 once it is gone."""
    try:
        times = process.cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants, as they are now."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores, /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / TICKS
