"""End-to-end WebSocket benchmark: many sessions streaming one word per message.

Each configuration is a real uvicorn server started as a subprocess on a free
loopback port (one worker, log level warning):

- batching on:  `python -m service` with the default settings;
- batching off: the same with NEXTWORD_MAX_BATCH=1 (one model run per word);
- bare:         `benchmarks/bare_ws_app.py`, a WebSocket app that parses each message
                and answers a fixed five-prediction JSON (no validation, no model);
- redis:        batching on with NEXTWORD_SESSION_STORE=redis://... (a redis-server
                started on a free port when the binary exists, or --redis-url);
- variants:     more batching-on servers with extra environment (--variant), to try a
                setting against the default in the same run;
- paced:        the batching-on server again, each session pausing --think-ms after
                each answer (250 ms: 4 words/s per session, faster than any typist).

Without think time the load is a closed loop, so mean latency = sessions / throughput
(Little's law): at 256 sessions a p99 within 50 ms needs well over 5,000 messages/s.
The paced row gives the latency at a lower, typist-like load.

All servers are started first and stay up; the load generator then drives them in
turn, `--rounds` times (configurations interleaved, so a change in background load
touches all of them alike). The load generator is this process: one asyncio loop
(uvloop when installed) holding `--sessions` connections of the `websockets`
client, no compression; each connection sends one word, waits for the answer, sends
the next. Only answers that arrive within the `--seconds` window after `--warmup`
count. Client, server (and redis-server) share the machine's cores: the table gives
the CPU each used during the window, in cores, and what the rest of the machine used.

    .venv/bin/python benchmarks/bench_e2e.py --json benchmarks/results/e2e.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.testbed import FALLBACKS, ROOT, machine, machine_lines, models_dir  # noqa: E402
from service.contract.tokenizer import is_word  # noqa: E402

MODULES = ("onnxruntime", "uvicorn", "websockets", "fastapi", "starlette", "uvloop", "numpy")
TICKS = os.sysconf("SC_CLK_TCK")
TARGET_BATCHING = 2.0  # batching on / off
TARGET_SHARE_OF_BARE = 0.30  # ours / bare
TARGET_P99_MS = 50.0
ON, OFF, BARE, REDIS = "batching on", "batching off", "bare uvicorn WS", "redis store"
PACED = "batching on, paced"


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores, /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / TICKS


def client_cpu_s() -> float:
    """CPU seconds of this process (the load generator)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def scrape(port: int) -> dict[str, float]:
    """Sums of the service's batch, run and message metrics (all labels) from /metrics."""
    wanted = (
        "nextword_batch_size_sum",
        "nextword_batch_size_count",
        "nextword_batch_run_duration_seconds_sum",
        "nextword_ws_message_duration_seconds_sum",
        "nextword_ws_message_duration_seconds_count",
    )
    totals = dict.fromkeys(wanted, 0.0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except (OSError, urllib.error.URLError):
        return {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


@dataclass
class Server:
    """One uvicorn server subprocess on a loopback port."""

    name: str
    command: list[str]
    env: dict[str, str]
    ready_path: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    helper_pid: int | None = None  # redis-server of the redis configuration

    def start(self, log_dir: Path) -> None:
        """Start the process, its output going to a log file in `log_dir`."""
        self.log = log_dir / f"{self.name.replace(' ', '_')}.log"
        env = {**os.environ, **self.env}
        command = [c.replace("{port}", str(self.port)) for c in self.command]
        env = {k: v.replace("{port}", str(self.port)) for k, v in env.items()}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Poll `ready_path` until it answers 200; exit with the log if the server dies."""
        assert self.proc is not None and self.log is not None
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}{self.ready_path}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(
                    f"{self.name}: server exited with {self.proc.returncode}:\n"
                    f"{self.log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        sys.exit(f"{self.name}: not ready after {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM (graceful shutdown), SIGKILL after 30 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def service_server(name: str, models: Path, extra_env: dict[str, str]) -> Server:
    """`python -m service` (one worker, log level warning) over `models`."""
    env = {
        "NEXTWORD_HOST": "127.0.0.1",
        "NEXTWORD_PORT": "{port}",
        "NEXTWORD_WORKERS": "1",
        "NEXTWORD_LOG_LEVEL": "warning",
        "NEXTWORD_MODELS_DIR": str(models),
        **extra_env,
    }
    return Server(name, [sys.executable, "-m", "service"], env, "/readyz")


def bare_server() -> Server:
    """uvicorn serving `benchmarks/bare_ws_app.py` with the service's frame limit."""
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "benchmarks.bare_ws_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--workers",
        "1",
        "--log-level",
        "warning",
        "--ws-max-size",
        "65536",
    ]
    return Server(BARE, command, {}, "/openapi.json")


@contextmanager
def redis_server(url: str | None) -> Iterator[tuple[str | None, int | None, str]]:
    """(store URL, redis-server pid if started here, a note) for the redis configuration."""
    if url is not None:
        yield url, None, f"redis: {url} (given; its CPU is not measured)"
        return
    if shutil.which("redis-server") is None:
        yield None, None, "redis: skipped (no redis-server binary; pass --redis-url)"
        return
    from tests.redis_server import RedisServer  # noqa: PLC0415

    server = RedisServer()
    server.start()
    try:
        assert server.proc is not None
        version = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True
        ).stdout.split()
        note = f"redis: redis-server {version[2] if len(version) > 2 else '?'} on {server.url}"
        yield server.url, server.proc.pid, note
    finally:
        server.stop()


def stream_words(models: Path, default_model: str = "lstm") -> list[str]:
    """Words the models know (the default model's vocabulary, most frequent first)."""
    vocab = models / default_model / "vocab.txt"
    if not vocab.is_file():
        vocab = next(models.glob("*/vocab.txt"))
    words = [t for t in vocab.read_text(encoding="utf-8").splitlines() if is_word(t)]
    return words[:2000]


# --- the load generator ------------------------------------------------------------


async def open_sessions(uri: str, sessions: int) -> list[ClientConnection]:
    """`sessions` connections, each past its `ready` message."""

    async def one() -> ClientConnection:
        ws = await connect(
            uri,
            compression=None,
            ping_interval=None,
            open_timeout=60,
            close_timeout=5,
            max_size=2**20,
        )
        ready = await ws.recv()
        if not str(ready).startswith('{"type":"ready"'):
            raise RuntimeError(f"expected a ready message, got {str(ready)[:200]}")
        return ws

    opened: list[ClientConnection] = []
    for start in range(0, sessions, 64):  # in waves: no accept-queue overflow
        opened += await asyncio.gather(*(one() for _ in range(start, min(sessions, start + 64))))
    return opened


async def stream(
    ws: ClientConnection,
    messages: list[str],
    start: float,
    end: float,
    latencies: list[float],
    think_s: float,
) -> tuple[int, int]:
    """Send a word, wait for its answer (and `think_s`), repeat until `end`; (answers, errors)."""
    clock = time.perf_counter
    count = errors = 0
    n, i = len(messages), 0
    try:
        if think_s:  # sessions out of step, as real typists are
            await asyncio.sleep(random.uniform(0, think_s))
        while True:
            if think_s and i:
                await asyncio.sleep(think_s)
            sent = clock()
            if sent >= end:
                break
            await ws.send(messages[i % n])
            reply = await ws.recv()
            done = clock()
            i += 1
            if done < start or done >= end:
                continue
            if isinstance(reply, str) and reply.startswith('{"type":"predictions"'):
                latencies.append(done - sent)
                count += 1
            else:
                errors += 1
    except ConnectionClosed:
        errors += 1
    return count, errors


async def drive(
    server: Server,
    sessions: int,
    words: list[str],
    warmup: float,
    seconds: float,
    think_s: float = 0.0,
) -> dict[str, Any]:
    """One measurement of one server."""
    uri = f"ws://127.0.0.1:{server.port}/v1/stream"
    conns = await open_sessions(uri, sessions)
    messages = [json.dumps({"text": w}) for w in words]
    clock = time.perf_counter
    start = clock() + warmup
    end = start + seconds
    latencies: list[list[float]] = [[] for _ in conns]
    tasks = [
        asyncio.create_task(
            stream(
                ws, messages[i * 7 % len(messages) :] + messages, start, end, latencies[i], think_s
            )
        )
        for i, ws in enumerate(conns)
    ]
    assert server.proc is not None
    pids = [server.proc.pid] + ([server.helper_pid] if server.helper_pid else [])

    def snapshot() -> tuple[float, float, list[float], float]:
        return clock(), client_cpu_s(), [process_cpu_s(p) for p in pids], machine_busy_s()

    await asyncio.sleep(max(0.0, start - clock()))
    before = snapshot()
    metrics_before = await asyncio.to_thread(scrape, server.port)
    await asyncio.sleep(max(0.0, end - clock()))
    after = snapshot()
    metrics_after = await asyncio.to_thread(scrape, server.port)
    outcomes = await asyncio.gather(*tasks)
    await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)

    wall = after[0] - before[0]
    client = (after[1] - before[1]) / wall
    server_cpu = [(a - b) / wall for a, b in zip(after[2], before[2])]
    busy = (after[3] - before[3]) / wall
    lat = np.array([x for per in latencies for x in per]) * 1e3
    answered = sum(c for c, _ in outcomes)
    result: dict[str, Any] = {
        "messages": answered,
        "errors": sum(e for _, e in outcomes),
        "msgs_per_s": answered / seconds,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
        "max_ms": float(lat.max()) if lat.size else float("nan"),
        "latencies_ms": lat,
        "cpu_cores": {
            "client": client,
            "server": server_cpu[0],
            "redis": server_cpu[1] if len(server_cpu) > 1 else None,
            "rest_of_machine": busy - client - sum(server_cpu),
        },
    }
    delta = {k: metrics_after.get(k, 0.0) - metrics_before.get(k, 0.0) for k in metrics_after}
    if delta.get("nextword_batch_size_count"):
        batches = delta["nextword_batch_size_count"]
        result["mean_batch"] = delta["nextword_batch_size_sum"] / batches
        result["batches_per_s"] = batches / seconds
        result["run_ms_per_batch"] = (
            1e3 * delta["nextword_batch_run_duration_seconds_sum"] / batches
        )
    if delta.get("nextword_ws_message_duration_seconds_count"):
        result["server_ms_per_message"] = (
            1e3
            * delta["nextword_ws_message_duration_seconds_sum"]
            / delta["nextword_ws_message_duration_seconds_count"]
        )
    return result


# --- the report --------------------------------------------------------------------


def summarize(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per configuration: median throughput over rounds, latency over all rounds pooled."""
    out: dict[str, dict[str, Any]] = {}
    for name in rounds[0]:
        runs = [r[name] for r in rounds]
        lat = np.concatenate([r["latencies_ms"] for r in runs])
        summary: dict[str, Any] = {
            "msgs_per_s": statistics.median(r["msgs_per_s"] for r in runs),
            "msgs_per_s_by_round": [round(r["msgs_per_s"], 1) for r in runs],
            "p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
            "max_ms": float(lat.max()) if lat.size else float("nan"),
            "errors": sum(r["errors"] for r in runs),
            "cpu_cores": {
                key: None if value is None else statistics.mean(r["cpu_cores"][key] for r in runs)
                for key, value in runs[0]["cpu_cores"].items()
            },
        }
        for key in ("mean_batch", "run_ms_per_batch", "server_ms_per_message", "batches_per_s"):
            if all(key in r for r in runs):
                summary[key] = statistics.mean(r[key] for r in runs)
        out[name] = summary
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
        report["redis_note"],
        f"load: {a['sessions']} WebSocket sessions, one word per message, the next word sent "
        f"when the answer arrives (paced rows: after a further think time); {a['rounds']} "
        f"round(s) of {a['seconds']:g} s after {a['warmup']:g} s warm-up per configuration, "
        f"configurations interleaved; client: websockets {report['machine']['websockets']} on "
        f"{report['client_loop']}, no compression, in one process",
    ]
    if a["env"]:
        lines.append(f"environment of every service server: {' '.join(a['env'])}")
    lines += [
        "",
        "| configuration | msgs/s (median) | by round | p50 ms | p99 ms | max ms | errors "
        "| mean batch | run ms/batch | server ms/msg | CPU client | CPU server | CPU redis "
        "| CPU rest of machine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in s.items():
        cpu = r["cpu_cores"]
        by_round = ", ".join(f"{x:,.0f}" for x in r["msgs_per_s_by_round"])
        lines.append(
            f"| {name} | {r['msgs_per_s']:,.0f} | {by_round} | {r['p50_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {r['max_ms']:.1f} | {r['errors']} "
            f"| {fmt(r.get('mean_batch'), '.1f')} | {fmt(r.get('run_ms_per_batch'), '.2f')} "
            f"| {fmt(r.get('server_ms_per_message'), '.2f')} | {cpu['client']:.2f} "
            f"| {cpu['server']:.2f} | {fmt(cpu['redis'], '.2f')} | {cpu['rest_of_machine']:.2f} |"
        )
    nproc = report["machine"]["nproc"]
    lines += [
        "",
        f"CPU: cores used during the measured window (the machine has {nproc}); 'rest of "
        "machine' is everything else that ran meanwhile (other jobs). 'run ms/batch' is the "
        "batcher's model time per batch (executor thread, so it includes waiting for a core); "
        "'server ms/msg' is the server's own receive-to-send time per message.",
        "",
    ]
    for name, r in s.items():
        cpu = r["cpu_cores"]
        total = cpu["client"] + cpu["server"] + (cpu["redis"] or 0.0)
        lines.append(
            f"- client CPU share, {name}: {cpu['client'] / total:.0%} of the "
            f"{total:.2f} cores the benchmark used"
        )
    on = s[ON]
    sessions = a["sessions"]
    lines.append(
        f"- with no think time the load is a closed loop: mean latency = sessions / "
        f"throughput (batching on: {sessions} / {on['msgs_per_s']:,.0f} = "
        f"{1e3 * sessions / on['msgs_per_s']:.1f} ms), so p99 <= {TARGET_P99_MS:g} ms needs "
        f"well over {sessions / (TARGET_P99_MS / 1e3):,.0f} msgs/s"
    )
    if OFF in s:
        ratio = on["msgs_per_s"] / s[OFF]["msgs_per_s"]
        lines.append(
            f"- batching on / off: {ratio:.2f}x (target >= {TARGET_BATCHING:g}x: "
            f"{verdict(ratio >= TARGET_BATCHING)})"
        )
    if BARE in s:
        share = on["msgs_per_s"] / s[BARE]["msgs_per_s"]
        lines.append(
            f"- ours (batching on) / bare uvicorn WS: {share:.0%} (target >= "
            f"{TARGET_SHARE_OF_BARE:.0%}: {verdict(share >= TARGET_SHARE_OF_BARE)})"
        )
    lines.append(
        f"- p99 latency, batching on: {on['p99_ms']:.1f} ms (target <= "
        f"{TARGET_P99_MS:g} ms: {verdict(on['p99_ms'] <= TARGET_P99_MS)})"
    )
    paced = next((n for n in s if n.startswith(PACED)), None)
    if paced is not None:
        r = s[paced]
        lines.append(
            f"- p99 latency, {paced}: {r['p99_ms']:.1f} ms at {r['msgs_per_s']:,.0f} "
            f"msgs/s offered (target <= {TARGET_P99_MS:g} ms: "
            f"{verdict(r['p99_ms'] <= TARGET_P99_MS)})"
        )
    if REDIS in s:
        r = s[REDIS]
        lines.append(
            f"- redis store / in-process store (both batching on): "
            f"{r['msgs_per_s'] / on['msgs_per_s']:.2f}x throughput; p99 "
            f"{r['p99_ms']:.1f} ms (target <= {TARGET_P99_MS:g} ms: "
            f"{verdict(r['p99_ms'] <= TARGET_P99_MS)})"
        )
    return "\n".join(lines)


@dataclass
class Config:
    """One row of the table: a server, driven with or without think time."""

    name: str
    server: Server
    think_s: float = 0.0


async def run_all(
    configs: list[Config], args: argparse.Namespace, words: list[str]
) -> list[dict[str, dict[str, Any]]]:
    """Every configuration, `args.rounds` times, interleaved."""
    rounds = []
    for r in range(args.rounds):
        results = {}
        for config in configs:
            print(f"round {r + 1}/{args.rounds}: {config.name} ...", file=sys.stderr, flush=True)
            m = await drive(
                config.server, args.sessions, words, args.warmup, args.seconds, config.think_s
            )
            results[config.name] = m
            print(
                f"  {m['msgs_per_s']:,.0f} msgs/s, p50 {m['p50_ms']:.2f} ms, "
                f"p99 {m['p99_ms']:.2f} ms, errors {m['errors']}",
                file=sys.stderr,
                flush=True,
            )
        rounds.append(results)
    return rounds


def event_loop() -> tuple[asyncio.Runner, str]:
    """A runner on uvloop when it is installed (a cheaper client), else asyncio's own."""
    try:
        import uvloop  # noqa: PLC0415

        return asyncio.Runner(loop_factory=uvloop.new_event_loop), f"uvloop {uvloop.__version__}"
    except ImportError:
        return asyncio.Runner(), "asyncio (uvloop not installed)"


def parse_env(pairs: list[str]) -> dict[str, str]:
    """KEY=VALUE strings -> a dict; exits on a malformed one."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            sys.exit(f"expected KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """'NAME:KEY=VALUE,KEY=VALUE' -> (name, env)."""
    name, sep, pairs = text.partition(":")
    if not sep or not name:
        sys.exit(f"expected NAME:KEY=VALUE[,KEY=VALUE...], got {text!r}")
    return name, parse_env(pairs.split(","))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--models", type=Path, help="models directory (default: the bundled models)")
    p.add_argument(
        "--fallback",
        choices=FALLBACKS,
        default="tiny",
        help="random-weight models to export when there are no bundled ones",
    )
    p.add_argument("--sessions", type=int, default=256, help="concurrent WebSocket sessions")
    p.add_argument("--seconds", type=float, default=15.0, help="measured seconds per round")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first")
    p.add_argument("--rounds", type=int, default=2, help="passes over all configurations")
    p.add_argument(
        "--think-ms",
        type=float,
        default=250.0,
        help="think time of the paced row (batching on, a pause after each answer); "
        "0: no paced row",
    )
    p.add_argument("--redis-url", help="an existing Redis for the redis configuration")
    p.add_argument("--no-redis", action="store_true", help="skip the redis configuration")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment of every service server (repeatable)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="one more batching-on row with this environment (repeatable), e.g. "
        "'1 ORT thread:NEXTWORD_INTRA_OP_THREADS=1'",
    )
    p.add_argument("--json", type=Path, help="also write the figures as JSON to this path")
    args = p.parse_args(argv)
    common_env = parse_env(args.env)
    variants = [parse_variant(v) for v in args.variant]

    info = machine(MODULES)
    with ExitStack() as stack:
        models, models_note = stack.enter_context(models_dir(args.models, args.fallback))
        if args.no_redis:
            redis_url, redis_pid, redis_note = None, None, "redis: skipped (--no-redis)"
        else:
            redis_url, redis_pid, redis_note = stack.enter_context(redis_server(args.redis_url))
        on = service_server(ON, models, common_env)
        configs = [
            Config(ON, on),
            Config(OFF, service_server(OFF, models, {**common_env, "NEXTWORD_MAX_BATCH": "1"})),
            Config(BARE, bare_server()),
        ]
        if redis_url is not None:
            redis = service_server(
                REDIS, models, {**common_env, "NEXTWORD_SESSION_STORE": redis_url}
            )
            redis.helper_pid = redis_pid
            configs.append(Config(REDIS, redis))
        configs += [
            Config(name, service_server(name, models, {**common_env, **env}))
            for name, env in variants
        ]
        if args.think_ms > 0:
            configs.append(Config(f"{PACED} (think {args.think_ms:g} ms)", on, args.think_ms / 1e3))
        servers = list({id(c.server): c.server for c in configs}.values())
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-e2e-")))
        for server in servers:
            stack.callback(server.stop)
            server.start(log_dir)
        for server in servers:
            server.wait_ready()
        runner, loop_name = event_loop()
        with runner:
            rounds = runner.run(run_all(configs, args, stream_words(models)))
    report: dict[str, Any] = {
        "machine": info,
        "models_note": models_note,
        "redis_note": redis_note,
        "client_loop": loop_name,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": " ".join(
            [
                Path(sys.executable).name,
                "benchmarks/bench_e2e.py",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),
        "summary": summarize(rounds),
        "rounds": [
            {name: {k: v for k, v in r.items() if k != "latencies_ms"} for name, r in rnd.items()}
            for rnd in rounds
        ],
    }
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
