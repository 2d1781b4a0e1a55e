"""Run a measurement in another checkout's code: old and new code in processes of their own."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path


def last_line(
    checkout: Path,
    args: Sequence[str],
    *,
    path: Sequence[Path] = (),
    env: Mapping[str, str] | None = None,
) -> str:
    """`python ARGS` run in `checkout` with its code first on the import path (then `path`):
    the last line it printed. A failure raises, with the end of what it wrote to stderr."""
    pythonpath = os.pathsep.join(str(p) for p in (checkout, *path))
    done = subprocess.run(
        [sys.executable, *args],
        cwd=checkout,  # `-m` and `-c` put the working directory first on the path
        env={**os.environ, **(env or {}), "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{checkout}: {' '.join(args[:2])} failed:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]
