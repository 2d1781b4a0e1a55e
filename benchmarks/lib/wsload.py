"""A WebSocket load generator: client processes, each an asyncio loop (uvloop) holding its share
of the sessions as raw `websockets` client connections.

    closed loop   each connection sends one message, waits for its answer, sends the next
    paced         each connection sends at a fixed mean rate (each interval drawn uniformly
                  within +-50% of the mean, first send at a random phase), still one message
                  at a time; a message's latency counts from when it was due, so an answer
                  late enough to delay the next send is charged to that one too (no
                  coordinated omission)

Answers count only when they arrive within the measured window; errors (an answer that is
not the expected kind, a connection that closes) count over the whole run, warm-up included.
All processes share one clock (time.monotonic, system-wide on Linux).

    with LoadGenerator(processes=2) as load:
        start, end = load.start(Load(uri, messages, sessions=256), warmup=3, seconds=8)
        ...                      # measure the server between start and end
        outcome = load.finish()  # answers, errors, latencies
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import random
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from types import TracebackType
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

OPEN_WAVE = 64  # connections opened at once per process: no accept-queue overflow
OPEN_TIMEOUT_S = 120.0
MAX_ERROR_SAMPLES = 5


@dataclass(frozen=True)
class Load:
    """What to drive: `sessions` connections to `uri`, sending `messages` in turn."""

    uri: str
    messages: list[str]
    sessions: int
    compression: bool = False  # offer per-message deflate
    interval_s: float = 0.0  # paced: mean seconds between one session's messages; 0: closed loop
    answer_marker: str = '"type":"predictions"'  # in every expected answer
    ready_marker: str = '"type":"ready"'  # in the first message of every connection


@dataclass
class Outcome:
    """What the clients saw."""

    answers: int = 0  # within the measured window
    errors: int = 0  # over the whole run
    error_samples: list[str] = field(default_factory=list)
    latencies_ms: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))
    deflate_connections: int = 0  # connections that negotiated per-message deflate

    def merge(self, other: dict[str, Any]) -> None:
        """Add one client process's results."""
        self.answers += other["answers"]
        self.errors += other["errors"]
        room = MAX_ERROR_SAMPLES - len(self.error_samples)
        self.error_samples += other["error_samples"][:room]
        self.latencies_ms = np.concatenate([self.latencies_ms, other["latencies_ms"]])
        self.deflate_connections += other["deflate_connections"]


# --- one client process -------------------------------------------------------------------


class Tally:
    """Answers, errors and latencies of one client process."""

    def __init__(self, marker: str, start: float, end: float) -> None:
        self.marker = marker
        self.start = start
        self.end = end
        self.answers = 0
        self.errors = 0
        self.samples: list[str] = []
        self.latencies: list[float] = []

    def record(self, reply: str | bytes, done: float, latency_s: float) -> None:
        """Count one answer."""
        if isinstance(reply, str) and self.marker in reply:
            if self.start <= done < self.end:
                self.answers += 1
                self.latencies.append(latency_s)
        else:
            self.error(f"unexpected answer: {str(reply)[:200]}")

    def error(self, what: str) -> None:
        """Count one error, keeping a few examples."""
        self.errors += 1
        if len(self.samples) < MAX_ERROR_SAMPLES:
            self.samples.append(what)

    def result(self, deflate_connections: int) -> dict[str, Any]:
        """What goes back to the parent."""
        return {
            "answers": self.answers,
            "errors": self.errors,
            "error_samples": self.samples,
            "latencies_ms": np.array(self.latencies, np.float32) * 1e3,
            "deflate_connections": deflate_connections,
        }


async def open_one(load: Load) -> ClientConnection:
    """One connection, past its `ready` message."""
    ws = await connect(
        load.uri,
        compression="deflate" if load.compression else None,
        ping_interval=None,
        open_timeout=OPEN_TIMEOUT_S,
        close_timeout=5,
        max_size=2**20,
    )
    ready = await ws.recv()
    if not isinstance(ready, str) or load.ready_marker not in ready:
        await ws.close()
        raise RuntimeError(f"expected a ready message, got {str(ready)[:200]}")
    return ws


async def closed_loop(ws: ClientConnection, messages: list[str], tally: Tally) -> None:
    """Send, wait for the answer, send the next, until the window ends."""
    clock = time.monotonic
    n, i = len(messages), 0
    while True:
        sent = clock()
        if sent >= tally.end:
            return
        await ws.send(messages[i % n])
        i += 1
        reply = await ws.recv()
        done = clock()
        tally.record(reply, done, done - sent)


async def paced(
    ws: ClientConnection, messages: list[str], tally: Tally, interval_s: float, rng: random.Random
) -> None:
    """Send at a mean rate of one message per `interval_s`, one at a time, until the window ends."""
    clock = time.monotonic
    n, i = len(messages), 0
    due = clock() + rng.uniform(0, interval_s)
    answered = 0.0
    while due < tally.end:
        delay = due - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        sent = clock()
        await ws.send(messages[i % n])
        i += 1
        reply = await ws.recv()
        done = clock()
        # From when it was due if the previous answer held it back; else from the send (a
        # timer firing late is the client's own delay, not the server's).
        tally.record(reply, done, done - (due if answered > due else sent))
        answered = done
        due += interval_s * rng.uniform(0.5, 1.5)


async def drive(ws: ClientConnection, load: Load, offset: int, tally: Tally, seed: int) -> None:
    """One connection's part of the run; a failure counts as an error and ends it."""
    messages = load.messages[offset:] + load.messages[:offset]
    try:
        if load.interval_s > 0:
            await paced(ws, messages, tally, load.interval_s, random.Random(seed))
        else:
            await closed_loop(ws, messages, tally)
    except Exception as exc:
        tally.error(f"{type(exc).__name__}: {exc}")


async def run_share(load: Load, first: int, count: int, conn: Connection) -> tuple[str, Any]:
    """Open `count` sessions, report, wait for the go, drive them, close them."""
    opened: list[ClientConnection] = []
    try:
        for begin in range(0, count, OPEN_WAVE):
            wave = min(OPEN_WAVE, count - begin)
            opened += await asyncio.gather(*(open_one(load) for _ in range(wave)))
    except Exception as exc:
        await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)
        conn.send(("failed", f"opening sessions: {type(exc).__name__}: {exc}"))
        return ("failed", None)
    conn.send(("open", len(opened)))
    command = await asyncio.to_thread(conn.recv)
    if command[0] != "go":
        await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)
        return ("aborted", None)
    _, start, end = command
    tally = Tally(load.answer_marker, start, end)
    await asyncio.gather(
        *(
            drive(ws, load, (first + i) * 7 % len(load.messages), tally, seed=first + i)
            for i, ws in enumerate(opened)
        )
    )
    deflate = sum(1 for ws in opened if ws.protocol.extensions)
    await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)
    return ("done", tally.result(deflate))


def run_loop(main: Any) -> Any:
    """Run a coroutine on uvloop when it is installed (a cheaper client), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def client_main(conn: Connection) -> None:
    """Entry point of a client process: run each job sent on `conn` until None or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it (its pipe closes)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        load, first, count = job
        conn.send(run_loop(run_share(load, first, count, conn)))


# --- the parent side -----------------------------------------------------------------------


def loop_name() -> str:
    """The client processes' event loop."""
    try:
        import uvloop
    except ImportError:
        return "asyncio (uvloop not installed)"
    return f"uvloop {uvloop.__version__}"


def message_texts(words: list[str]) -> list[str]:
    """One `{"text": word}` message per word."""
    return [json.dumps({"text": w}) for w in words]


class LoadGenerator:
    """`processes` client processes, kept for many runs."""

    def __init__(self, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.processes: list[SpawnProcess] = []
        self.conns: list[Connection] = []
        for i in range(processes):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=client_main, args=(theirs,), name=f"ws-client-{i}", daemon=True
            )
            process.start()
            theirs.close()
            self.processes.append(process)
            self.conns.append(ours)
        self._running: list[Connection] = []

    @property
    def pids(self) -> list[int]:
        """The client processes' ids."""
        return [p.pid for p in self.processes if p.pid is not None]

    def start(self, load: Load, warmup: float, seconds: float) -> tuple[float, float]:
        """Open every session, then start driving them: the measured window (start, end)."""
        shares = [load.sessions // len(self.conns)] * len(self.conns)
        for i in range(load.sessions % len(self.conns)):
            shares[i] += 1
        running = [(c, n) for c, n in zip(self.conns, shares) if n > 0]
        first = 0
        for conn, count in running:
            conn.send((load, first, count))
            first += count
        failures, opened = [], []
        for conn, _ in running:
            if not conn.poll(OPEN_TIMEOUT_S + 30):
                raise RuntimeError("a client process did not open its sessions in time")
            status, detail = conn.recv()
            if status == "open":
                opened.append(conn)
            else:
                failures.append(detail)
        if failures:
            for conn in opened:
                conn.send(("abort",))
            for conn, _ in running:
                conn.recv()  # each one's final word: "failed" or "aborted"
            raise RuntimeError("; ".join(failures))
        start = time.monotonic() + warmup
        end = start + seconds
        for conn, _ in running:
            conn.send(("go", start, end))
        self._running = [c for c, _ in running]
        return start, end

    def finish(self) -> Outcome:
        """Wait for the clients to end the run and close their connections; what they saw."""
        outcome = Outcome()
        for conn in self._running:
            status, result = conn.recv()
            if status == "done":
                outcome.merge(result)
        self._running = []
        return outcome

    def close(self) -> None:
        """Stop the client processes."""
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
            conn.close()
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
