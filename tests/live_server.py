"""`nextword serve` as a subprocess on a loopback port, for tests that need a real server.

Unlike a TestClient, the server can be stopped and started again on the same port (a
restart, as a browser or a client sees it). It is the benchmarks' launcher
(`benchmarks.lib.server.ServerProcess`) with the service's command and settings, and test
failures instead of exceptions.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks.lib.server import ServerFailed, ServerProcess
from tests.paths import BUNDLED_MODELS, ROOT
from tests.redis_server import free_port

__all__ = ["BUNDLED_MODELS", "ROOT", "LiveServer"]


class LiveServer(ServerProcess):
    """`python -m service --port P` over `models`, in its own process group, logging to
    `log_path` (appended to across restarts)."""

    def __init__(
        self, models: Path, log_path: Path, *, port: int | None = None, workers: int = 1, **env: str
    ) -> None:
        port = port or free_port()
        super().__init__(
            "nextword",
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
            {
                "NEXTWORD_MODELS_DIR": str(models),
                "NEXTWORD_PROVIDERS": "CPUExecutionProvider",
                "NEXTWORD_INTRA_OP_THREADS": "1",
                "NEXTWORD_WORKERS": str(workers),
                **env,
            },
            port=port,
            cwd=ROOT,
            log=log_path,
            group=True,
        )
        self.log_path = log_path

    def start(self, timeout: float = 90.0) -> LiveServer:  # type: ignore[override]
        """Start and wait until `/readyz` answers 200 (a test failure otherwise)."""
        super().start()
        try:
            self.wait_ready(timeout)
        except ServerFailed as exc:
            pytest.fail(str(exc))
        return self

    def stop(self, timeout: float = 40.0) -> int | None:  # type: ignore[override]
        """SIGTERM to the whole process group (it drains); a test failure if it hangs. The
        exit status (None when not running)."""
        if self.proc is None:
            return None
        self.stop_timeout_s = timeout
        status = super().stop()
        self.proc = None
        if self.timed_out:
            pytest.fail(f"did not stop on SIGTERM:\n{self.log()}")
        return status

    def log(self) -> str:  # type: ignore[override]
        """Everything the server printed so far."""
        return self.log_path.read_text() if self.log_path.exists() else ""
