"""REST benchmark: requests/s of `POST /v1/predict` and `/feed` against a bare FastAPI endpoint.

Servers on free loopback ports, all started first and driven in turn, --rounds times
(interleaved, so a change in background load touches all alike):

    bare          `POST /v1/predict` of `benchmarks/bare_ws_app.py`: a plain FastAPI JSON
                  endpoint (pydantic body, response model, fixed answer) on uvicorn with
                  httptools, the service's HTTP parser; also on h11 and on granian
    predict       the service (`nextword serve`, --workers API processes) with a near-free
                  model (tiny random weights, hidden 32): stateless predict of a short text;
                  target >= 0.5 of bare
    feed          the same service: each connection feeds one word at a time to its own
                  session (created first)
    baseline      (--baseline DIR) predict and feed on another checkout's code, alternated
                  with this one's: old against new on the same machine

Load: --clients processes, each an asyncio loop (uvloop) holding its share of --connections
raw HTTP/1.1 keep-alive connections; each sends a request, reads the answer, sends the next
(closed loop). httpx would measure itself (~300 requests/s at 50 connections). Only answers
within the --seconds window after --warmup count. The CPU each server used in the window is
read per process role (API processes, engine, supervisor) from /proc.

    python -m benchmarks.bench_rest                      # -> results/rest.json
    python -m benchmarks.bench_rest --quick
    python -m benchmarks.bench_rest --baseline /tmp/base  # old vs new, alternated
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from benchmarks.bench_e2e import BARE, SERVICE, Plan, Server, started, stream_words
from benchmarks.lib.cpu import machine_busy_s
from benchmarks.lib.machine import command_line, machine, machine_lines, usable_cores
from benchmarks.lib.models import tiny_models
from benchmarks.lib.results import RESULTS, write_report

MODULES = ("uvicorn", "httptools", "h11", "granian", "fastapi", "starlette", "pydantic", "msgspec")
TARGET = 0.5  # service predict / bare FastAPI endpoint, requests/s
QUICK = {"seconds": 2.0, "warmup": 1.0, "rounds": 1}
FULL = {"seconds": 6.0, "warmup": 2.0, "rounds": 3}


# --- the load ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One client process's share of a row."""

    port: int
    kind: str  # "predict" or "feed"
    connections: int
    texts: tuple[str, ...]
    start: float  # time.monotonic() (one clock for all processes on Linux)
    end: float


def request(port: int, path: str, body: dict[str, Any]) -> bytes:
    """A keep-alive HTTP/1.1 POST with a JSON body."""
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data


async def answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Status and body of one response (with Content-Length, as both servers send)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def connection(job: Job, offset: int, out: dict[str, Any]) -> None:
    """One closed-loop connection until the window ends."""
    reader, writer = await asyncio.open_connection("127.0.0.1", job.port)
    try:
        path = "/v1/predict"
        if job.kind == "feed":
            writer.write(request(job.port, "/v1/sessions", {}))
            status, body = await answer(reader)
            if status != 201:
                out["errors"] += 1
                return
            path = f"/v1/sessions/{json.loads(body)['session_id']}/feed"
        texts = job.texts
        if job.kind == "predict":  # a few words of context, as a keyboard sends
            texts = tuple(" ".join(texts[i : i + 4]) for i in range(len(texts)))
        requests = [request(job.port, path, {"text": t, "k": 5}) for t in texts]
        i = offset
        while time.monotonic() < job.end:
            sent = time.monotonic()
            writer.write(requests[i % len(requests)])
            i += 1
            status, _ = await answer(reader)
            done = time.monotonic()
            if sent >= job.start and done <= job.end:
                if status == 200:
                    out["latencies"].append(done - sent)
                else:
                    out["errors"] += 1
    finally:
        writer.close()


def run_job(job: Job) -> dict[str, Any]:
    """A client process's share (run in the pool)."""
    import uvloop

    out: dict[str, Any] = {"latencies": [], "errors": 0}

    async def main() -> None:
        await asyncio.gather(*(connection(job, 97 * c, out) for c in range(job.connections)))

    uvloop.run(main())
    return out


# --- rows --------------------------------------------------------------------------------


@dataclass(eq=False)
class Row:
    """A server driven with one kind of request."""

    label: str
    server: Server
    kind: str
    bare: Row | None = None

    @property
    def key(self) -> str:
        return f"{self.label} [{self.server.workers}]"


def plan_rows(args: argparse.Namespace, models: Path) -> tuple[Plan, list[Row]]:
    """The servers and the rows of one round, in order."""
    plan = Plan()
    workers = args.workers
    bare = Row("bare FastAPI JSON endpoint", plan.server(Server(BARE, workers)), "predict")
    rows = [bare]
    if "h11" in args.parsers:
        rows.append(
            Row(
                "bare FastAPI JSON endpoint, h11",
                plan.server(Server(BARE, workers, http="h11")),
                "predict",
                bare,
            )
        )
    if "granian" in args.parsers:
        server = plan.server(Server(BARE, workers, transport="granian"))
        rows.append(Row("bare FastAPI JSON endpoint, granian", server, "predict", bare))
    for code in (None, args.baseline) if args.baseline else (None,):
        service = plan.server(Server(SERVICE, workers, models, code=code))
        suffix = ", baseline code" if code else ""
        rows.append(Row(f"service predict, tiny model{suffix}", service, "predict", bare))
        rows.append(Row(f"service feed, tiny model{suffix}", service, "feed", bare))
    return plan, rows


def measure(
    row: Row, pool: ProcessPoolExecutor, args: argparse.Namespace, texts: tuple[str, ...]
) -> dict[str, Any]:
    """Drive one row once."""
    server = row.server
    assert server.process is not None
    start = time.monotonic() + 0.5 + args.warmup
    end = start + args.seconds
    share = [
        args.connections // args.clients + (c < args.connections % args.clients)
        for c in range(args.clients)
    ]
    futures = [
        pool.submit(run_job, Job(server.process.port, row.kind, n, texts, start, end))
        for n in share
        if n
    ]
    time.sleep(max(0.0, start - time.monotonic()))
    cpu_before, busy_before, at = server.cpu_s(), machine_busy_s(), time.monotonic()
    time.sleep(max(0.0, end - time.monotonic()))
    cpu_after, busy_after, wall = server.cpu_s(), machine_busy_s(), time.monotonic() - at
    outs = [f.result() for f in futures]
    latencies = np.array([x for o in outs for x in o["latencies"]]) * 1e3
    per_s = latencies.size / args.seconds
    cores = {role: (cpu_after[role] - cpu_before[role]) / wall for role in cpu_after}
    return {
        "requests_per_s": per_s,
        "errors": sum(o["errors"] for o in outs),
        "p50_ms": float(np.percentile(latencies, 50)) if latencies.size else float("nan"),
        "p99_ms": float(np.percentile(latencies, 99)) if latencies.size else float("nan"),
        "cpu_cores": cores,
        "machine_busy_cores": (busy_after - busy_before) / wall,
        "cpu_ms_per_request": {r: 1e3 * c / per_s if per_s else None for r, c in cores.items()},
    }


def summarize(rows: list[Row], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per row: medians over rounds, ratios to bare by round."""
    out: dict[str, Any] = {}
    for row in rows:
        runs = [r[row.key] for r in rounds]
        summary: dict[str, Any] = {
            "configuration": row.label,
            "api_processes": row.server.workers,
            "requests_per_s": statistics.median(r["requests_per_s"] for r in runs),
            "by_round": [round(r["requests_per_s"], 1) for r in runs],
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
            "cpu_ms_per_request": {
                role: statistics.mean(r["cpu_ms_per_request"][role] or 0.0 for r in runs)
                for role in runs[0]["cpu_ms_per_request"]
            },
            "machine_busy_cores": statistics.mean(r["machine_busy_cores"] for r in runs),
        }
        if row.bare is not None:
            ratios = [
                r[row.key]["requests_per_s"] / r[row.bare.key]["requests_per_s"]
                for r in rounds
                if r[row.bare.key]["requests_per_s"]
            ]
            summary["ratio_to_bare_by_round"] = [round(x, 3) for x in ratios]
            summary["ratio_to_bare"] = statistics.median(ratios) if ratios else None
        out[row.key] = summary
    return out


def table(report: dict[str, Any]) -> str:
    """The figures as markdown, headed by the machine."""
    a = report["args"]
    lines = [
        *machine_lines(report["machine"], MODULES),
        f"load: {a['connections']} keep-alive connections from {a['clients']} client processes "
        f"(raw asyncio HTTP/1.1 on uvloop), closed loop; {a['rounds']} round(s) of "
        f"{a['seconds']:g} s after {a['warmup']:g} s warm-up per row, rows interleaved; "
        f"{a['workers']} API process(es)",
        "",
        "| configuration | requests/s (median) | by round | / bare (median of rounds) | p50 ms "
        "| p99 ms | errors | CPU ms/request (engine + API + sup.) | machine busy (cores) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["summary"].values():
        per = r["cpu_ms_per_request"]
        total = sum(per.values())
        parts = " + ".join(f"{per[k]:.3f}" for k in ("engine", "api", "supervisor") if k in per)
        ratio = r.get("ratio_to_bare")
        lines.append(
            f"| {r['configuration']} | {r['requests_per_s']:,.0f} "
            f"| {', '.join(f'{x:,.0f}' for x in r['by_round'])} "
            f"| {'-' if ratio is None else f'{ratio:.2f}'} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['errors']} | {total:.3f} ({parts}) | {r['machine_busy_cores']:.2f} |"
        )
    lines.append("")
    for r in report["summary"].values():
        if r["configuration"].startswith("service predict") and r.get("ratio_to_bare") is not None:
            ok = r["ratio_to_bare"] >= TARGET
            lines.append(
                f"- {r['configuration']} / bare FastAPI endpoint: {r['ratio_to_bare']:.2f} "
                f"(by round {r['ratio_to_bare_by_round']}; target >= {TARGET:g}: "
                f"{'met' if ok else 'NOT met'})"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--workers", type=int, default=1, help="API processes of every server")
    p.add_argument("--connections", type=int, default=64, help="concurrent connections")
    p.add_argument(
        "--clients", type=int, default=max(1, min(4, usable_cores() // 2)), help="client processes"
    )
    p.add_argument(
        "--parsers",
        default="h11,granian",
        help="more bare servers besides uvicorn+httptools (comma list of h11, granian; '' none)",
    )
    p.add_argument("--baseline", type=Path, help="another checkout's root: its service too")
    p.add_argument("--seconds", type=float, help=f"measured seconds per row ({FULL['seconds']:g})")
    p.add_argument("--warmup", type=float, help=f"unmeasured seconds first ({FULL['warmup']:g})")
    p.add_argument("--rounds", type=int, help=f"passes over all rows ({FULL['rounds']})")
    p.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}, no JSON")
    p.add_argument("--json", type=Path, help=f"where to write the report ({RESULTS}/rest.json)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.json is None and not args.quick:
        args.json = RESULTS / "rest.json"
    args.parsers = [x.strip() for x in args.parsers.split(",") if x.strip()]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = machine(MODULES)
    with ExitStack() as stack:
        models = stack.enter_context(tiny_models(32))
        texts = tuple(stream_words(models)[:200])
        plan, rows = plan_rows(args, models)
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-rest-")))
        pool = stack.enter_context(ProcessPoolExecutor(args.clients))
        stack.enter_context(started(plan, None, log_dir))
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            results = {}
            for row in rows:
                m = measure(row, pool, args, texts)
                results[row.key] = m
                tqdm.write(
                    f"round {r + 1}/{args.rounds} {row.key}: {m['requests_per_s']:,.0f} req/s, "
                    f"p99 {m['p99_ms']:.2f} ms, errors {m['errors']}, machine busy "
                    f"{m['machine_busy_cores']:.2f} cores"
                )
            rounds.append(results)
    report = {
        "machine": info,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": command_line("benchmarks.bench_rest", argv),
        "summary": summarize(rows, rounds),
        "rounds": rounds,
    }
    text = table(report)
    print(text)
    if args.json is not None:
        write_report(args.json, report, text)


if __name__ == "__main__":
    main()
