"""The API process's entry (`run_api`) and its link to the supervisor.

`nextword serve` (`service.supervisor`) starts each API process with `run_api`: uvicorn on
the shared listening socket, stopped by the supervisor's pipe (never by a signal of its
own: the supervisor orders the stop), draining its streams before uvicorn's shutdown. The
routes ask this module whether every process of the service is up (`all_processes_up`)
and the lifespan reports this process up (`report_up`).
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event

import uvicorn

STOP_TIMEOUT_S = 30.0  # longest drain of an API process, then of the engine
STOP = "stop"
UP = "up"


@dataclass
class ApiLink:
    """What an API process shares with its supervisor."""

    control: Connection  # sends "up" once serving; receives "stop" (EOF: supervisor gone)
    all_up: Event  # set while every process of the service is up


_link: ApiLink | None = None


def api_link() -> ApiLink | None:
    """The link of this API process to its supervisor (None when not supervised)."""
    return _link


def report_up() -> None:
    """Tell the supervisor this API process serves (called once its lifespan started)."""
    if _link is not None:
        _link.control.send(UP)


def all_processes_up() -> bool:
    """Whether every process of the service is up (True when not supervised)."""
    return _link is None or _link.all_up.is_set()


class ApiServer(uvicorn.Server):
    """uvicorn's server, stopped by the supervisor's pipe, draining streams first."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The supervisor decides when to stop: a group-wide signal must not stop this
        # process twice over (uvicorn takes a second SIGTERM as "exit now").
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        from service.api.stream import drain_streams

        for server in self.servers:
            server.close()  # no new connections while the streams drain
        await drain_streams(self.config.timeout_graceful_shutdown or STOP_TIMEOUT_S)
        await super().shutdown(sockets)


def run_api(config: uvicorn.Config, sockets: list[socket.socket], link: ApiLink) -> None:
    """Entry point of an API process."""
    global _link
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    _link = link
    config.configure_logging()
    server = ApiServer(config)

    def watch() -> None:
        try:
            while link.control.recv() != STOP:
                pass
        except (EOFError, OSError):
            pass  # the supervisor is gone: stop too
        server.should_exit = True

    threading.Thread(target=watch, name="supervisor-link", daemon=True).start()
    server.run(sockets=sockets)
