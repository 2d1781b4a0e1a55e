"""`nextword serve`: one engine process, N API processes, and this process watching them.

    supervisor (this process)    binds the port, starts and watches the others; ready only
       │                         when all are up; SIGTERM/SIGINT: drain, then exit
       ├── engine process        models, schedulers, every session's state (service.engine.proc)
       └── API process x N       uvicorn + FastAPI on the shared listening socket (service.api.process)

Control. Each child has a pipe to the supervisor and ignores SIGINT and SIGTERM itself, so a
signal to the whole process group (Ctrl-C, `kill -TERM -PGID`) stops the service once, in
order: the API processes first (each stops accepting, answers every message it has received,
closes its WebSockets with 1001 and waits for its HTTP requests), then the engine (which
answers every step it has received). A child whose pipe closes (the supervisor was killed)
stops by itself.

Failures. An API process that dies is replaced (readiness is false until its replacement is
up); one that keeps dying at start stops the service. An engine process that dies is restarted
in place, with back-off (at once, then 0.5, 1, 2, 4... s, at most 10): readiness is false
until it is up again (liveness stays true), the API processes keep their connections and
reconnect to it (`service.engine.client.ZmqClient`), and steps pending or arriving meanwhile
are answered `engine_restarting`. The sessions it held survive with Redis and are lost with
the memory store. More than `engine_restarts` deaths within `engine_restart_window_s` stop
the service with exit status 1 and an error naming them (no silent half-service).

Metrics. Every process writes prometheus_client's multiprocess files into one directory, so
`/metrics` on any API process shows all of them (engine batches and queue, every API
process's requests). The run folder (those files, the engine's sockets) is removed at exit,
or, when this process was killed, by the next `nextword serve` (`service.run_dir`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any

import uvicorn

from service.api.process import STOP, STOP_TIMEOUT_S, UP, ApiLink, run_api
from service.config import Settings
from service.run_dir import RunDir
from service.run_dir import remove_stale as remove_stale_run_dirs

log = logging.getLogger(__name__)

ENGINE_START_TIMEOUT_S = 300.0  # loading and verifying every model (and a CUDA context)
API_START_TIMEOUT_S = 120.0
CRASH_LOOP = (5, 60.0)  # this many API process deaths within this many seconds: give up
ENGINE_BACKOFF_S = (0.5, 10.0)  # delay before the 2nd restart in a window, doubling up to max


# --- the engine process side -----------------------------------------------------------


def run_engine_process(
    settings: Settings, address: str, control: Connection, restart: bool = False
) -> None:
    """Entry point of the engine process: serve until the supervisor says stop (`restart`:
    this process replaces one that died, counted in `nextword_engine_restarts_total`)."""
    from service.engine.proc import run_engine

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    if restart:
        from service import metrics

        metrics.ENGINE_RESTARTS.inc()
    run_engine(settings, address, control)


def restart_delay(deaths: int) -> float:
    """Seconds before restarting an engine that died for the `deaths`-th time in the window."""
    if deaths <= 1:
        return 0.0  # a single crash: back as fast as the models load
    first, most = ENGINE_BACKOFF_S
    return float(min(first * 2 ** (deaths - 2), most))


def describe_exit(code: int | None) -> str:
    """An exit code as people read it: "exit code 1", or "killed by SIGKILL"."""
    if code is not None and code < 0:
        with suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


# --- the supervisor --------------------------------------------------------------------


@dataclass
class Child:
    """A process started by the supervisor, with its control pipe."""

    name: str
    process: SpawnProcess
    control: Connection
    started_at: float
    up: bool = False

    def stop(self) -> None:
        """Ask the child to stop (it drains first)."""
        with suppress(OSError, ValueError):
            self.control.send(STOP)


class Supervisor:
    """Starts, watches and stops the engine and API processes of one `nextword serve`."""

    def __init__(self, settings: Settings, config: uvicorn.Config) -> None:
        self.settings = settings
        self.config = config
        self.context = multiprocessing.get_context("spawn")
        self.run_dir = Path()
        self.address = ""
        self.all_up = self.context.Event()
        self.stopping = threading.Event()
        self.engine: Child | None = None
        self.apis: list[Child] = []
        self.deaths: list[float] = []
        self.engine_deaths: list[float] = []
        self.engine_down_since: float | None = None  # the engine died and is not up again
        self.engine_restart_at = 0.0  # when the next engine starts (while self.engine is None)
        self.socket: socket.socket | None = None

    def run(self) -> int:
        """Serve until SIGINT/SIGTERM (0) or a failure that stops the service (1)."""
        remove_stale_run_dirs()  # left by a supervisor that was killed
        run_dir = RunDir()
        self.run_dir = run_dir.path
        self.address = f"ipc://{self.run_dir}/engine"
        metrics_dir = self.run_dir / "metrics"
        metrics_dir.mkdir()
        # Read by prometheus_client when each child imports it, and by /metrics.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        os.environ["NEXTWORD_ENGINE_ADDRESS"] = self.address
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda signum, frame: self.stopping.set())
        try:
            return self._run()
        finally:
            run_dir.remove()

    def _run(self) -> int:
        self.engine = self._start_engine()
        if not self._wait_engine():
            return 1
        self.socket = self.config.bind_socket()
        count = self.settings.api_processes()
        self.apis = [self._start_api(i) for i in range(count)]
        log.info("supervisor: engine and %d API processes starting", count)
        status = self._watch()
        self._stop_all()
        return status

    def _start_engine(self, restart: bool = False) -> Child:
        ours, theirs = self.context.Pipe()
        process = self.context.Process(
            target=run_engine_process,
            args=(self.settings, self.address, theirs, restart),
            name="nextword-engine",
        )
        process.start()
        theirs.close()
        return Child("engine", process, ours, time.monotonic())

    def _wait_engine(self) -> bool:
        assert self.engine is not None
        deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
        while not self.engine.control.poll(0.1):
            if not self.engine.process.is_alive():
                log.error(
                    "the engine process failed to start (exit code %s): see its log above",
                    self.engine.process.exitcode,
                )
                return False
            if self.stopping.is_set() or time.monotonic() > deadline:
                log.error("the engine process did not start; stopping")
                self._stop(self.engine)
                return False
        try:
            models = self.engine.control.recv()
        except EOFError:
            return False
        self.engine.up = True
        log.info("engine process %d up: %s", self.engine.process.pid, [m["name"] for m in models])
        return True

    def _start_api(self, index: int) -> Child:
        ours, theirs = self.context.Pipe()
        link = ApiLink(theirs, self.all_up)
        process = self.context.Process(
            target=run_api,
            args=(self.config, [self.socket], link),
            name=f"nextword-api-{index}",
        )
        process.start()
        theirs.close()
        return Child(f"API process {index}", process, ours, time.monotonic())

    def _watch(self) -> int:
        """Watch the children until asked to stop (0) or the service cannot go on (1)."""
        from prometheus_client import multiprocess

        while not self.stopping.wait(0.1):
            if not self._watch_engine():
                return 1
            for index, child in enumerate(self.apis):
                if not child.up and child.control.poll():
                    with suppress(EOFError):
                        child.up = child.control.recv() == UP
                if child.process.is_alive():
                    if not child.up and time.monotonic() - child.started_at > API_START_TIMEOUT_S:
                        log.error("%s did not start in time; replacing it", child.name)
                        child.process.kill()
                    continue
                multiprocess.mark_process_dead(child.process.pid)
                self.all_up.clear()
                now = time.monotonic()
                self.deaths = [t for t in self.deaths if now - t < CRASH_LOOP[1]] + [now]
                if len(self.deaths) >= CRASH_LOOP[0]:
                    log.error(
                        "API processes died %d times within %.0f s (last exit code %s): "
                        "stopping the service",
                        len(self.deaths),
                        CRASH_LOOP[1],
                        child.process.exitcode,
                    )
                    return 1
                log.error(
                    "%s (pid %s) died with exit code %s; starting another",
                    child.name,
                    child.process.pid,
                    child.process.exitcode,
                )
                self.apis[index] = self._start_api(index)
            engine_up = self.engine is not None and self.engine.up
            if not self.all_up.is_set() and engine_up and all(c.up for c in self.apis):
                self.all_up.set()
                log.info("all %d API processes and the engine are up", len(self.apis))
        log.info("supervisor: stopping (draining the API processes, then the engine)")
        return 0

    def _watch_engine(self) -> bool:
        """Restart the engine when it dies; False when it died too often (stop the service)."""
        from prometheus_client import multiprocess

        now = time.monotonic()
        engine = self.engine
        if engine is None:  # dead, waiting for the back-off
            if now >= self.engine_restart_at:
                self.engine = self._start_engine(restart=True)
            return True
        if engine.process.is_alive():
            if not engine.up:
                if engine.control.poll():
                    with suppress(EOFError):  # EOF: it is dying, seen on the next round
                        engine.control.recv()
                        engine.up = True
                        down = now - (self.engine_down_since or now)
                        self.engine_down_since = None
                        log.info(
                            "engine process %d up again, %.1f s after the last one died",
                            engine.process.pid,
                            down,
                        )
                elif now - engine.started_at > ENGINE_START_TIMEOUT_S:
                    log.error("the restarted engine process did not start in time; killing it")
                    engine.process.kill()
            return True
        # Its gauges (queue depth, sessions, pool rows) must not linger in /metrics.
        multiprocess.mark_process_dead(engine.process.pid)
        self.all_up.clear()
        if self.engine_down_since is None:
            self.engine_down_since = now
        window = self.settings.engine_restart_window_s
        self.engine_deaths = [t for t in self.engine_deaths if now - t < window] + [now]
        deaths = len(self.engine_deaths)
        if deaths > self.settings.engine_restarts:
            log.error(
                "the engine process died (%s), %d times within %.0f s: stopping the service; "
                "the sessions it held are lost unless the store is Redis",
                describe_exit(engine.process.exitcode),
                deaths,
                window,
            )
            return False
        delay = restart_delay(deaths)
        log.error(
            "the engine process %d died (%s): restarting it in %.1f s (death %d of %d allowed "
            "within %.0f s); the API processes keep their connections, steps in flight are "
            "answered engine_restarting; sessions %s",
            engine.process.pid,
            describe_exit(engine.process.exitcode),
            delay,
            deaths,
            self.settings.engine_restarts,
            window,
            "continue from Redis"
            if self.settings.session_store != "memory"
            else "are lost (memory store)",
        )
        engine.control.close()
        self.engine = None
        self.engine_restart_at = now + delay
        return True

    def _stop(self, child: Child) -> None:
        child.stop()
        child.process.join(STOP_TIMEOUT_S + 5)
        if child.process.is_alive():
            log.error("%s did not stop in time; killing it", child.name)
            child.process.kill()
            child.process.join()

    def _stop_all(self) -> None:
        self.all_up.clear()
        for child in self.apis:
            child.stop()
        for child in self.apis:
            self._stop(child)
        if self.socket is not None:
            self.socket.close()
        if self.engine is not None and self.engine.process.is_alive():
            self._stop(self.engine)
        log.info("supervisor: every process stopped")


def serve(settings: Settings, **uvicorn_options: Any) -> int:
    """Run the engine and the API processes until stopped; the exit status."""
    from service.api.connections import ConnectionLimits, LimitedConfig

    limits = ConnectionLimits(
        header_timeout_s=settings.header_timeout_s,
        max_header_bytes=settings.max_header_bytes,
        max_connections=settings.max_connections,
        max_connections_per_client=settings.max_connections_per_client,
        ws_send_timeout_s=settings.ws_send_timeout_s,
    )
    config = LimitedConfig(
        "service.api:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        limits=limits,
        **uvicorn_options,
    )
    return Supervisor(settings, config).run()
