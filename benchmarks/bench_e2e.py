"""End-to-end WebSocket benchmark of `nextword serve` (engine process + N API processes).

Every configuration is a real server on a free loopback port, measured against the bare
WebSocket app (`benchmarks/bare_ws_app.py`: same framework and messages, no model) run by
uvicorn with the same number of processes:

    ceiling   the service with a near-free model (tiny random weights, hidden 32, exported by
              model_export.tiny): what the front end (API processes, ZeroMQ, the engine's
              loop) allows; target >= 0.6 of bare
    lstm      the service with the bundled models (`lstm`, the default); target >= 0.45 of bare
    (scaling) both of the above, and bare, at each count of API processes in --workers
    deflate   the service and bare with per-message deflate on (server offers it, the client
              asks for it) against the same with it off
    paced     256 users offering --paced-load (50%) of the service's closed-loop capacity
              measured in the same round, each at a fixed mean rate with jitter: latency
              at a realistic load; target p99 <= 25 ms, no errors
    redis     the service with NEXTWORD_SESSION_STORE=redis://... (a redis-server started on
              a free port when the binary exists, or --redis-url)
    variants  (--variant NAME:KEY=VALUE,...) the lstm service with more environment: a
              setting tried against the default in the same run (closed loop, and paced at
              the default's rate when paced is chosen)
    transports the bare app on each WebSocket implementation of uvicorn (websockets-sansio,
              the service's; websockets; wsproto) and on granian, at each --workers: what
              the server's own per-message work costs (--transports picks them)

deflate, paced and redis run with --base-workers API processes (default: what `nextword
serve` starts on this machine). Servers with the same settings are started once and shared.

Load: `LoadGenerator` (benchmarks/lib/wsload.py), --clients processes, each an asyncio loop
(uvloop) holding its share of the --sessions raw `websockets` connections, no compression
(except the deflate rows); each connection sends one word, waits for the answer, sends the
next (closed loop). Only answers within the --seconds window after --warmup count.

With no think time the load is a closed loop, so mean latency = sessions / throughput
(Little's law): the closed-loop rows give capacity, and their latency is that queue; the
paced row gives the latency at a realistic load.

All servers are started first and stay up; the configurations are then driven in turn,
--rounds times (interleaved, so a change in background load touches all alike). Clients
and servers share the machine's cores: the table gives the CPU each used during the window
(the service split into its engine and API processes) and the CPU per answered message by
process role: API (the processes that hold the connections), engine, supervisor (for the bare
app: uvicorn's or granian's parent process).

    python -m benchmarks.bench_e2e                  # every configuration -> results/e2e.json
    python -m benchmarks.bench_e2e --quick --configs ceiling --workers 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from tqdm import tqdm

from benchmarks.lib.cpu import machine_busy_s, process_cpu_s
from benchmarks.lib.machine import command_line, machine, machine_lines, usable_cores
from benchmarks.lib.models import FALLBACKS, models_dir, tiny_models
from benchmarks.lib.results import RESULTS, write_report
from benchmarks.lib.server import ServerProcess, free_port, redis_server, redis_version
from benchmarks.lib.wsload import Load, LoadGenerator, loop_name, message_texts
from service.config import Settings
from service.contract.tokenizer import is_word

MODULES = (
    "onnxruntime",
    "uvicorn",
    "websockets",
    "fastapi",
    "starlette",
    "msgspec",
    "zmq",
    "uvloop",
    "numpy",
    "wsproto",
    "granian",
)
CONFIGS = ("ceiling", "lstm", "deflate", "paced", "redis", "transports")
# The bare app's servers: uvicorn with a WebSocket implementation, or granian (ASGI).
SERVICE_TRANSPORT = "uvicorn/websockets-sansio"  # what `nextword serve` runs (httptools HTTP)
TRANSPORTS = (SERVICE_TRANSPORT, "uvicorn/websockets", "uvicorn/wsproto", "granian")
TARGET_API_CPU = 1.2  # API processes' CPU per message / the bare app's whole CPU per message
TARGET_SERVER_CPU = 1.5  # the whole service's CPU per message / the bare app's
TARGET_CEILING = 0.6  # service with a near-free model / bare
TARGET_LSTM = 0.45  # service with the bundled LSTM / bare
TARGET_PACED_P99_MS = 25.0
TARGET_ENGINE_MS = 0.020  # the engine process's CPU per message, near-free model (issue 19)
OTHER_LOAD_WARNING = 0.15  # cores used by other processes during a window
BARE, SERVICE = "bare", "service"
BARE_LABEL = "bare WS app"
BASELINE = ", baseline code"  # the row's service runs --baseline's checkout
LSTM_LABEL = "service, lstm"
QUICK = {"seconds": 1.5, "warmup": 0.5, "rounds": 1, "retries": 0}
FULL = {"seconds": 8.0, "warmup": 3.0, "rounds": 2, "retries": 2}
METRICS = (
    "nextword_batch_size_sum",
    "nextword_batch_size_count",
    "nextword_batch_run_duration_seconds_sum",
    "nextword_ws_message_duration_seconds_sum",
    "nextword_ws_message_duration_seconds_count",
    "nextword_engine_frames_total",
    "nextword_engine_requests_total",
    "nextword_engine_handoffs_total",
)
# The engine process's threads by what they do, from their OS names (service.engine.threads;
# a checkout that does not name them shows its threads under "other"): a name's prefix ->
# its part. The thread whose id is the process's is the event loop.
ENGINE_THREADS = (("nw-run-", "runs"), ("nw-input", "input"), ("ZMQbg", "zmq"))
ENGINE_PARTS = ("loop", "runs", "input", "zmq", "other")


# --- servers -------------------------------------------------------------------------------


@dataclass(eq=False)
class Server:
    """One server configuration, started once and driven by every row that names it."""

    kind: str  # BARE or SERVICE
    workers: int
    models: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    deflate: bool = False
    transport: str = SERVICE_TRANSPORT  # the bare app's server (TRANSPORTS)
    http: str = "httptools"  # the bare app's HTTP parser under uvicorn (httptools, h11)
    code: Path | None = None  # (service) run another checkout's code (its root)
    redis_pid: int | None = None
    process: ServerProcess | None = None
    roles: dict[str, list[psutil.Process]] = field(default_factory=dict)
    ready_dir: Path | None = None  # (bare) where each serving process writes its pid

    @property
    def key(self) -> tuple[Any, ...]:
        """Servers with equal keys are one server."""
        return (
            self.kind,
            self.workers,
            self.models,
            tuple(sorted(self.env.items())),
            self.deflate,
            self.transport if self.kind == BARE else "",
            self.http if self.kind == BARE else "",
            self.code,
        )

    @property
    def name(self) -> str:
        """A short name for logs and progress."""
        extras = [f"{k.removeprefix('NEXTWORD_').lower()}" for k in sorted(self.env)]
        return " ".join(
            [
                self.kind,
                f"x{self.workers}",
                *([self.models.name] if self.models else []),
                *(["deflate"] if self.deflate else []),
                *([self.transport] if self.kind == BARE else []),
                *([self.http] if self.kind == BARE and self.http != "httptools" else []),
                *(["baseline"] if self.code else []),
                *extras,
            ]
        )

    def make_process(self, log_dir: Path) -> ServerProcess:
        """The subprocess of this configuration, on a free port."""
        port = free_port()
        deflate = "true" if self.deflate else "false"
        if self.kind == SERVICE:
            env = {
                "NEXTWORD_HOST": "127.0.0.1",
                "NEXTWORD_PORT": str(port),
                "NEXTWORD_WORKERS": str(self.workers),
                "NEXTWORD_LOG_LEVEL": "warning",
                "NEXTWORD_MODELS_DIR": str(self.models),
                "NEXTWORD_WS_PER_MESSAGE_DEFLATE": deflate,
                **self.env,
            }
            command = [sys.executable, "-m", "service"]
            return ServerProcess(self.name, command, env, port=port, log_dir=log_dir, cwd=self.code)
        ready_dir = Path(tempfile.mkdtemp(prefix="ready-", dir=log_dir))
        self.ready_dir = ready_dir
        if self.transport == "granian":
            command = [
                *(sys.executable, "-m", "granian", "--interface", "asgi", "--loop", "uvloop"),
                *("--host", "127.0.0.1", "--port", str(port), "--workers", str(self.workers)),
                *("--log-level", "warning", "--no-access-log"),
                "benchmarks.bare_ws_app:app",
            ]
        else:
            ws = self.transport.removeprefix("uvicorn/")
            command = [
                *(sys.executable, "-m", "uvicorn", "benchmarks.bare_ws_app:app"),
                *("--host", "127.0.0.1", "--port", str(port), "--workers", str(self.workers)),
                *("--log-level", "warning", "--ws-max-size", "65536"),
                *("--ws-per-message-deflate", deflate, "--ws", ws, "--http", self.http),
            ]

        def all_up() -> bool:
            return len(list(ready_dir.iterdir())) >= self.workers

        return ServerProcess(
            self.name,
            command,
            {"BARE_WS_READY_DIR": str(ready_dir)},
            port=port,
            ready=all_up,
            log_dir=log_dir,
        )

    def find_roles(self) -> None:
        """Sort the server's processes into engine, API and supervisor (for CPU accounting)."""
        assert self.process is not None
        root = psutil.Process(self.process.pid)
        children = root.children(recursive=True)
        forked = sorted(
            (c for c in children if "--multiprocessing-fork" in c.cmdline()),
            key=lambda c: c.create_time(),
        )
        rest = [c for c in children if c not in forked]
        if self.kind == SERVICE:  # the supervisor starts the engine first, then the APIs
            self.roles = {"engine": forked[:1], "api": forked[1:], "supervisor": [root, *rest]}
        else:  # the processes that run the app wrote their pids at start (bare_ws_app)
            assert self.ready_dir is not None
            serving = {int(p.name) for p in self.ready_dir.iterdir()}
            everyone = [root, *children]
            self.roles = {
                "api": [p for p in everyone if p.pid in serving],
                "supervisor": [p for p in everyone if p.pid not in serving],
            }

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds by role so far."""
        return {role: sum(process_cpu_s(p) for p in procs) for role, procs in self.roles.items()}

    def engine_threads_s(self) -> dict[str, float]:
        """The engine process's CPU seconds so far by part (ENGINE_PARTS; "other": ONNX
        Runtime's pool threads and whatever else is not named); empty without an engine."""
        engines = self.roles.get("engine") or []
        if not engines:
            return {}
        parts = dict.fromkeys(ENGINE_PARTS, 0.0)
        engine = engines[0]
        try:
            threads = engine.threads()
        except psutil.Error:
            return {}
        for thread in threads:
            part = "other"
            if thread.id == engine.pid:
                part = "loop"
            else:
                try:
                    name = Path(f"/proc/{engine.pid}/task/{thread.id}/comm").read_text().strip()
                except OSError:  # it ended meanwhile
                    continue
                part = next((p for prefix, p in ENGINE_THREADS if name.startswith(prefix)), part)
            parts[part] += thread.user_time + thread.system_time
        return parts

    def describe(self) -> str:
        """Its pids by role (for a profiler)."""
        return ", ".join(
            f"{role} {' '.join(str(p.pid) for p in procs)}" for role, procs in self.roles.items()
        )


@dataclass(eq=False)
class Row:
    """One row of the table: a server driven in one way."""

    label: str
    server: Server
    words: list[str]
    bare: Row | None = None  # the bare app with the same processes, the ratio's denominator
    target: float | None = None  # of that ratio
    compression: bool = False
    pace_of: Row | None = None  # paced: the closed-loop row whose capacity sets the rate

    @property
    def key(self) -> str:
        """Unique: the label and the API processes."""
        return f"{self.label} [{self.server.workers}]"


def stream_words(models: Path, default_model: str = "lstm") -> list[str]:
    """Words the models know (the default model's vocabulary, most frequent first)."""
    vocab = models / default_model / "vocab.txt"
    if not vocab.is_file():
        vocab = next(models.glob("*/vocab.txt"))
    words = [t for t in vocab.read_text(encoding="utf-8").splitlines() if is_word(t)]
    return words[:2000]


class Plan:
    """The rows to measure, in the order of one round, and the servers they need."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.servers: dict[tuple[Any, ...], Server] = {}

    def server(self, candidate: Server) -> Server:
        """The server with these settings (started once)."""
        return self.servers.setdefault(candidate.key, candidate)

    def row(self, label: str, server: Server, words: list[str], **extra: Any) -> Row:
        """The row with this label on this server, added if new."""
        server = self.server(server)
        for row in self.rows:
            if row.label == label and row.server is server:
                return row
        row = Row(label, server, words, **extra)
        self.rows.append(row)
        return row


def make_plan(
    args: argparse.Namespace, models: Path, ceiling_models: Path | None, redis_url: str | None
) -> Plan:
    """Every row the chosen configurations need."""
    plan = Plan()
    words = stream_words(models)
    configs = set(args.configs)

    def bare(workers: int, deflate: bool = False, transport: str = SERVICE_TRANSPORT) -> Row:
        label = BARE_LABEL + (", deflate on" if deflate else "")
        if transport != SERVICE_TRANSPORT:
            label += f", {transport}"
        server = Server(BARE, workers, deflate=deflate, transport=transport)
        return plan.row(label, server, words, compression=deflate)

    def lstm(workers: int) -> Row:
        server = Server(SERVICE, workers, models, dict(args.env))
        return plan.row(LSTM_LABEL, server, words, bare=bare(workers), target=TARGET_LSTM)

    for workers in args.workers:
        if configs & {"ceiling", "lstm"}:
            bare(workers)
        if "ceiling" in configs:
            assert ceiling_models is not None
            for code in (None, args.baseline) if args.baseline else (None,):
                plan.row(
                    f"ceiling: service, tiny model (hidden {args.ceiling_hidden})"
                    + (BASELINE if code else ""),
                    Server(SERVICE, workers, ceiling_models, dict(args.env), code=code),
                    stream_words(ceiling_models),
                    bare=bare(workers),
                    target=TARGET_CEILING,
                )
        if "lstm" in configs:
            lstm(workers)
            if args.baseline:
                server = Server(SERVICE, workers, models, dict(args.env), code=args.baseline)
                plan.row(LSTM_LABEL + BASELINE, server, words, bare=bare(workers))
        if "transports" in configs:
            default = bare(workers)
            for transport in args.transports:
                if transport != SERVICE_TRANSPORT:
                    bare(workers, transport=transport).bare = default
    base = args.base_workers
    if "deflate" in configs:
        lstm(base)
        plan.row(
            f"{LSTM_LABEL}, deflate on",
            Server(SERVICE, base, models, dict(args.env), deflate=True),
            words,
            bare=bare(base, deflate=True),
            compression=True,
        )
    if "redis" in configs and redis_url is not None:
        lstm(base)
        env = {**args.env, "NEXTWORD_SESSION_STORE": redis_url}
        server = Server(SERVICE, base, models, env)
        plan.row(f"{LSTM_LABEL}, redis store", server, words, bare=bare(base))
    if "paced" in configs:
        capacity = lstm(base)
        label = f"{LSTM_LABEL}, paced {args.paced_load:.0%} of capacity"
        plan.row(label, capacity.server, words, pace_of=capacity)
        if args.baseline:  # the same offered rate (this code's capacity), on the old code
            server = Server(SERVICE, base, models, dict(args.env), code=args.baseline)
            plan.row(label + BASELINE, server, words, pace_of=capacity)
    for name, env in args.variant:
        capacity = lstm(base)
        server = Server(SERVICE, base, models, {**args.env, **env})
        plan.row(f"{LSTM_LABEL}, {name}", server, words, bare=bare(base))
        if "paced" in configs:  # and paced at the default's rate: latency against the default
            label = f"{LSTM_LABEL}, paced {args.paced_load:.0%} of capacity, {name}"
            plan.row(label, server, words, pace_of=capacity)
    return plan


@contextmanager
def started(plan: Plan, redis_pid: int | None, log_dir: Path) -> Iterator[None]:
    """Every server of the plan started and ready; all stopped at exit."""
    with ExitStack() as stack:
        servers = list(plan.servers.values())
        for server in servers:
            server.process = server.make_process(log_dir)
            stack.callback(server.process.stop)
            server.process.start()
            if "NEXTWORD_SESSION_STORE" in server.env:
                server.redis_pid = redis_pid
        for server in tqdm(servers, desc="starting servers", unit="server", leave=False):
            assert server.process is not None
            server.process.wait_ready()
            server.find_roles()
            tqdm.write(f"{server.name}: port {server.process.port}, pids: {server.describe()}")
        yield


# --- one measurement -----------------------------------------------------------------------


def scrape(server: Server) -> dict[str, float]:
    """Sums over all labels of the service's batch and message metrics (GET /metrics)."""
    assert server.process is not None
    totals = dict.fromkeys(METRICS, 0.0)
    try:
        with urllib.request.urlopen(server.process.url + "/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


@dataclass
class Snapshot:
    """CPU seconds at one moment."""

    at: float
    server: dict[str, float]
    engine_threads: dict[str, float]
    clients: float
    redis: float | None
    machine: float


def snapshot(
    server: Server, clients: list[psutil.Process], redis: psutil.Process | None
) -> Snapshot:
    """Where the CPU seconds stand now."""
    return Snapshot(
        time.monotonic(),
        server.cpu_s(),
        server.engine_threads_s(),
        sum(process_cpu_s(p) for p in clients),
        process_cpu_s(redis) if redis is not None else None,
        machine_busy_s(),
    )


def sleep_until(moment: float) -> None:
    """Sleep until time.monotonic() reaches `moment`."""
    time.sleep(max(0.0, moment - time.monotonic()))


def percentile(values: np.ndarray, q: float) -> float:
    """A percentile, NaN for no values."""
    return float(np.percentile(values, q)) if values.size else float("nan")


def measure(
    row: Row, load_gen: LoadGenerator, args: argparse.Namespace, rate: float | None
) -> dict[str, Any]:
    """Drive one row once: throughput, latency, errors, CPU, and the engine's batches."""
    server = row.server
    assert server.process is not None
    uri = f"ws://127.0.0.1:{server.process.port}/v1/stream"
    interval = args.sessions / rate if rate else 0.0
    load = Load(uri, message_texts(row.words), args.sessions, row.compression, interval)
    clients = [psutil.Process(pid) for pid in load_gen.pids]
    redis = psutil.Process(server.redis_pid) if server.redis_pid else None
    start, end = load_gen.start(load, args.warmup, args.seconds)
    sleep_until(start)
    before = snapshot(server, clients, redis)
    metrics_before = scrape(server) if server.kind == SERVICE else {}
    sleep_until(end)
    after = snapshot(server, clients, redis)
    metrics_after = scrape(server) if server.kind == SERVICE else {}
    outcome = load_gen.finish()

    wall = after.at - before.at
    server_cpu = {role: (after.server[role] - before.server[role]) / wall for role in after.server}
    total_server = sum(server_cpu.values())
    clients_cpu = (after.clients - before.clients) / wall
    redis_cpu = None
    if after.redis is not None and before.redis is not None:
        redis_cpu = (after.redis - before.redis) / wall
    busy = (after.machine - before.machine) / wall
    lat = outcome.latencies_ms
    msgs_per_s = outcome.answers / args.seconds
    result: dict[str, Any] = {
        "msgs_per_s": msgs_per_s,
        "answers": outcome.answers,
        "errors": outcome.errors,
        "error_samples": outcome.error_samples,
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "max_ms": float(lat.max()) if lat.size else float("nan"),
        "latencies_ms": lat,
        "deflate_connections": outcome.deflate_connections,
        "cpu_cores": {
            "server": total_server,
            **{f"server_{role}": value for role, value in server_cpu.items()},
            "clients": clients_cpu,
            "redis": redis_cpu,
            "rest_of_machine": busy - total_server - clients_cpu - (redis_cpu or 0.0),
        },
        "server_cpu_ms_per_msg": 1e3 * total_server / msgs_per_s if msgs_per_s else None,
        "cpu_ms_per_msg": {
            role: 1e3 * value / msgs_per_s if msgs_per_s else None
            for role, value in server_cpu.items()
        },
    }
    if rate:
        result["offered_msgs_per_s"] = rate
    if msgs_per_s and after.engine_threads and before.engine_threads:
        result["engine_ms_per_msg_by_thread"] = {
            part: 1e3
            * (after.engine_threads[part] - before.engine_threads[part])
            / wall
            / msgs_per_s
            for part in ENGINE_PARTS
        }
    delta = {k: metrics_after.get(k, 0.0) - metrics_before.get(k, 0.0) for k in metrics_after}
    if delta.get("nextword_batch_size_count"):
        batches = delta["nextword_batch_size_count"]
        result["mean_batch"] = delta["nextword_batch_size_sum"] / batches
        result["batches_per_s"] = batches / wall
        result["run_ms_per_batch"] = (
            1e3 * delta["nextword_batch_run_duration_seconds_sum"] / batches
        )
        if delta.get("nextword_engine_frames_total"):
            result["frames_per_s"] = delta["nextword_engine_frames_total"] / wall
            result["frames_per_batch"] = delta["nextword_engine_frames_total"] / batches
            result["requests_per_frame"] = (
                delta["nextword_engine_requests_total"] / delta["nextword_engine_frames_total"]
            )
            result["frames_per_handoff"] = delta["nextword_engine_frames_total"] / max(
                1.0, delta["nextword_engine_handoffs_total"]
            )
    if delta.get("nextword_ws_message_duration_seconds_count"):
        result["api_ms_per_msg"] = (
            1e3
            * delta["nextword_ws_message_duration_seconds_sum"]
            / delta["nextword_ws_message_duration_seconds_count"]
        )
    return result


def wait_for_quiet(limit_s: float) -> float:
    """Wait (up to `limit_s`) until the machine is nearly idle for a second; its busy cores."""
    deadline = time.monotonic() + limit_s
    while True:
        before = machine_busy_s()
        time.sleep(1.0)
        busy = machine_busy_s() - before
        if busy <= OTHER_LOAD_WARNING or time.monotonic() >= deadline:
            return busy


def run_rounds(
    plan: Plan, load_gen: LoadGenerator, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Every row, `args.rounds` times, interleaved; a row disturbed by other load is measured
    again (up to `args.retries` times, after waiting for the machine to be quiet)."""
    rounds: list[dict[str, Any]] = []
    progress = tqdm(total=args.rounds * len(plan.rows), desc="measuring", unit="row")
    with progress:
        for r in range(args.rounds):
            results: dict[str, Any] = {}
            for row in plan.rows:
                progress.set_postfix_str(f"round {r + 1}: {row.key}")
                rate = None
                if row.pace_of is not None:
                    rate = args.paced_load * results[row.pace_of.key]["msgs_per_s"]
                for attempt in range(args.retries + 1):
                    m = measure(row, load_gen, args, rate)
                    other = m["cpu_cores"]["rest_of_machine"]
                    if other <= OTHER_LOAD_WARNING or attempt == args.retries:
                        break
                    busy = wait_for_quiet(args.quiet_wait)
                    tqdm.write(
                        f"  {row.key}: other processes used {other:.2f} cores; measuring again "
                        f"(machine busy {busy:.2f} cores now)"
                    )
                m["attempts"] = attempt + 1
                results[row.key] = m
                progress.update()
                tqdm.write(
                    f"round {r + 1}/{args.rounds} {row.key}: {m['msgs_per_s']:,.0f} msgs/s, "
                    f"p50 {m['p50_ms']:.2f} ms, p99 {m['p99_ms']:.2f} ms, errors {m['errors']}, "
                    f"server CPU {m['cpu_cores']['server']:.2f}, "
                    f"clients CPU {m['cpu_cores']['clients']:.2f}, other {other:.2f}"
                )
                for sample in m["error_samples"]:
                    tqdm.write(f"  error: {sample}")
            rounds.append(results)
    return rounds


# --- the report ----------------------------------------------------------------------------


def summarize(plan: Plan, rounds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per row: median throughput over rounds, latency over all rounds pooled."""
    out: dict[str, dict[str, Any]] = {}
    for row in plan.rows:
        runs = [r[row.key] for r in rounds]
        lat = np.concatenate([r["latencies_ms"] for r in runs])
        cpu_keys = runs[0]["cpu_cores"]
        summary: dict[str, Any] = {
            "configuration": row.label,
            "api_processes": row.server.workers,
            "msgs_per_s": statistics.median(r["msgs_per_s"] for r in runs),
            "msgs_per_s_by_round": [round(r["msgs_per_s"], 1) for r in runs],
            "p50_ms": percentile(lat, 50),
            "p99_ms": percentile(lat, 99),
            "mean_ms": float(lat.mean()) if lat.size else float("nan"),
            "max_ms": float(lat.max()) if lat.size else float("nan"),
            "errors": sum(r["errors"] for r in runs),
            "error_samples": [s for r in runs for s in r["error_samples"]][:5],
            "cpu_cores": {
                key: None
                if cpu_keys[key] is None
                else statistics.mean(r["cpu_cores"][key] for r in runs)
                for key in cpu_keys
            },
            "deflate_connections": runs[-1]["deflate_connections"],
        }
        if all(None not in r["cpu_ms_per_msg"].values() for r in runs):
            summary["cpu_ms_per_msg"] = {
                role: statistics.mean(r["cpu_ms_per_msg"][role] for r in runs)
                for role in runs[0]["cpu_ms_per_msg"]
            }
        for key in (
            "server_cpu_ms_per_msg",
            "mean_batch",
            "batches_per_s",
            "run_ms_per_batch",
            "api_ms_per_msg",
            "offered_msgs_per_s",
            "frames_per_s",
            "frames_per_batch",
            "requests_per_frame",
            "frames_per_handoff",
        ):
            if all(r.get(key) is not None for r in runs):
                summary[key] = statistics.mean(r[key] for r in runs)
        if all("engine_ms_per_msg_by_thread" in r for r in runs):
            summary["engine_ms_per_msg_by_thread"] = {
                part: statistics.mean(r["engine_ms_per_msg_by_thread"][part] for r in runs)
                for part in ENGINE_PARTS
            }
        if row.bare is not None:
            summary["bare"] = row.bare.key
            summary["ratio_to_bare_by_round"] = [
                round(r[row.key]["msgs_per_s"] / r[row.bare.key]["msgs_per_s"], 3)
                for r in rounds
                if r[row.bare.key]["msgs_per_s"]
            ]
        if row.target is not None:
            summary["target_ratio"] = row.target
        out[row.key] = summary
    for row in plan.rows:
        if row.bare is not None and out[row.bare.key]["msgs_per_s"]:
            out[row.key]["ratio_to_bare"] = (
                out[row.key]["msgs_per_s"] / out[row.bare.key]["msgs_per_s"]
            )
    return out


def fmt(value: object, spec: str) -> str:
    """A table cell: formatted, or '-' for a figure that does not apply."""
    return "-" if value is None else format(value, spec)


def verdict(ok: bool) -> str:
    """How a target fared."""
    return "met" if ok else "NOT met"


def table(report: dict[str, Any]) -> str:
    """The figures as markdown, headed by the machine, with the targets checked."""
    s: dict[str, dict[str, Any]] = report["summary"]
    a = report["args"]
    lines = [
        *machine_lines(report["machine"], MODULES),
        report["models_note"],
        report["ceiling_note"],
        report["redis_note"],
        f"load: {a['sessions']} WebSocket sessions from {a['clients']} client processes "
        f"(websockets {report['machine']['websockets']} on {report['client_loop']}, no "
        "compression except the deflate rows); closed loop (one word per message, the next "
        f"sent when the answer arrives) except the paced row; {a['rounds']} round(s) of "
        f"{a['seconds']:g} s after {a['warmup']:g} s warm-up per row, rows interleaved",
    ]
    if a["env"]:
        lines.append(f"environment of every service: {a['env']}")
    lines += [
        "",
        "| configuration | API procs | msgs/s (median) | by round | / bare | p50 ms | p99 ms "
        "| errors | CPU server (engine + API + sup.) | CPU ms/msg (engine + API + sup.) "
        "| CPU clients "
        "| CPU redis | CPU rest | mean batch | run ms/batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s.values():
        cpu = r["cpu_cores"]
        parts = " + ".join(
            f"{cpu[k]:.2f}"
            for k in ("server_engine", "server_api", "server_supervisor")
            if cpu.get(k) is not None
        )
        by_round = ", ".join(f"{x:,.0f}" for x in r["msgs_per_s_by_round"])
        per_msg = r.get("cpu_ms_per_msg") or {}
        per_role = " + ".join(
            f"{per_msg[k]:.3f}" for k in ("engine", "api", "supervisor") if k in per_msg
        )
        lines.append(
            f"| {r['configuration']} | {r['api_processes']} | {r['msgs_per_s']:,.0f} | {by_round} "
            f"| {fmt(r.get('ratio_to_bare'), '.2f')} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['errors']} | {cpu['server']:.2f} ({parts}) "
            f"| {fmt(r.get('server_cpu_ms_per_msg'), '.3f')} ({per_role}) | {cpu['clients']:.2f} "
            f"| {fmt(cpu['redis'], '.2f')} | {cpu['rest_of_machine']:.2f} "
            f"| {fmt(r.get('mean_batch'), '.1f')} "
            f"| {fmt(r.get('run_ms_per_batch'), '.2f')} |"
        )
    nproc = report["machine"]["nproc"]
    lines += [
        "",
        f"CPU: cores used during the measured window (the machine has {nproc}); 'CPU rest' is "
        "everything else that ran meanwhile (other jobs, the idle servers). 'server CPU "
        "ms/msg' is the server's CPU time per answered message, split by process role (the bare "
        "app's API processes are those that run the app, its 'sup.' the server's parent). 'run ms/batch' is the engine's "
        "ONNX Runtime time per batch; '/ bare' divides by the bare app with the same processes "
        "(deflate on: by the bare app with deflate on).",
        "",
    ]
    lines += notes(report)
    return "\n".join(lines)


def engine_lines(r: dict[str, Any]) -> list[str]:
    """Where a service row's engine CPU per message went, by thread, and how its requests
    arrived (frames per batch, requests per frame); the engine target on the ceiling rows."""
    lines = []
    engine = (r.get("cpu_ms_per_msg") or {}).get("engine")
    if engine is not None and r["configuration"].startswith("ceiling"):
        lines.append(
            f"- {r['configuration']}, {r['api_processes']} API process(es): engine CPU per "
            f"message {engine:.4f} ms (target <= {TARGET_ENGINE_MS:g}: "
            f"{verdict(engine <= TARGET_ENGINE_MS)})"
        )
    threads = r.get("engine_ms_per_msg_by_thread")
    if threads is None:
        return lines
    names = {"loop": "event loop", "runs": "model runs", "input": "input", "zmq": "ZeroMQ I/O"}
    parts = ", ".join(
        f"{names.get(part, 'other (ONNX Runtime pool)')} {threads[part]:.4f}"
        for part in ENGINE_PARTS
    )
    intake = ""
    if "frames_per_s" in r:
        intake = (
            f"; intake {r['frames_per_s']:,.0f} frames/s of {r['requests_per_frame']:.1f} "
            f"requests, {r['frames_per_batch']:.1f} frames per batch, "
            f"{r['frames_per_handoff']:.2f} frames per hand-off to the loop"
        )
    lines.append(
        f"  engine CPU ms per message by thread ({r['configuration']}, "
        f"x{r['api_processes']}): {parts}{intake}"
    )
    return lines


def notes(report: dict[str, Any]) -> list[str]:
    """The targets, the scaling and the comparisons, one line each."""
    s: dict[str, dict[str, Any]] = report["summary"]
    sessions = report["args"]["sessions"]
    lines = []
    busiest = max(s.values(), key=lambda r: r["cpu_cores"]["rest_of_machine"])
    if busiest["cpu_cores"]["rest_of_machine"] > OTHER_LOAD_WARNING:
        lines.append(
            f"- WARNING: other processes used up to {busiest['cpu_cores']['rest_of_machine']:.2f} "
            f"cores during a measured window ({busiest['configuration']} "
            f"x{busiest['api_processes']}): those rows are lower than on a quiet machine"
        )
    closed = [r for r in s.values() if "offered_msgs_per_s" not in r and r["msgs_per_s"]]
    if closed:
        r = max(closed, key=lambda r: r["msgs_per_s"])
        lines.append(
            f"- closed loop: mean latency = sessions / throughput (Little's law; e.g. "
            f"{r['configuration']} x{r['api_processes']}: {sessions} / {r['msgs_per_s']:,.0f} "
            f"= {1e3 * sessions / r['msgs_per_s']:.1f} ms); its latency is that queue, not "
            "the service's response time: see the paced row"
        )
    for r in s.values():
        bare = s.get(r.get("bare", ""))
        if (
            bare is not None
            and r["configuration"].startswith(("ceiling", LSTM_LABEL))
            and "cpu_ms_per_msg" in r
            and bare.get("server_cpu_ms_per_msg")
        ):
            whole = bare["server_cpu_ms_per_msg"]
            api = r["cpu_ms_per_msg"].get("api", 0.0) / whole
            server = r["server_cpu_ms_per_msg"] / whole
            lines.append(
                f"- {r['configuration']}, {r['api_processes']} API process(es): CPU per message "
                f"of the API processes / the bare app's whole server {api:.2f} (target <= "
                f"{TARGET_API_CPU:g}: {verdict(api <= TARGET_API_CPU)}); of the whole service "
                f"{server:.2f} (target <= {TARGET_SERVER_CPU:g}: "
                f"{verdict(server <= TARGET_SERVER_CPU)})"
            )
        if "target_ratio" in r and "ratio_to_bare" in r:
            ok = r["ratio_to_bare"] >= r["target_ratio"]
            lines.append(
                f"- {r['configuration']} / bare, {r['api_processes']} API process(es): "
                f"{r['ratio_to_bare']:.2f} (by round {r['ratio_to_bare_by_round']}; target >= "
                f"{r['target_ratio']:g}: {verdict(ok)})"
            )
        lines += engine_lines(r)
    by_label: dict[str, dict[int, float]] = {}
    for r in s.values():
        if "offered_msgs_per_s" not in r:
            by_label.setdefault(r["configuration"], {})[r["api_processes"]] = r["msgs_per_s"]
    for label, series in by_label.items():
        if len(series) > 1 and min(series) in series and series[min(series)]:
            one = series[min(series)]
            steps = ", ".join(f"{w}: {v:,.0f} ({v / one:.2f}x)" for w, v in sorted(series.items()))
            lines.append(f"- scaling, {label}: msgs/s by API processes: {steps}")
    for r in s.values():
        label = r["configuration"]
        if label.endswith("deflate on"):
            off = next(
                (
                    o
                    for o in s.values()
                    if o["configuration"] == label.removesuffix(", deflate on")
                    and o["api_processes"] == r["api_processes"]
                ),
                None,
            )
            if off and off["msgs_per_s"]:
                lines.append(
                    f"- deflate on / off, {label.removesuffix(', deflate on')}: "
                    f"{r['msgs_per_s'] / off['msgs_per_s']:.2f}x msgs/s (negotiated on "
                    f"{r['deflate_connections']} of {sessions} connections)"
                )
        if "offered_msgs_per_s" in r:
            ok = r["p99_ms"] <= TARGET_PACED_P99_MS and r["errors"] == 0
            lines.append(
                f"- {label}: {r['offered_msgs_per_s']:,.0f} msgs/s offered "
                f"({sessions} users, {r['offered_msgs_per_s'] / sessions:.1f} msgs/s each), "
                f"{r['msgs_per_s']:,.0f} answered; p50 {r['p50_ms']:.1f} ms, p99 "
                f"{r['p99_ms']:.1f} ms, {r['errors']} errors (target p99 <= "
                f"{TARGET_PACED_P99_MS:g} ms, no errors: {verdict(ok)})"
            )
            if r.get("api_ms_per_msg") is not None and r.get("run_ms_per_batch") is not None:
                # Where a message's time goes: the clients' mean against the API process's
                # own (arrival to answer sent, the engine's round trip included) and the
                # engine's ONNX Runtime time per batch (a message waits for the batch
                # running when it comes, then runs in the next).
                lines.append(
                    f"  where the time goes: client mean {r['mean_ms']:.1f} ms; in the API "
                    f"process (arrival to answer sent) {r['api_ms_per_msg']:.1f} ms; the engine "
                    f"runs batches of {fmt(r.get('mean_batch'), '.1f')} in "
                    f"{r['run_ms_per_batch']:.1f} ms of ONNX Runtime each"
                )
        if label.endswith("redis store"):
            memory = next(
                (
                    o
                    for o in s.values()
                    if o["configuration"] == LSTM_LABEL and o["api_processes"] == r["api_processes"]
                ),
                None,
            )
            if memory and memory["msgs_per_s"]:
                lines.append(
                    f"- redis store / in-process store: {r['msgs_per_s'] / memory['msgs_per_s']:.2f}x "
                    f"msgs/s; redis-server used {fmt(r['cpu_cores']['redis'], '.2f')} cores"
                )
    return lines


# --- command line --------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]."""
    return [int(x) for x in text.split(",") if x.strip()]


def config_list(text: str) -> list[str]:
    """'ceiling,lstm' -> checked names."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown configurations {sorted(unknown)}; of {CONFIGS}")
    return names


def transport_list(text: str) -> list[str]:
    """'granian,uvicorn/wsproto' -> checked names."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = set(names) - set(TRANSPORTS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown servers {sorted(unknown)}; of {TRANSPORTS}")
    return names


def env_pair(text: str) -> tuple[str, str]:
    """'KEY=VALUE' -> (KEY, VALUE)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def variant(text: str) -> tuple[str, dict[str, str]]:
    """'NAME:KEY=VALUE,KEY=VALUE' -> (NAME, {KEY: VALUE, ...})."""
    name, sep, pairs = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME:KEY=VALUE[,KEY=VALUE...], got {text!r}")
    return name, dict(env_pair(pair) for pair in pairs.split(","))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cores = usable_cores()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--configs",
        type=config_list,
        default=list(CONFIGS),
        help=f"comma list of configurations, of {', '.join(CONFIGS)}",
    )
    p.add_argument(
        "--workers",
        type=int_list,
        default=[w for w in (1, 2, 4, 8) if w <= cores] or [1],
        help="comma list of API process counts for the ceiling, lstm and bare rows",
    )
    p.add_argument(
        "--base-workers",
        type=int,
        default=Settings(workers=0).api_processes(),
        help="API processes of the deflate, paced and redis rows (default: as `nextword serve`)",
    )
    p.add_argument(
        "--transports",
        type=transport_list,
        default=list(TRANSPORTS),
        help=f"servers of the bare app in the transports rows, of {', '.join(TRANSPORTS)}",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        help="another checkout's root (e.g. `git worktree add /tmp/base main`): the ceiling, "
        "lstm and paced rows are measured on its code too, alternated with this one's (the "
        "paced one at the same offered rate)",
    )
    p.add_argument("--models", type=Path, help="models directory (default: the bundled models)")
    p.add_argument(
        "--fallback",
        choices=FALLBACKS,
        default="tiny",
        help="random-weight models to export when there are no bundled ones",
    )
    p.add_argument(
        "--ceiling-models",
        type=Path,
        help="models of the ceiling rows (default: tiny ones exported into a temp dir)",
    )
    p.add_argument("--ceiling-hidden", type=int, default=32, help="hidden size of those")
    p.add_argument("--sessions", type=int, default=256, help="concurrent WebSocket sessions")
    p.add_argument(
        "--clients",
        type=int,
        default=max(2, min(8, cores // 2)),
        help="client processes sharing the sessions",
    )
    p.add_argument("--seconds", type=float, help=f"measured seconds per row ({FULL['seconds']:g})")
    p.add_argument("--warmup", type=float, help=f"unmeasured seconds first ({FULL['warmup']:g})")
    p.add_argument("--rounds", type=int, help=f"passes over all rows ({FULL['rounds']})")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run: {QUICK}, no JSON unless --json",
    )
    p.add_argument(
        "--paced-load",
        type=float,
        default=0.5,
        help="the paced row's offered load, as a share of the closed-loop capacity",
    )
    p.add_argument(
        "--retries",
        type=int,
        help=f"measure a row again when other processes used > {OTHER_LOAD_WARNING} cores "
        f"({FULL['retries']}; quick: {QUICK['retries']})",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="longest wait for the machine to be quiet before measuring again (seconds)",
    )
    p.add_argument("--redis-url", help="an existing Redis for the redis row (default: start one)")
    p.add_argument(
        "--env",
        type=env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment of every service (repeatable)",
    )
    p.add_argument(
        "--variant",
        type=variant,
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="one more row: the lstm service (--base-workers) with this environment, to try "
        "a setting against the default in the same run (repeatable), e.g. "
        "'max batch 64:NEXTWORD_MAX_BATCH=64'; with --configs paced, also paced at the "
        "default's rate",
    )
    p.add_argument("--json", type=Path, help=f"where to write the report ({RESULTS}/e2e.json)")
    p.add_argument("--log-dir", type=Path, help="keep the servers' logs here (default: a temp dir)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.json is None and not args.quick:
        args.json = RESULTS / "e2e.json"
    args.env = dict(args.env)
    return args


@contextmanager
def redis_for(args: argparse.Namespace) -> Iterator[tuple[str | None, int | None, str]]:
    """(store URL, redis-server pid if started here, a note) for the redis row."""
    if "redis" not in args.configs:
        yield None, None, "redis: not measured"
    elif args.redis_url:
        yield args.redis_url, None, f"redis: {args.redis_url} (given; its CPU is not measured)"
    elif redis_version() is None:
        yield None, None, "redis: skipped (no redis-server binary; pass --redis-url)"
    else:
        with redis_server() as (url, pid):
            yield url, pid, f"redis: redis-server {redis_version()} on {url}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = machine(MODULES)
    with ExitStack() as stack:
        models, models_note = stack.enter_context(models_dir(args.models, args.fallback))
        ceiling_models, ceiling_note = args.ceiling_models, "ceiling: not measured"
        if "ceiling" in args.configs:
            if ceiling_models is None:
                ceiling_models = stack.enter_context(tiny_models(args.ceiling_hidden))
                ceiling_note = (
                    f"ceiling: tiny random-weight models (model_export.tiny, hidden "
                    f"{args.ceiling_hidden}, ~200 words), exported for this run"
                )
            else:
                ceiling_note = f"ceiling: models in {ceiling_models}"
        redis_url, redis_pid, redis_note = stack.enter_context(redis_for(args))
        plan = make_plan(args, models, ceiling_models, redis_url)
        if args.log_dir is not None:
            args.log_dir.mkdir(parents=True, exist_ok=True)
            log_dir = args.log_dir
        else:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-e2e-")))
        load_gen = stack.enter_context(LoadGenerator(args.clients))
        stack.enter_context(started(plan, redis_pid, log_dir))
        rounds = run_rounds(plan, load_gen, args)
    report: dict[str, Any] = {
        "machine": info,
        "models_note": models_note,
        "ceiling_note": ceiling_note,
        "redis_note": redis_note,
        "client_loop": loop_name(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": command_line("benchmarks.bench_e2e", argv),
        "summary": summarize(plan, rounds),
        "rounds": [
            {key: {k: v for k, v in r.items() if k != "latencies_ms"} for key, r in rnd.items()}
            for rnd in rounds
        ],
    }
    text = table(report)
    print(text)
    if args.json is not None:
        write_report(args.json, report, text)


if __name__ == "__main__":
    main()
