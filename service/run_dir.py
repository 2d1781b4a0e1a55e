"""The run folder of one `nextword serve`: the engine's sockets and the metrics files.

A supervisor removes its folder when it exits; one that was killed (SIGKILL, the machine's
OOM killer) cannot, so every folder holds a lock file locked for the supervisor's life
(the kernel releases the lock when the process dies, however it dies). At start, a
supervisor removes the folders of this user whose lock nobody holds: those of supervisors
that are gone. A folder whose lock file is younger than `GRACE_S` is left alone (its
supervisor may be between creating the file and locking it).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

PREFIX = "nextword-"
LOCK = "supervisor.lock"
GRACE_S = 10.0


class RunDir:
    """A new run folder, locked while this object is open."""

    def __init__(self, root: str | None = None) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=root))
        self._lock: IO[bytes] | None = (self.path / LOCK).open("wb")
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._lock.write(b"%d\n" % os.getpid())
        self._lock.flush()

    def remove(self) -> None:
        """Remove the folder and release its lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def remove_stale(root: str | None = None, now: float | None = None) -> list[Path]:
    """Remove this user's run folders left by supervisors that are gone; the paths removed."""
    root_path = Path(root or tempfile.gettempdir())
    now = time.time() if now is None else now
    removed = []
    uid = os.getuid()
    for path in root_path.glob(PREFIX + "*"):
        lock_path = path / LOCK
        try:
            if path.is_symlink() or path.lstat().st_uid != uid:
                continue
            if now - lock_path.stat().st_mtime < GRACE_S:
                continue
            with lock_path.open("rb") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its supervisor lives
                shutil.rmtree(path, ignore_errors=True)
        except OSError:  # no lock file (not ours, or older), or gone meanwhile
            continue
        removed.append(path)
    if removed:
        log.info("removed %d run folder(s) of supervisors that were killed", len(removed))
    return removed
