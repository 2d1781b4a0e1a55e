"""Run folders of `nextword serve` (service/run_dir.py): a killed supervisor's folder is
removed by the next start, a living one's never."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

from service.run_dir import GRACE_S, LOCK, PREFIX, RunDir, remove_stale
from tests.live_server import LiveServer


def later() -> float:
    """A time past the grace of a folder made just now."""
    return time.time() + 2 * GRACE_S


def killed_supervisor_folder(root: Path) -> Path:
    """A run folder made (and locked) by a process that was then SIGKILLed."""
    code = (
        "import sys, time; from service.run_dir import RunDir; "
        f"print(RunDir({str(root)!r}).path, flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    path = Path(child.stdout.readline().strip())
    child.kill()
    child.wait()
    return path


def test_a_killed_supervisors_folder_is_removed_and_a_living_ones_kept(tmp_path: Path) -> None:
    living = RunDir(str(tmp_path))
    try:
        dead = killed_supervisor_folder(tmp_path)
        (dead / "metrics").mkdir()
        (dead / "metrics" / "counter_1.db").write_bytes(b"x")
        unlocked = tmp_path / f"{PREFIX}older"  # no lock file: not known to be ours
        unlocked.mkdir()
        assert remove_stale(str(tmp_path), now=later()) == [dead]
        assert not dead.exists() and living.path.exists() and unlocked.exists()
    finally:
        living.remove()
    assert not living.path.exists()


def test_a_folder_younger_than_the_grace_is_left(tmp_path: Path) -> None:
    dead = killed_supervisor_folder(tmp_path)
    assert (dead / LOCK).exists()
    assert remove_stale(str(tmp_path)) == []  # just made: its maker may not hold it yet
    assert remove_stale(str(tmp_path), now=later()) == [dead]


def test_the_next_serve_removes_the_folder_of_a_killed_one(
    tiny_artifacts: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    first = LiveServer(tiny_artifacts, tmp_path / "first.log", TMPDIR=str(runs)).start()
    assert first.proc is not None
    (left,) = runs.glob(f"{PREFIX}*")
    os.kill(first.proc.pid, signal.SIGKILL)  # the supervisor alone: it cannot clean up
    first.proc.wait()
    with suppress(ProcessLookupError):  # its children stop on their own too; sooner
        os.killpg(first.proc.pid, signal.SIGTERM)
    assert left.exists()
    old = time.time() - 2 * GRACE_S
    os.utime(left / LOCK, (old, old))
    second = LiveServer(tiny_artifacts, tmp_path / "second.log", TMPDIR=str(runs)).start()
    try:
        assert not left.exists()
        assert len(list(runs.glob(f"{PREFIX}*"))) == 1  # its own
    finally:
        second.stop()
    assert list(runs.glob(f"{PREFIX}*")) == []
