"""Abuse and limits of `nextword serve` (issue 10): what a hostile or careless client can do.

Each probe starts its own `python -m service` (engine process + --workers API processes, the
bundled models, NEXTWORD_LOG_LEVEL=warning) with the settings it names, drives it from this
process (asyncio, uvloop when installed: raw sockets, `websockets`, `httpx`), and reads the
server's processes with psutil. Every probe also counts tracebacks and ERROR lines in its
server's log.

    slowloris   --connections TCP connections from one address (--source, 127.0.0.2 by
                default, so that the probe's own check from 127.0.0.1 is another client),
                each sending half a request's headers (every --upgrade-every-th a half-sent
                WebSocket upgrade), then nothing. Counted, as this side sees them: open at
                each of --checkpoints seconds after the whole flood is open, and what each
                got (408 at the header deadline, 429/503 refused at once, closed without an
                answer); the API process's RSS before, at its peak, after; a GET /healthz
                from 127.0.0.1 in the middle of the flood. Twice: with the default caps
                (NEXTWORD_MAX_CONNECTIONS 4,096, NEXTWORD_MAX_CONNECTIONS_PER_CLIENT 512
                per API process: most of one address's flood is refused at once), and with
                the per-address cap raised over the flood (every connection waits for the
                header deadline, NEXTWORD_HEADER_TIMEOUT_S, 10 s by default).
    websockets  --websockets WebSockets on /v1/stream opened (each gets its session and
                `ready`) and left idle (caps raised over the count): RSS of the API process
                and of the engine before and after, bytes per idle WebSocket; then closed,
                and the whole done --ws-rounds times (a second round that grows the API
                process again would be a leak). First the same against the bare WebSocket
                app (benchmarks/bare_ws_app.py, one uvicorn process, no model): what the
                framework itself costs per socket (--no-ws-bare skips it).
    sigterm     --clients WebSocket clients each streaming one word a message, --window
                messages in flight; SIGTERM to the supervisor after --sigterm-after seconds:
                messages sent, answered, unanswered, whether each client got its answers as
                a prefix of what it sent, in order, and a 1001 close; the exit status and
                how long the exit took.
    burst       --burst POST /v1/predict as fast as --concurrency keep-alive connections allow
                (raw HTTP/1.1, a client much cheaper than the server), from one API key, NEXTWORD_RATE_LIMIT=--rate-limit (burst: the default, 2 x rate):
                200s against 429s (and the most the bucket allows in that time), whether
                every 429 had Retry-After; then one request with another key.
    quota       API keys alice and bob, NEXTWORD_SESSION_CAP=--session-cap: bob creates --bob
                sessions, then alice --alice (one at a time); how many of each still answer
                GET /v1/sessions/{id}. Without a quota (NEXTWORD_MAX_SESSIONS_PER_KEY=0, as
                before the setting) and with --quota.
    headers     hardening round 2 (a head that never ends; abandoned long predicts; a flood
    abandon     of one key; write-behind under a frozen Redis, then a crash; the last three
    fair        also against --before): see benchmarks/limits_round2.py. Also behind and
    behind      retry (streams resending across a frozen Redis).
    retry

Two cores shared with other jobs make every time here noisy: the figures to read are counts
and ratios.

    python -m benchmarks.bench_limits --json benchmarks/results/limits.json
    python -m benchmarks.bench_limits --probes slowloris --connections 500 --checkpoints 5,12
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
from tqdm import tqdm
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from benchmarks.lib.machine import command_line, machine, machine_lines
from benchmarks.lib.models import models_dir
from benchmarks.lib.results import RESULTS, write_report
from benchmarks.lib.server import ServerProcess, free_port, http_status
from benchmarks.lib.wsload import run_loop
from benchmarks.limits_round2 import (
    KEYS,
    add_arguments,
    keys_env,
    post,
    probe_abandon,
    probe_behind,
    probe_fair,
    probe_headers,
    probe_retry,
    read_response,
    table_abandon,
    table_behind,
    table_fair,
    table_headers,
    table_retry,
)
from service.config import Settings

MODULES = ("uvicorn", "websockets", "httpx", "psutil", "onnxruntime")
PROBES = (
    "slowloris",
    "websockets",
    "sigterm",
    "burst",
    "quota",
    "headers",
    "abandon",
    "fair",
    "behind",
    "retry",
)
MB = 1024 * 1024
WAVE = 100  # connections opened at once (the listen backlog holds 2,048)
WORDS = ("i", "am", "going", "to", "the", "store", "and", "then", "we", "will", "see", "what")
DEFAULTS = Settings()


# --- the server ------------------------------------------------------------------------------


@dataclass
class Service:
    """A running `python -m service` and what the probes read of it."""

    server: ServerProcess
    engine: psutil.Process | None  # None: the bare app (one process, no engine)
    apis: list[psutil.Process]

    @property
    def port(self) -> int:
        return self.server.port

    def rss(self) -> dict[str, int]:
        """Resident set sizes in bytes: the engine, the API processes together."""
        sizes = {"api": sum(p.memory_info().rss for p in self.apis)}
        if self.engine is not None:
            sizes["engine"] = self.engine.memory_info().rss
        return sizes

    def held(self) -> int:
        """Sockets on the service's port that the API processes hold open (not listening)."""
        count = 0
        for process in self.apis:
            for conn in process.net_connections("tcp"):
                if conn.laddr and conn.laddr.port == self.port and conn.status != "LISTEN":
                    count += 1
        return count


def service_process(
    name: str, env: dict[str, str], args: argparse.Namespace, models: Path, root: Path | None = None
) -> ServerProcess:
    """`python -m service` with `env` on a free port (not started yet); `root`: the checkout
    whose code runs (default: this one)."""
    port = free_port()
    environment = {
        "NEXTWORD_HOST": "127.0.0.1",
        "NEXTWORD_LOG_LEVEL": "warning",
        "NEXTWORD_PROVIDERS": "cpu",
        **env,
    }
    command = [sys.executable, "-m", "service", "--port", str(port)]
    command += ["--workers", str(args.workers), "--models", str(models)]
    return ServerProcess(
        f"limits-{name}", command, environment, port=port, log_dir=args.log_dir, cwd=root
    )


def attach(server: ServerProcess, workers: int) -> Service:
    """A ready service's processes: the engine is the first the supervisor starts."""
    root = psutil.Process(server.pid)
    forked = sorted(
        (c for c in root.children(recursive=True) if "--multiprocessing-fork" in c.cmdline()),
        key=lambda c: c.create_time(),
    )
    if len(forked) != 1 + workers:
        raise RuntimeError(f"{server.name}: expected an engine and {workers} API processes")
    return Service(server, forked[0], forked[1:])


@contextmanager
def service(
    name: str, env: dict[str, str], args: argparse.Namespace, models: Path, root: Path | None = None
) -> Iterator[Service]:
    """A fresh service; stopped (SIGTERM) on exit unless it has exited."""
    with service_process(name, env, args, models, root) as server:
        yield attach(server, args.workers)


@contextmanager
def bare_app(args: argparse.Namespace) -> Iterator[Service]:
    """The bare WebSocket app (benchmarks/bare_ws_app.py: FastAPI on uvicorn, the same
    WebSocket protocol implementation as the service, no model) in one process."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "benchmarks.bare_ws_app:app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    command += ["--ws", "websockets-sansio", "--ws-ping-interval", "20"]
    with ServerProcess("limits-bare", command, port=port, log_dir=args.log_dir) as s:
        yield Service(s, None, [psutil.Process(s.pid)])


def log_problems(server: ServerProcess) -> dict[str, Any]:
    """Tracebacks and ERROR lines in a server's log, with the first few of them."""
    text = server.log_file.read_text(errors="replace") if server.log_file.exists() else ""
    lines = [line for line in text.splitlines() if re.search(r"Traceback|\bERROR\b", line)]
    return {
        "log": server.log_file.name,  # in --log-dir
        "tracebacks": text.count("Traceback"),
        "error_lines": len(lines),
        "samples": lines[:5],
    }


# --- 1. slow-loris ---------------------------------------------------------------------------


HALF_REQUEST = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow\r\n"
HALF_UPGRADE = (
    b"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
)


@dataclass
class Loris:
    """One slow connection as this side sees it."""

    opened: float
    upgrade: bool
    closed: float | None = None
    outcome: str = "held"  # "408", "429", "503", ... (the status), "closed", "reset"


async def loris(port: int, source: str, upgrade: bool) -> tuple[Loris, asyncio.Task[None]]:
    """Open one connection, send half a request's headers; a task that waits for its end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    conn = Loris(time.monotonic(), upgrade)
    writer.write(HALF_UPGRADE if upgrade else HALF_REQUEST)

    async def wait_end() -> None:
        first, reset = b"", False
        try:
            while chunk := await reader.read(65536):
                first = first or chunk
        except ConnectionResetError:  # after the answer (it was read), or instead of one
            reset = True
        conn.closed = time.monotonic()
        if first.startswith(b"HTTP/1."):
            conn.outcome = first[9:12].decode()
        else:
            conn.outcome = "reset" if reset else "closed"
        writer.close()

    return conn, asyncio.create_task(wait_end())


def timed_status(url: str) -> tuple[int | None, float]:
    """A GET's status and its time in ms."""
    started = time.monotonic()
    status = http_status(url, timeout=30)
    return status, (time.monotonic() - started) * 1e3


async def slowloris_flood(
    svc: Service, args: argparse.Namespace, deadline_s: float
) -> dict[str, Any]:
    """The flood against `svc`, whose header deadline is `deadline_s`."""
    rss_before = svc.rss()
    most_held = 0
    conns: list[Loris] = []
    tasks: list[asyncio.Task[None]] = []
    started = time.monotonic()
    bar = tqdm(total=args.connections, desc="slow connections", unit="conn", leave=False)
    for begin in range(0, args.connections, WAVE):
        wave = range(begin, min(begin + WAVE, args.connections))
        opened = await asyncio.gather(
            *(loris(svc.port, args.source, i % args.upgrade_every == 0) for i in wave)
        )
        for conn, task in opened:
            conns.append(conn)
            tasks.append(task)
        bar.update(len(wave))
    bar.close()
    flood_open = time.monotonic()
    checkpoints: list[dict[str, Any]] = []
    rss_peak = dict(rss_before)
    legit: tuple[int | None, float] | None = None
    legit_at = min(args.checkpoints) / 2
    pending = sorted(args.checkpoints)
    with tqdm(total=int(max(pending)), desc="holding", unit="s", leave=False) as hold:
        while pending:
            now = time.monotonic() - flood_open
            hold.update(int(now) - hold.n)
            for role, value in svc.rss().items():
                rss_peak[role] = max(rss_peak[role], value)
            most_held = max(most_held, sum(1 for c in conns if c.closed is None))
            if legit is None and now >= legit_at:
                legit = await asyncio.to_thread(timed_status, svc.server.url + "/healthz")
            if now >= pending[0]:
                at = pending.pop(0)
                checkpoints.append(
                    {
                        "at_s": at,
                        "open": sum(1 for c in conns if c.closed is None),
                        "server_held": svc.held(),
                    }
                )
                continue
            await asyncio.sleep(min(0.25, pending[0] - now))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    rss_after = svc.rss()
    after = await asyncio.to_thread(timed_status, svc.server.url + "/healthz")
    outcomes = Counter(c.outcome for c in conns)
    by_kind = {
        kind: dict(Counter(c.outcome for c in conns if c.upgrade == (kind == "upgrade")))
        for kind in ("request", "upgrade")
    }
    # Refused: closed well before the deadline (a reset too: the refusal is written and the
    # socket closed at once, which may reach the client as a reset before it reads it).
    refused = [c for c in conns if c.closed is not None and c.closed - c.opened < deadline_s / 2]
    lifetimes = sorted(
        c.closed - c.opened
        for c in conns
        if c.closed is not None and c.closed - c.opened >= deadline_s / 2
    )
    return {
        "connections": args.connections,
        "upgrades": sum(c.upgrade for c in conns),
        "open_seconds": flood_open - started,
        "checkpoints": checkpoints,
        "outcomes": dict(outcomes),
        "outcomes_by_kind": by_kind,
        "refused_at_once": len(refused),
        "refused_outcomes": dict(Counter(c.outcome for c in refused)),
        "refused_max_s": max((c.closed - c.opened for c in refused if c.closed), default=None),
        "lifetime_s": {
            "min": lifetimes[0] if lifetimes else None,
            "median": lifetimes[len(lifetimes) // 2] if lifetimes else None,
            "max": lifetimes[-1] if lifetimes else None,
        },
        "healthz_during": {
            "status": legit[0] if legit else None,
            "ms": legit[1] if legit else None,
        },
        "healthz_after": {"status": after[0], "ms": after[1]},
        "rss_before": rss_before,
        "rss_peak": rss_peak,
        "rss_after": rss_after,
        "most_held": most_held,
        "api_bytes_per_held": (rss_peak["api"] - rss_before["api"]) / most_held
        if most_held
        else None,
    }


def probe_slowloris(args: argparse.Namespace, models: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    raised = args.connections + 64
    variants = [
        ("default caps", {}),
        (
            "per-address cap raised",
            {
                "NEXTWORD_MAX_CONNECTIONS": str(max(DEFAULTS.max_connections, raised)),
                "NEXTWORD_MAX_CONNECTIONS_PER_CLIENT": str(raised),
            },
        ),
    ]
    for label, env in variants:
        if args.header_timeout is not None:
            env = {**env, "NEXTWORD_HEADER_TIMEOUT_S": str(args.header_timeout)}
        fields: dict[str, Any] = {k.removeprefix("NEXTWORD_").lower(): v for k, v in env.items()}
        settings = Settings(**fields)  # as the server reads them
        print(f"slowloris: {label} ...", file=sys.stderr, flush=True)
        with service(f"slowloris-{len(rows)}", env, args, models) as svc:
            row = run_loop(slowloris_flood(svc, args, settings.header_timeout_s or float("inf")))
        row.update(
            variant=label,
            header_timeout_s=settings.header_timeout_s,
            max_connections=settings.max_connections,
            max_connections_per_client=settings.max_connections_per_client,
            server_log=log_problems(svc.server),
        )
        rows.append(row)
    return rows


# --- 2. idle WebSockets ----------------------------------------------------------------------


async def open_ws(uri: str) -> ClientConnection:
    """A WebSocket past its `ready` message."""
    ws = await connect(uri, ping_interval=None, compression=None, open_timeout=120)
    ready = json.loads(await ws.recv())
    if ready.get("type") != "ready":
        raise RuntimeError(f"expected ready, got {ready}")
    return ws


async def open_many(uri: str, count: int, desc: str) -> list[ClientConnection]:
    opened: list[ClientConnection] = []
    with tqdm(total=count, desc=desc, unit="ws", leave=False) as bar:
        for begin in range(0, count, WAVE):
            wave = min(WAVE, count - begin)
            opened += await asyncio.gather(*(open_ws(uri) for _ in range(wave)))
            bar.update(wave)
    return opened


async def close_many(sockets: list[ClientConnection]) -> None:
    for begin in range(0, len(sockets), 500):
        await asyncio.gather(*(ws.close() for ws in sockets[begin : begin + 500]))


async def idle_rounds(svc: Service, args: argparse.Namespace, count: int) -> list[dict[str, Any]]:
    """`count` rounds of opening --websockets, holding them idle, closing them."""
    uri = f"ws://127.0.0.1:{svc.port}/v1/stream"
    await close_many(await open_many(uri, 10, "warm-up"))  # first-use costs, not per socket
    await asyncio.sleep(args.settle)
    rounds = []
    for r in range(count):
        before = svc.rss()
        started = time.monotonic()
        sockets = await open_many(uri, args.websockets, f"round {r + 1}: opening")
        open_s = time.monotonic() - started
        await asyncio.sleep(args.settle)
        held = svc.held()
        after = svc.rss()
        alive = sum(1 for ws in sockets if ws.close_code is None)
        await close_many(sockets)
        await asyncio.sleep(args.settle)
        closed = svc.rss()
        rounds.append(
            {
                "websockets": args.websockets,
                "open_seconds": open_s,
                "open_at_end": alive,
                "server_held": held,
                "server_held_after_close": svc.held(),
                "rss_before": before,
                "rss_open": after,
                "rss_closed": closed,
                **{
                    f"{role}_bytes_per_ws": (after[role] - before[role]) / args.websockets
                    for role in before
                },
            }
        )
    return rounds


def probe_websockets(args: argparse.Namespace, models: Path) -> dict[str, Any]:
    cap = args.websockets + 256
    env = {
        "NEXTWORD_MAX_CONNECTIONS": str(max(DEFAULTS.max_connections, cap)),
        "NEXTWORD_MAX_CONNECTIONS_PER_CLIENT": str(cap),
    }
    result: dict[str, Any] = {
        "max_connections": int(env["NEXTWORD_MAX_CONNECTIONS"]),
        "max_connections_per_client": int(env["NEXTWORD_MAX_CONNECTIONS_PER_CLIENT"]),
    }
    if args.ws_bare:
        print("websockets: the bare app ...", file=sys.stderr, flush=True)
        with bare_app(args) as bare:
            result["bare"] = run_loop(idle_rounds(bare, args, 1))[0]
        result["bare"]["server_log"] = log_problems(bare.server)
    print("websockets: the service ...", file=sys.stderr, flush=True)
    with service("websockets", env, args, models) as svc:
        result["rounds"] = run_loop(idle_rounds(svc, args, args.ws_rounds))
    result["server_log"] = log_problems(svc.server)
    return result


# --- 3. SIGTERM mid-stream -------------------------------------------------------------------


@dataclass
class Streamer:
    """One streaming client's counts."""

    sent: int = 0
    sent_after_sigterm: int = 0
    answered: int = 0
    errors: int = 0
    in_order: bool = True  # answers are for ids 0, 1, 2, ... (a prefix of what was sent)
    close_code: int | None = None
    closed_at: float | None = None
    failure: str = ""


async def stream_client(uri: str, window: int, sigterm: list[float], out: Streamer) -> None:
    """Send one word a message, `window` in flight, until the server closes."""
    try:
        ws = await open_ws(uri)
    except Exception as exc:
        out.failure = f"open: {type(exc).__name__}: {exc}"
        return
    credits = asyncio.Semaphore(window)

    async def send() -> None:
        with suppress(ConnectionClosed):
            while True:
                await credits.acquire()
                await ws.send(json.dumps({"text": WORDS[out.sent % len(WORDS)], "id": out.sent}))
                out.sent += 1
                if sigterm:
                    out.sent_after_sigterm += 1

    sender = asyncio.create_task(send())
    try:
        while True:
            answer = json.loads(await ws.recv())
            if answer.get("type") == "predictions":
                out.in_order &= answer.get("id") == out.answered + out.errors
                out.answered += 1
            else:
                out.errors += 1
                out.failure = out.failure or json.dumps(answer)[:200]
            credits.release()
    except ConnectionClosed as closed:
        out.close_code = closed.rcvd.code if closed.rcvd is not None else None
    except Exception as exc:
        out.failure = f"{type(exc).__name__}: {exc}"
    finally:
        out.closed_at = time.monotonic()
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        await ws.close()


async def stream_then_sigterm(svc: Service, args: argparse.Namespace) -> dict[str, Any]:
    uri = f"ws://127.0.0.1:{svc.port}/v1/stream"
    clients = [Streamer() for _ in range(args.clients)]
    sigterm: list[float] = []  # the time SIGTERM was sent, once sent
    tasks = [asyncio.create_task(stream_client(uri, args.window, sigterm, c)) for c in clients]
    await asyncio.sleep(args.sigterm_after)
    sent_before = sum(c.sent for c in clients)
    answered_before = sum(c.answered for c in clients)
    proc = svc.server.proc
    assert proc is not None
    sigterm.append(time.monotonic())
    proc.send_signal(signal.SIGTERM)
    exited = asyncio.create_task(asyncio.to_thread(proc.wait, 120))
    done, _ = await asyncio.wait(tasks, timeout=120)
    status = await exited
    exit_s = time.monotonic() - sigterm[0]  # not before the clients are all closed
    closed = [c.closed_at for c in clients if c.closed_at is not None]
    codes = Counter(str(c.close_code) for c in clients)
    failures = [c.failure for c in clients if c.failure]
    sent = sum(c.sent for c in clients)
    answered = sum(c.answered for c in clients)
    errors = sum(c.errors for c in clients)
    return {
        "clients": args.clients,
        "window": args.window,
        "sigterm_after_s": args.sigterm_after,
        "sent_before_sigterm": sent_before,
        "answered_before_sigterm": answered_before,
        "sent": sent,
        "sent_after_sigterm": sum(c.sent_after_sigterm for c in clients),
        "answered": answered,
        "error_answers": errors,
        "unanswered": sent - answered - errors,
        "unanswered_max_per_client": max(c.sent - c.answered - c.errors for c in clients),
        "clients_in_order": sum(c.in_order for c in clients),
        "close_codes": dict(codes),
        "clients_1001": codes.get("1001", 0),
        "clients_unfinished": len(tasks) - len(done),
        "last_close_s": max(closed) - sigterm[0] if closed else None,
        "exit_status": status,
        "exit_s": exit_s,
        "failures": failures[:5],
    }


def probe_sigterm(args: argparse.Namespace, models: Path) -> dict[str, Any]:
    print("sigterm ...", file=sys.stderr, flush=True)
    with service("sigterm", {}, args, models) as svc:
        result: dict[str, Any] = run_loop(stream_then_sigterm(svc, args))
    result["server_log"] = log_problems(svc.server)
    return result


# --- 4. burst from one key -------------------------------------------------------------------


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, dict[str, str], bytes]:
    """Send a request, read its response: status, headers (lower-case names), body."""
    writer.write(request)
    return await read_response(reader)


async def burst(svc: Service, args: argparse.Namespace) -> dict[str, Any]:
    """--burst requests over --concurrency keep-alive connections (raw HTTP/1.1: a client
    far cheaper than the server, so that the requests come as fast as it answers them)."""
    statuses: Counter[int] = Counter()
    retry_after: Counter[str] = Counter()
    without_retry_after = 0
    other_bodies: list[str] = []
    request = post("/v1/predict", {"text": "the"}, KEYS["alice"])
    queue = iter(range(args.burst))
    connections = [
        await asyncio.open_connection("127.0.0.1", svc.port) for _ in range(args.concurrency)
    ]

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal without_retry_after
        for _ in queue:
            if reader.at_eof():  # the server closed this one: another connection
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            status, headers, body = await exchange(reader, writer, request)
            statuses[status] += 1
            if status == 429:
                if "retry-after" in headers:
                    retry_after[headers["retry-after"]] += 1
                else:
                    without_retry_after += 1
            elif status != 200 and len(other_bodies) < 5:
                other_bodies.append(f"{status} {body[:200]!r}")
        writer.close()

    started = time.monotonic()
    await asyncio.gather(*(worker(r, w) for r, w in connections))
    elapsed = time.monotonic() - started
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
    other_key, _, _ = await exchange(
        reader, writer, post("/v1/predict", {"text": "the"}, KEYS["bob"])
    )
    writer.close()
    rate = args.rate_limit
    bucket = 2 * rate  # NEXTWORD_RATE_BURST's default
    return {
        "requests": args.burst,
        "concurrency": args.concurrency,
        "rate_limit": rate,
        "rate_burst": bucket,
        "seconds": elapsed,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "ok": statuses[200],
        "limited": statuses[429],
        "allowed_at_most": int(bucket + rate * elapsed),
        "limited_without_retry_after": without_retry_after,
        "retry_after_values": dict(retry_after),
        "other_samples": other_bodies,
        "other_key_status": other_key,
    }


def probe_burst(args: argparse.Namespace, models: Path) -> dict[str, Any]:
    env = {**keys_env(), "NEXTWORD_RATE_LIMIT": str(args.rate_limit)}
    print("burst ...", file=sys.stderr, flush=True)
    with service("burst", env, args, models) as svc:
        result: dict[str, Any] = run_loop(burst(svc, args))
    result["server_log"] = log_problems(svc.server)
    return result


# --- 5. session quota ------------------------------------------------------------------------


async def quota_run(svc: Service, args: argparse.Namespace) -> dict[str, Any]:
    created: dict[str, list[str]] = {"bob": [], "alice": []}
    failed: Counter[int] = Counter()
    async with httpx.AsyncClient(base_url=svc.server.url, timeout=60) as http:
        for name, count in (("bob", args.bob), ("alice", args.alice)):
            for _ in tqdm(range(count), desc=f"{name} creates", unit="session", leave=False):
                reply = await http.post("/v1/sessions", json={}, headers=bearer(name))
                if reply.status_code == 201:
                    created[name].append(reply.json()["session_id"])
                else:
                    failed[reply.status_code] += 1
        answer: dict[str, list[int]] = {}
        for name, ids in created.items():
            answer[name] = [
                (await http.get(f"/v1/sessions/{sid}", headers=bearer(name))).status_code
                for sid in ids
            ]
    alice = answer["alice"]
    newest = min(args.quota, len(alice)) if args.quota else len(alice)
    return {
        "created": {name: len(ids) for name, ids in created.items()},
        "create_failures": {str(k): v for k, v in failed.items()},
        "bob_answer": answer["bob"].count(200),
        "alice_answer": alice.count(200),
        "statuses": {name: dict(Counter(map(str, s))) for name, s in answer.items()},
        "alice_newest_answer": alice[len(alice) - newest :].count(200),
        "alice_newest": newest,
    }


def probe_quota(args: argparse.Namespace, models: Path) -> list[dict[str, Any]]:
    rows = []
    for quota in (0, args.quota):
        env = {
            **keys_env(),
            "NEXTWORD_SESSION_CAP": str(args.session_cap),
            "NEXTWORD_MAX_SESSIONS_PER_KEY": str(quota),
        }
        print(f"quota {quota} ...", file=sys.stderr, flush=True)
        with service(f"quota-{quota}", env, args, models) as svc:
            row: dict[str, Any] = run_loop(
                quota_run(svc, argparse.Namespace(**{**vars(args), "quota": quota}))
            )
        row.update(
            max_sessions_per_key=quota,
            session_cap=args.session_cap,
            bob=args.bob,
            alice=args.alice,
            server_log=log_problems(svc.server),
        )
        rows.append(row)
    return rows


# --- the report ------------------------------------------------------------------------------


def mb(value: float) -> str:
    return f"{value / MB:,.0f}M"


def num(value: float | None, spec: str = ",.1f") -> str:
    return "-" if value is None else format(value, spec)


def logs_line(rows: list[dict[str, Any]]) -> str:
    tracebacks = sum(r["server_log"]["tracebacks"] for r in rows)
    errors = sum(r["server_log"]["error_lines"] for r in rows)
    return f"server logs: {tracebacks} tracebacks, {errors} ERROR lines"


def table_slowloris(rows: list[dict[str, Any]]) -> list[str]:
    first = rows[0]
    ats = [c["at_s"] for c in first["checkpoints"]]
    lines = [
        f"1. Slow-loris: {first['connections']:,} connections from one address, each half a "
        f"request's headers ({first['upgrades']:,} of them WebSocket upgrades), then nothing",
        "",
        f"{'caps: total / per address':>25} {'deadline':>8} {'refused':>7} "
        + " ".join(f"{f'open {a:g}s':>8}" for a in ats)
        + f" {'408':>5} {'lifetime s med/max':>18} {'/healthz':>8} "
        f"{'API RSS before/peak/after':>25} {'B/conn':>6}",
    ]
    for r in rows:
        caps = f"{r['max_connections']:,} / {r['max_connections_per_client']:,}"
        life = r["lifetime_s"]
        lines.append(
            f"{caps:>25} {r['header_timeout_s']:>7g}s {r['refused_at_once']:>7,} "
            + " ".join(f"{c['open']:>8,}" for c in r["checkpoints"])
            + f" {r['outcomes'].get('408', 0):>5,} "
            f"{num(life['median'], '.2f'):>9} / {num(life['max'], '.2f'):<6} "
            f"{str(r['healthz_during']['status']):>8} "
            f"{mb(r['rss_before']['api']):>9} {mb(r['rss_peak']['api']):>7} "
            f"{mb(r['rss_after']['api']):>7} {num(r['api_bytes_per_held'], ',.0f'):>6}"
        )
    lines += [
        "",
        "open Ns: connections still open N s after the whole flood was open (opening took "
        + ", ".join(f"{r['open_seconds']:.1f}" for r in rows)
        + " s); refused: closed at once (well before the deadline); lifetime: from a "
        "connection's open to its close by the server, those not refused; /healthz: a GET from "
        "another address (127.0.0.1) in the middle of the flood; B/conn: API process RSS "
        "growth / most connections held at once",
    ]
    for r in rows:
        lines.append(
            f"{r['variant']}: outcomes "
            + ", ".join(f"{k} x{v:,}" for k, v in sorted(r["outcomes"].items()))
            + "; refused: "
            + (", ".join(f"{k} x{v:,}" for k, v in sorted(r["refused_outcomes"].items())) or "none")
            + "; sockets the server held at each checkpoint: "
            + " / ".join(f"{c['server_held']:,}" for c in r["checkpoints"])
        )
    lines.append(logs_line(rows))
    return lines


def table_websockets(result: dict[str, Any]) -> list[str]:
    count = result["rounds"][0]["websockets"]
    lines = [
        f"2. Idle WebSockets: {count:,} opened on /v1/stream (each with its session and "
        "`ready`) and left idle; caps raised to "
        f"{result['max_connections']:,} / {result['max_connections_per_client']:,}",
        "",
        f"{'server':>17} {'open s':>6} {'held':>6} {'API RSS before':>14} {'open':>6} "
        f"{'closed':>6} {'B/ws API':>8} {'engine RSS before':>17} {'open':>6} {'B/ws engine':>11}",
    ]
    rows = [(f"service, round {i}", r) for i, r in enumerate(result["rounds"], 1)]
    if "bare" in result:
        rows.insert(0, ("bare app", result["bare"]))
    for label, r in rows:
        engine = "engine" in r["rss_before"]
        lines.append(
            f"{label:>17} {r['open_seconds']:>6.1f} {r['server_held']:>6,} "
            f"{mb(r['rss_before']['api']):>14} {mb(r['rss_open']['api']):>6} "
            f"{mb(r['rss_closed']['api']):>6} {r['api_bytes_per_ws']:>8,.0f} "
            + (
                f"{mb(r['rss_before']['engine']):>17} {mb(r['rss_open']['engine']):>6} "
                f"{r['engine_bytes_per_ws']:>11,.0f}"
                if engine
                else f"{'-':>17} {'-':>6} {'-':>11}"
            )
        )
    lines += [
        "",
        "B/ws: RSS growth while they were open / WebSockets (API process: connection, protocol, "
        "tasks; engine: the session each opened, kept after the close until its TTL); held: "
        "sockets the server process held (after closing: "
        + ", ".join(str(r["server_held_after_close"]) for _, r in rows)
        + "); bare app: benchmarks/bare_ws_app.py on uvicorn, the same WebSocket protocol "
        "implementation, no model, no service code",
        logs_line([r for _, r in rows if "server_log" in r] + [result]),
    ]
    return lines


def table_sigterm(r: dict[str, Any]) -> list[str]:
    codes = ", ".join(f"{k} x{v}" for k, v in sorted(r["close_codes"].items()))
    return [
        f"3. SIGTERM to the supervisor after {r['sigterm_after_s']:g} s of {r['clients']} "
        f"WebSocket clients streaming (one word a message, {r['window']} in flight each)",
        "",
        f"{'sent':>8} {'after SIGTERM':>13} {'answered':>8} {'errors':>6} {'unanswered':>10} "
        f"{'in order':>8} {'1001 closes':>11} {'exit':>4} {'exit s':>6} {'last close s':>12}",
        f"{r['sent']:>8,} {r['sent_after_sigterm']:>13,} {r['answered']:>8,} "
        f"{r['error_answers']:>6,} {r['unanswered']:>10,} "
        f"{r['clients_in_order']:>4}/{r['clients']:<3} {r['clients_1001']:>7}/{r['clients']:<3} "
        f"{str(r['exit_status']):>4} {r['exit_s']:>6.2f} {num(r['last_close_s'], '.2f'):>12}",
        "",
        "unanswered: sent but never read by the server (in flight when it stopped reading; at "
        f"most {r['unanswered_max_per_client']} for one client); in order: clients whose "
        "answers were for their first messages, in order, none skipped; close codes: " + codes,
        logs_line([r]),
    ]


def table_burst(r: dict[str, Any]) -> list[str]:
    return [
        f"4. Burst: {r['requests']:,} POST /v1/predict from one API key, {r['concurrency']} "
        f"connections, NEXTWORD_RATE_LIMIT={r['rate_limit']:g} (burst {r['rate_burst']:g})",
        "",
        f"{'seconds':>7} {'200':>6} {'429':>6} {'other':>5} {'bucket allows':>13} "
        f"{'429 without Retry-After':>23} {'another key':>11}",
        f"{r['seconds']:>7.1f} {r['ok']:>6,} {r['limited']:>6,} "
        f"{r['requests'] - r['ok'] - r['limited']:>5,} {r['allowed_at_most']:>13,} "
        f"{r['limited_without_retry_after']:>23,} {r['other_key_status']:>11}",
        "",
        "bucket allows: burst + rate x seconds (the most the key may get through); "
        "Retry-After values: "
        + ", ".join(f"{k} s x{v:,}" for k, v in sorted(r["retry_after_values"].items())),
        logs_line([r]),
    ]


def table_quota(rows: list[dict[str, Any]]) -> list[str]:
    first = rows[0]
    lines = [
        f"5. Session quota: NEXTWORD_SESSION_CAP={first['session_cap']:,}; bob creates "
        f"{first['bob']:,} sessions, then alice {first['alice']:,}",
        "",
        f"{'MAX_SESSIONS_PER_KEY':>20} {'bob answer':>10} {'alice answer':>12} "
        f"{'of alice newest':>15} {'create failures':>15}",
    ]
    for r in rows:
        quota = "0 (no quota)" if r["max_sessions_per_key"] == 0 else str(r["max_sessions_per_key"])
        lines.append(
            f"{quota:>20} {r['bob_answer']:>5,}/{r['created']['bob']:<4,} "
            f"{r['alice_answer']:>6,}/{r['created']['alice']:<5,} "
            f"{r['alice_newest_answer']:>9,}/{r['alice_newest']:<5,} "
            f"{sum(r['create_failures'].values()):>15}"
        )
    lines += [
        "",
        "answer: GET /v1/sessions/{id} with the owner's key is 200 (else 404: evicted); of "
        "alice newest: her last sessions created (as many as the quota) that answer",
        logs_line(rows),
    ]
    return lines


def table(report: dict[str, Any]) -> str:
    lines = [
        "Abuse and limits of nextword serve (issues 10 and 26)",
        *machine_lines(report["machine"], MODULES),
        f"command: {report['command']}",
        f"{report['models_note']}; {report['workers']} API process(es); counts and ratios are "
        "the figures (2 shared cores: times are noisy)",
    ]
    probes = report["probes"]
    parts: list[tuple[str, Callable[[Any], list[str]]]] = [
        ("slowloris", table_slowloris),
        ("websockets", table_websockets),
        ("sigterm", table_sigterm),
        ("burst", table_burst),
        ("quota", table_quota),
        ("headers", table_headers),
        ("abandon", table_abandon),
        ("fair", table_fair),
        ("behind", table_behind),
        ("retry", table_retry),
    ]
    for name, render in parts:
        if name in probes:
            lines += ["", *render(probes[name])]
    return "\n".join(lines)


# --- the command -----------------------------------------------------------------------------


def float_list(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def probe_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = set(names) - set(PROBES)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown probes {sorted(unknown)}; known: {PROBES}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--probes", type=probe_list, default=list(PROBES))
    parser.add_argument("--workers", type=int, default=1, help="API processes of each server")
    parser.add_argument("--models", type=Path, help="models directory (default: the bundled)")
    parser.add_argument("--log-dir", type=Path, help="servers' logs (default: a temp directory)")
    slow = parser.add_argument_group("slowloris")
    slow.add_argument("--connections", type=int, default=2000)
    slow.add_argument("--upgrade-every", type=int, default=4, help="every Nth: a WS upgrade")
    slow.add_argument("--checkpoints", type=float_list, default=[5, 10, 15, 30])
    slow.add_argument("--source", default="127.0.0.2", help="address the flood comes from")
    slow.add_argument(
        "--header-timeout", type=float, help="NEXTWORD_HEADER_TIMEOUT_S (default: the service's)"
    )
    ws = parser.add_argument_group("websockets")
    ws.add_argument("--websockets", type=int, default=5000)
    ws.add_argument("--ws-rounds", type=int, default=2)
    ws.add_argument(
        "--ws-bare",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the bare WebSocket app too (the framework's own cost per socket)",
    )
    ws.add_argument("--settle", type=float, default=2.0, help="seconds before reading RSS")
    term = parser.add_argument_group("sigterm")
    term.add_argument("--clients", type=int, default=100)
    term.add_argument("--window", type=int, default=4, help="messages in flight per client")
    term.add_argument("--sigterm-after", type=float, default=3.0)
    rate = parser.add_argument_group("burst")
    rate.add_argument("--burst", type=int, default=3000)
    rate.add_argument("--concurrency", type=int, default=32)
    rate.add_argument("--rate-limit", type=float, default=50.0)
    quota = parser.add_argument_group("quota")
    quota.add_argument("--bob", type=int, default=50)
    quota.add_argument("--alice", type=int, default=1000)
    quota.add_argument("--quota", type=int, default=100, help="NEXTWORD_MAX_SESSIONS_PER_KEY")
    quota.add_argument("--session-cap", type=int, default=1000)
    add_arguments(parser)  # round 2's probes: benchmarks/limits_round2.py
    parser.add_argument("--json", type=Path, default=RESULTS / "limits.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runners: dict[str, Callable[[argparse.Namespace, Path], Any]] = {
        "slowloris": probe_slowloris,
        "websockets": probe_websockets,
        "sigterm": probe_sigterm,
        "burst": probe_burst,
        "quota": probe_quota,
        "headers": probe_headers,
        "abandon": probe_abandon,
        "fair": probe_fair,
        "behind": probe_behind,
        "retry": probe_retry,
    }
    report: dict[str, Any] = {
        "command": command_line("benchmarks.bench_limits", argv),
        "machine": machine(MODULES),
        "workers": args.workers,
        "options": {k: v for k, v in vars(args).items() if k not in ("json", "log_dir")},
        "probes": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-limits-") as tmp:
        if args.log_dir is None:
            args.log_dir = Path(tmp)
        args.log_dir.mkdir(parents=True, exist_ok=True)
        with models_dir(args.models, "tiny") as (models, note):
            report["models_note"] = note
            for name in args.probes:
                report["probes"][name] = runners[name](args, models)
                print(json.dumps({name: report["probes"][name]}, default=str), file=sys.stderr)
    text = table(report)
    print(text)
    write_report(args.json, report, text)


if __name__ == "__main__":
    main()
