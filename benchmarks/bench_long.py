"""Long texts against short steps: chunked prefill (issue 10, item 3, "bounded cost per step").

A real `python -m service` (engine process + API processes, the bundled LSTM on CPU) per
row, fresh, so that each row's peak memory is its own. In each row:

    long clients   --long (0/4/16) clients, each sending a text at the token limit (2,048
                   tokens) in a loop, one request at a time: every other client feeds it into
                   its own session (POST /v1/sessions/{id}/feed), the rest predict it
                   stateless (POST /v1/predict); one client process (httpx), apart
    other user     one WebSocket session (/v1/stream) typing one word at a time, with
                   --think-ms between an answer and the next word; its latency per word is
                   the figure: p50, p95

After --warmup seconds the window (--seconds) counts the other user's answers and the long
requests completed. Memory: the engine process's peak resident set (VmHWM, from its start:
model loading included) and its resident set --settle seconds after the long clients stop.
Rows are run for each NEXTWORD_PREFILL_CHUNK in --chunks: 0 runs every step whole (as
before chunked prefill), the others chunked; the "x base" column is the other user's p50
against the row without long clients of the same chunk setting.

    python -m benchmarks.bench_long                       # -> results/long.json, long.txt
    python -m benchmarks.bench_long --chunks 0,16,32,64 --long 0,16 --seconds 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks.lib.machine import command_line, machine, machine_lines
from benchmarks.lib.results import RESULTS, write_report
from benchmarks.lib.server import ServerProcess, free_port
from service.config import BUNDLED_MODELS, Settings
from service.contract.tokenizer import is_word, tokenize

MODULES = ("onnxruntime", "uvicorn", "websockets", "httpx", "numpy")
TARGET_RATIO = 2.0  # 16 long clients raise the other user's p50 by at most this
PAGE_MB = 1024 * 1024


def long_text(tokens: int, max_chars: int) -> str:
    """A text of exactly `tokens` tokens (short vocabulary words) within `max_chars`."""
    vocab = (BUNDLED_MODELS / "lstm" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    words = [w for w in vocab if is_word(w) and w.isalpha() and len(w) <= 3][:500]
    rng = np.random.default_rng(0)
    text = " ".join(rng.choice(words, size=tokens).tolist())
    if len(tokenize(text)) != tokens or len(text) > max_chars:
        raise RuntimeError(f"could not build a {tokens}-token text within {max_chars} chars")
    return text


def probe_words() -> list[str]:
    vocab = (BUNDLED_MODELS / "lstm" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return [w for w in vocab if is_word(w) and w.isalpha()][:300]


# --- the long clients (a process of their own) ------------------------------------------------


async def _long_clients(url: str, count: int, text: str, conn: Connection) -> None:
    import httpx  # noqa: PLC0415

    stop = asyncio.Event()
    window = [0.0, float("inf")]
    done: list[float] = []
    errors: list[str] = []

    async def client(i: int, http: httpx.AsyncClient) -> None:
        session = None
        if i % 2 == 0:
            reply = await http.post(f"{url}/v1/sessions", json={})
            reply.raise_for_status()
            session = reply.json()["session_id"]
        while not stop.is_set():
            started = time.monotonic()
            if session is not None:
                reply = await http.post(f"{url}/v1/sessions/{session}/feed", json={"text": text})
            else:
                reply = await http.post(f"{url}/v1/predict", json={"text": text})
            end = time.monotonic()
            if reply.status_code != 200:
                errors.append(f"{reply.status_code} {reply.text[:200]}")
                await asyncio.sleep(0.1)
            elif window[0] <= end <= window[1]:
                done.append(end - started)

    async def control() -> None:
        loop = asyncio.get_running_loop()
        command = await loop.run_in_executor(None, conn.recv)  # ("window", start, end)
        window[0], window[1] = command[1], command[2]
        await loop.run_in_executor(None, conn.recv)  # "stop"
        stop.set()

    limits = httpx.Limits(max_connections=count + 1)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        tasks = [asyncio.create_task(client(i, http)) for i in range(count)]
        conn.send("started")
        await control()
        await asyncio.wait(tasks, timeout=120)
    conn.send({"latencies_s": done, "errors": len(errors), "error_samples": errors[:3]})


def long_clients_main(url: str, count: int, text: str, conn: Connection) -> None:
    asyncio.run(_long_clients(url, count, text, conn))


# --- the other user --------------------------------------------------------------------------


async def other_user(uri: str, words: list[str], think_s: float, start: float, end: float) -> Any:
    from websockets.asyncio.client import connect  # noqa: PLC0415

    latencies: list[float] = []
    errors = 0
    async with connect(uri, ping_interval=None, max_size=2**20) as ws:
        ready = json.loads(await ws.recv())
        assert ready["type"] == "ready", ready
        i = 0
        while time.monotonic() < end:
            sent = time.monotonic()
            await ws.send(json.dumps({"text": words[i % len(words)]}))
            answer = json.loads(await ws.recv())
            got = time.monotonic()
            i += 1
            if answer.get("type") != "predictions":
                errors += 1
            elif sent >= start:
                latencies.append(got - sent)
            await asyncio.sleep(think_s)
    return latencies, errors


# --- one row ---------------------------------------------------------------------------------


def engine_process(server: ServerProcess) -> psutil.Process:
    """The engine: the supervisor's first forked child."""
    children = psutil.Process(server.pid).children(recursive=True)
    forked = sorted(
        (c for c in children if "--multiprocessing-fork" in c.cmdline()),
        key=lambda c: c.create_time(),
    )
    if not forked:
        raise RuntimeError("no engine process found")
    return forked[0]


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def run_row(chunk: int, long: int, args: argparse.Namespace, text: str) -> dict[str, Any]:
    port = free_port()
    env = {
        "NEXTWORD_HOST": "127.0.0.1",
        "NEXTWORD_PORT": str(port),
        "NEXTWORD_LOG_LEVEL": "warning",
        "NEXTWORD_PROVIDERS": "cpu",
        "NEXTWORD_PREFILL_CHUNK": str(chunk),
    }
    if args.workers:
        env["NEXTWORD_WORKERS"] = str(args.workers)
    with ServerProcess(
        f"service-chunk{chunk}", [sys.executable, "-m", "service"], env, port=port
    ) as server:
        engine = engine_process(server)
        rss_ready, _ = memory_mb(engine.pid)
        url = server.url
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        clients = None
        if long:
            clients = context.Process(target=long_clients_main, args=(url, long, text, child))
            clients.start()
            assert parent.recv() == "started"
        start = time.monotonic() + args.warmup
        end = start + args.seconds
        if clients is not None:
            parent.send(("window", start, end))
        cpu_before = engine.cpu_times()
        latencies, errors = asyncio.run(
            other_user(
                url.replace("http", "ws") + "/v1/stream",
                probe_words(),
                args.think_ms / 1000,
                start,
                end,
            )
        )
        cpu_after = engine.cpu_times()
        long_result: dict[str, Any] = {"latencies_s": [], "errors": 0, "error_samples": []}
        if clients is not None:
            parent.send("stop")
            long_result = parent.recv()
            clients.join(60)
        rss_peak_samples = memory_mb(engine.pid)
        time.sleep(args.settle)
        rss_after, hwm = memory_mb(engine.pid)
    ms = np.array(latencies) * 1e3
    long_s = long_result["latencies_s"]
    busy = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    return {
        "chunk": chunk,
        "long_clients": long,
        "answers": len(ms),
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p95_ms": float(np.percentile(ms, 95)) if len(ms) else None,
        "max_ms": float(ms.max()) if len(ms) else None,
        "errors": errors + long_result["errors"],
        "error_samples": long_result["error_samples"],
        "long_done": len(long_s),
        "long_mean_s": statistics.fmean(long_s) if long_s else None,
        "engine_cpu": busy / (args.seconds + args.warmup),
        "rss_ready_mb": rss_ready,
        "rss_end_mb": rss_peak_samples[0],
        "rss_peak_mb": hwm,
        "rss_after_mb": rss_after,
    }


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(report: dict[str, Any]) -> str:
    lines = [
        "Long texts (2,048 tokens, in a loop) against another user's one-word steps",
        *machine_lines(report["machine"], MODULES),
        f"command: {report['command']}",
        f"window {report['seconds']:.0f} s after {report['warmup']:.0f} s warm-up; other user "
        f"thinks {report['think_ms']:.0f} ms between words; engine RSS: peak since start "
        f"(VmHWM), and {report['settle']:.0f} s after the long clients stop",
        "",
        f"{'prefill chunk':>13} {'long':>5} {'p50 ms':>8} {'p95 ms':>8} {'x base':>7} "
        f"{'long/s':>7} {'long s':>7} {'errors':>6} {'engine cpu':>10} {'RSS ready':>9} "
        f"{'RSS peak':>9} {'RSS after':>9}",
    ]
    base: dict[int, float] = {}
    for row in report["rows"]:
        if row["long_clients"] == 0 and row["p50_ms"]:
            base[row["chunk"]] = row["p50_ms"]
    for row in report["rows"]:
        b = base.get(row["chunk"])
        ratio = row["p50_ms"] / b if b and row["p50_ms"] else None
        chunk = "0 (whole)" if row["chunk"] == 0 else str(row["chunk"])
        lines.append(
            f"{chunk:>13} {row['long_clients']:>5} {fmt(row['p50_ms'], '8.1f')} "
            f"{fmt(row['p95_ms'], '8.1f')} {fmt(ratio, '6.1f')}x "
            f"{row['long_done'] / report['seconds']:>7.2f} {fmt(row['long_mean_s'], '7.2f')} "
            f"{row['errors']:>6} {row['engine_cpu']:>10.2f} {row['rss_ready_mb']:>8.0f}M "
            f"{row['rss_peak_mb']:>8.0f}M {row['rss_after_mb']:>8.0f}M"
        )
    lines += [
        "",
        f"target: 16 long clients raise the other user's p50 by <= {TARGET_RATIO:.0f}x "
        "(x base: against 0 long clients, same setting); long/s: long requests answered per "
        "second in the window, long s: their mean latency; engine cpu: cores the engine "
        "process used",
    ]
    return "\n".join(lines)


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--chunks", type=int_list, default=[0, Settings().prefill_chunk])
    parser.add_argument("--long", type=int_list, default=[0, 4, 16])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--think-ms", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=0, help="API processes; 0 = serve's")
    parser.add_argument("--tokens", type=int, default=Settings().max_tokens_per_request)
    parser.add_argument("--json", type=Path, default=RESULTS / "long.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = Settings()
    text = long_text(args.tokens, settings.max_text_chars)
    rows = []
    for chunk in args.chunks:
        for long in args.long:
            print(f"chunk {chunk}, {long} long clients ...", file=sys.stderr, flush=True)
            rows.append(run_row(chunk, long, args, text))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    report = {
        "command": command_line("benchmarks.bench_long", argv),
        "machine": machine(MODULES),
        "seconds": args.seconds,
        "warmup": args.warmup,
        "settle": args.settle,
        "think_ms": args.think_ms,
        "tokens": args.tokens,
        "rows": rows,
    }
    text_table = table(report)
    print(text_table)
    write_report(args.json, report, text_table)


if __name__ == "__main__":
    main()
