"""`nextword serve` as a subprocess on a loopback port, for tests that need a real server.

Unlike a TestClient, the server can be stopped and started again on the same port (a
restart, as a browser or a client sees it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MODELS = ROOT / "service" / "models"


class LiveServer:
    """`python -m service --port P` in its own process group, logging to a file."""

    def __init__(
        self, models: Path, log_path: Path, *, port: int | None = None, workers: int = 1, **env: str
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {
            **os.environ,
            "NEXTWORD_MODELS_DIR": str(models),
            "NEXTWORD_PROVIDERS": "CPUExecutionProvider",
            "NEXTWORD_INTRA_OP_THREADS": "1",
            "NEXTWORD_WORKERS": str(workers),
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> LiveServer:
        """Start and wait until `/readyz` answers 200."""
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited:\n{self.log()}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"not ready after {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 40.0) -> None:
        """SIGTERM to the whole process group (it drains), SIGKILL if it hangs."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                pytest.fail(f"did not stop on SIGTERM:\n{self.log()}")
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""
