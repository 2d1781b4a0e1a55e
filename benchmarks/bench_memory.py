"""Memory per idle session in the in-process store, beside the raw size of its state.

Each model is measured in a fresh Python process, one of two ways (`--via`):

- "store": the engine's session store alone (`MemorySessionStore`, its slot pools).
  Sessions are written with `put_many` in batches of 256, as the scheduler writes them
  (each state a row of a batch's (L, B, H) output), with real session ids. This reaches
  1,000,000 sessions in a minute or two.
- "predictor": the real `Predictor` (models, batchers, in-process engine; no HTTP), warmed
  up with one full batch, opens the sessions through `Predictor.create_session` (each
  runs one word through the model, so every session holds its own state, written by the
  batcher into the store).

Reported: how much the resident set grew per session and, for the store, what
`memory_bytes()` counts per session (every allocated pool row, the index estimated).
The raw state is what the recurrent model carries between steps, layers x hidden x 4
bytes (x 2 for an LSTM: h and c); the store keeps the state before the last token too
(to answer a new prefix without a new word), so twice that is the floor for a stored
session. A count that would not fit in the available memory is lowered (and the row
says so).

    python -m benchmarks.bench_memory --json benchmarks/results/memory.json
    python -m benchmarks.bench_memory --via store \\
        --model gru:1000000 --model lstm:200000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.lib.machine import command_line, machine, machine_lines
from benchmarks.lib.models import FALLBACKS, models_dir
from benchmarks.lib.server import ROOT

MODULES = ("onnxruntime", "numpy")
PAGE = os.sysconf("SC_PAGE_SIZE")
WAVE = 256  # sessions created concurrently (or written in one put_many): one full batch
OVERHEAD_GUESS = 1024  # bytes per session besides its state, for the fit check only


def rss_bytes() -> int:
    """Resident set size of this process (/proc/self/statm)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def state_bytes(manifest: dict[str, Any]) -> int:
    """Raw recurrent state of one session: layers x hidden x float32 (x 2 for h and c)."""
    return int(manifest["layers"]) * int(manifest["hidden_size"]) * 4 * state_arrays(manifest)


def state_arrays(manifest: dict[str, Any]) -> int:
    """Arrays of the recurrent state: (h, c) for an LSTM, (h,) for a GRU."""
    return 2 if manifest["cell"] == "lstm" else 1


def progress(total: int, model: str) -> Any:
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(
        total=total, desc=model, unit="session", unit_scale=True, mininterval=2.0, file=sys.stderr
    )


async def measure_store(models: Path, model: str, sessions: int) -> dict[str, Any]:
    """RSS growth and `memory_bytes()` for `sessions` idle sessions written into the store."""
    import numpy as np  # noqa: PLC0415

    from service.store import MemorySessionStore, SessionRecord  # noqa: PLC0415

    manifest = json.loads((models / model / "manifest.json").read_text())
    arrays, layers, hidden = (
        2 * state_arrays(manifest),  # current and previous
        int(manifest["layers"]),
        int(manifest["hidden_size"]),
    )
    store = MemorySessionStore(ttl_s=86_400.0, cap=sessions)
    # One batch output, (L, B, H) per array: every session's state is a row of it.
    output = np.random.default_rng(0).standard_normal((arrays, layers, WAVE, hidden))
    output = output.astype(np.float32)
    rows = [tuple(output[i][:, b, :] for i in range(arrays)) for b in range(WAVE)]
    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    with progress(sessions, model) as bar:
        for done in range(0, sessions, WAVE):
            n = min(WAVE, sessions - done)
            now = time.time()
            records = [
                SessionRecord(store.new_id(), model, rows[b], 1, now, now, last_token=7)
                for b in range(n)
            ]
            if not all(await store.put_many(records, [None] * n)):
                raise RuntimeError("a new session was not written")
            bar.update(n)
    seconds = time.perf_counter() - started
    del records
    gc.collect()
    after = rss_bytes()
    [pool] = store.pool_usage()
    return {
        "model": model,
        "via": "store",
        "sessions": sessions,
        "held": await store.count(),
        "rss_before_mb": before / 2**20,
        "rss_after_mb": after / 2**20,
        "bytes_per_session": (after - before) / sessions,
        "memory_bytes_per_session": store.memory_bytes() / sessions,
        "pool_rows_used": pool.used,
        "pool_rows_allocated": pool.capacity,
        "sessions_per_s": sessions / seconds,
    }


async def measure_predictor(models: Path, model: str, sessions: int, text: str) -> dict[str, Any]:
    """RSS growth for `sessions` idle sessions opened through the Predictor."""
    from service.api.predictor import Predictor  # noqa: PLC0415
    from service.config import Settings  # noqa: PLC0415
    from service.engine.client import InprocClient  # noqa: PLC0415

    settings = Settings(
        models_dir=models,
        default_model=model,
        session_cap=sessions + 2 * WAVE,
        session_ttl_s=86_400.0,
    )
    predictor = await Predictor.start(settings)
    assert isinstance(predictor.engine, InprocClient)  # no engine address set: in process
    store = predictor.engine.core.store
    try:

        async def wave(n: int) -> list[dict[str, Any]]:
            return await asyncio.gather(
                *(predictor.create_session(text, model=model) for _ in range(n))
            )

        await wave(WAVE)  # ORT arenas and allocator pools at their batch-256 size
        gc.collect()
        before = rss_bytes()
        started = time.perf_counter()
        with progress(sessions, model) as bar:
            for done in range(0, sessions, WAVE):
                n = min(WAVE, sessions - done)
                await wave(n)
                bar.update(n)
        seconds = time.perf_counter() - started
        gc.collect()
        after = rss_bytes()
        held = await store.count()
        memory = store.memory_bytes() if hasattr(store, "memory_bytes") else None
        pools = store.pool_usage() if hasattr(store, "pool_usage") else []
    finally:
        await predictor.close()
    return {
        "model": model,
        "via": "predictor",
        "sessions": sessions,
        "held": held,
        "rss_before_mb": before / 2**20,
        "rss_after_mb": after / 2**20,
        "bytes_per_session": (after - before) / sessions,
        "memory_bytes_per_session": None if memory is None else memory / held,
        **(
            {"pool_rows_used": pools[0].used, "pool_rows_allocated": pools[0].capacity}
            if len(pools) == 1
            else {}
        ),
        "sessions_per_s": sessions / seconds,
    }


def run_child(models: Path, model: str, sessions: int, text: str, via: str) -> dict[str, Any]:
    """A measure in a fresh interpreter, so one model's sessions never pad the other's."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench_memory",
            "--child",
            model,
            "--via",
            via,
            "--models",
            str(models),
            "--sessions",
            str(sessions),
            "--text",
            text,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,  # the progress bar goes on to stderr
        text=True,
    )
    if out.returncode != 0:
        sys.exit(f"measuring {model} via {via} failed (status {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fitting(sessions: int, stored: int) -> int:
    """`sessions`, or fewer where that many would not fit in 80% of the available memory."""
    fits = int(0.8 * available_bytes() / (stored + OVERHEAD_GUESS))
    return min(sessions, fits // WAVE * WAVE)


def table(report: dict[str, Any]) -> str:
    """The figures as markdown, headed by the machine."""
    lines = [
        *machine_lines(report["machine"], MODULES),
        report["models_note"],
        "idle sessions per model: via store = MemorySessionStore.put_many in batches of "
        f"{WAVE}; via predictor = Predictor.create_session with the text {report['text']!r} "
        "(in-process engine, no HTTP, after one warm-up batch); RSS from /proc/self/statm, "
        "a fresh process per row; memory_bytes() counts every allocated pool row",
        "",
        "| model | via | store | sessions | raw state | stored state (current + previous) "
        "| RSS growth per session | overhead over stored | memory_bytes() per session "
        "| pool rows used / allocated | RSS before -> after | created/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        raw, per = r["raw_state_bytes"], r["bytes_per_session"]
        stored = 2 * raw
        counted = r.get("memory_bytes_per_session")
        rows = (
            f"{r['pool_rows_used']:,} / {r['pool_rows_allocated']:,}"
            if "pool_rows_used" in r
            else "-"
        )
        sessions = f"{r['sessions']:,}"
        if r.get("sessions_requested", r["sessions"]) != r["sessions"]:
            sessions += f" (of {r['sessions_requested']:,} asked: memory)"
        lines.append(
            f"| {r['model']} | {r.get('via', 'predictor')} | {r.get('store', 'pool')} "
            f"| {sessions} | {raw:,} B | {stored:,} B | {per:,.0f} B ({per / raw:.2f}x raw) "
            f"| {per - stored:+,.0f} B "
            f"| {'-' if counted is None else f'{counted:,.0f} B'} | {rows} "
            f"| {r['rss_before_mb']:,.0f} -> {r['rss_after_mb']:,.0f} MB "
            f"| {r['sessions_per_s']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--models", type=Path, help="models directory (default: the bundled models)")
    p.add_argument(
        "--fallback",
        choices=FALLBACKS,
        default="full",
        help="random-weight models to export when there are no bundled ones",
    )
    p.add_argument("--sessions", type=int, default=100_000, help="idle sessions per model")
    p.add_argument(
        "--model",
        action="append",
        help="a model to measure, NAME or NAME:SESSIONS (default: lstm and gru)",
    )
    p.add_argument(
        "--via",
        choices=["store", "predictor", "both"],
        default="both",
        help="fill the store directly, through the Predictor, or both (one row each)",
    )
    p.add_argument("--text", default="hello", help="the text each session is created with")
    p.add_argument("--json", type=Path, help="also write the figures as JSON to this path")
    p.add_argument(
        "--append",
        action="store_true",
        help="add the rows to those already in --json (each row names its command)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure one model
    args = p.parse_args(argv)

    if args.child:
        if args.via == "store":
            result = asyncio.run(measure_store(args.models, args.child, args.sessions))
        else:
            result = asyncio.run(
                measure_predictor(args.models, args.child, args.sessions, args.text)
            )
        print(json.dumps(result))
        return

    info = machine(MODULES)
    command = command_line("benchmarks.bench_memory", argv)
    ways = ["store", "predictor"] if args.via == "both" else [args.via]
    with models_dir(args.models, args.fallback) as (models, note):
        results = []
        for spec in args.model or ["lstm", "gru"]:
            model, _, count = spec.partition(":")
            asked = int(count) if count else args.sessions
            manifest = json.loads((models / model / "manifest.json").read_text())
            for via in ways:
                sessions = fitting(asked, 2 * state_bytes(manifest))
                print(f"{model} via {via}: {sessions:,} sessions", file=sys.stderr, flush=True)
                result = run_child(models, model, sessions, args.text, via)
                result.update(
                    store="pool",
                    sessions_requested=asked,
                    cell=manifest["cell"],
                    layers=manifest["layers"],
                    hidden_size=manifest["hidden_size"],
                    raw_state_bytes=state_bytes(manifest),
                    command=command,
                    machine_cpu=info["cpu"],
                )
                results.append(result)
    earlier = []
    if args.append and args.json and args.json.exists():
        earlier = json.loads(args.json.read_text())["results"]
    report = {
        "machine": info,
        "models_note": note,
        "sessions": args.sessions,
        "text": args.text,
        "command": command,
        "results": earlier + results,
    }
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
