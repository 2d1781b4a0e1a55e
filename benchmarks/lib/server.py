"""Servers a benchmark drives: a subprocess on a free loopback port, and a redis-server.

    with ServerProcess("service", [sys.executable, "-m", "service"], env, port=port) as server:
        ...  # started, and /readyz answered 200; stopped with SIGTERM on exit

Several servers can start side by side: `start()` each, then `wait_ready()` each. The
tests' `tests.live_server.LiveServer` is this class too (one launcher for both).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType

import psutil

ROOT = Path(__file__).resolve().parent.parent.parent
STOP_TIMEOUT_S = 30.0  # the service drains its streams on SIGTERM first


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status code of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, urllib.error.URLError):
        return None


class ServerFailed(RuntimeError):
    """A server exited or never became ready; the message ends with its log."""


class ServerProcess:
    """A server subprocess (run from the repository root) listening on 127.0.0.1:`port`.

    Ready once GET `ready_path` answers 200 and `ready` (if given) returns True; stopped
    with SIGTERM (a graceful drain), SIGKILL to the whole tree after `stop_timeout_s`.
    Its output goes to `log_file` (in `log_dir`, or the system's temp directory; `log` names
    the file itself, appended to). With `group`, it runs in a process group of its
    own and the signals go to the whole group (a supervisor and its children at once).
    """

    def __init__(
        self,
        name: str,
        command: list[str],
        env: dict[str, str] | None = None,
        *,
        port: int,
        ready_path: str = "/readyz",
        ready: Callable[[], bool] | None = None,
        log_dir: Path | None = None,
        cwd: Path | None = None,
        log: Path | None = None,
        group: bool = False,
        stop_timeout_s: float = STOP_TIMEOUT_S,
    ) -> None:
        self.name = name
        self.cwd = cwd or ROOT  # another checkout's root runs that checkout's code
        self.command = command
        self.env = env or {}
        self.port = port
        self.ready_path = ready_path
        self.ready = ready
        slug = "".join(c if c.isalnum() else "_" for c in name)
        self.log_file = (
            log or (log_dir or Path(os.environ.get("TMPDIR", "/tmp"))) / f"{slug}-{port}.log"
        )
        self._append = log is not None  # a log named by the caller survives restarts
        self.group = group
        self.stop_timeout_s = stop_timeout_s
        self.timed_out = False  # the last `stop` had to kill: no exit after SIGTERM
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The server's (top) process id."""
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def url(self) -> str:
        """http://127.0.0.1:port"""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the process (no waiting)."""
        with self.log_file.open("ab" if self._append else "wb") as out:
            self.proc = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=self.group,
            )

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's output."""
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Poll until ready; raise `ServerFailed` if it exits or is not ready in time."""
        assert self.proc is not None, "not started"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(
                    f"{self.name}: exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if http_status(self.url + self.ready_path) == 200 and (
                self.ready is None or self.ready()
            ):
                return
            time.sleep(0.1)
        raise ServerFailed(f"{self.name}: not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def signal(self, signum: int) -> None:
        """Send `signum` to the server (to its whole group with `group`)."""
        assert self.proc is not None, "not started"
        if self.group:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)
        else:
            self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL (the whole group with `group`): no shutdown at all."""
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> int | None:
        """SIGTERM and wait; SIGKILL the whole tree after `stop_timeout_s`. The exit status."""
        self.timed_out = False
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                tree = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.Error:
                tree = []
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                print(
                    f"{self.name}: no exit {self.stop_timeout_s:.0f} s after SIGTERM; killing it",
                    file=sys.stderr,
                )
                self.timed_out = True
                self.kill()
            for child in tree:  # whatever outlived its parent
                with suppress(psutil.Error):
                    child.kill()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def redis_version() -> str | None:
    """The installed redis-server's version, or None without one."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    field = next((f for f in out.split() if f.startswith("v=")), "v=?")
    return field[2:]


@contextmanager
def redis_server() -> Iterator[tuple[str, int]]:
    """A throwaway redis-server on a free loopback port (no persistence): (URL, pid)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("no redis-server binary")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--loglevel",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer on port {port}")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0", proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
