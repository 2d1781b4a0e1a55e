"""Memory per idle session in the in-process store, beside the raw size of its state.

For each model, a fresh Python process starts the real `Predictor` (models, batchers,
in-process store; no HTTP), warms it up with one full batch, then opens `--sessions`
sessions through `Predictor.create_session` (each runs one word through the model,
so every session holds its own state, written by the batcher into the store) and
reports how much its resident set grew per session. The raw state is what the
recurrent model carries between steps, layers x hidden x 4 bytes (x 2 for an LSTM:
h and c); the store keeps the state before the last token too (to answer a new
prefix without a new word), so twice that is the floor for a stored session.

    .venv/bin/python benchmarks/bench_memory.py --json benchmarks/results/memory.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.testbed import FALLBACKS, machine, machine_lines, models_dir  # noqa: E402

MODULES = ("onnxruntime", "numpy")
PAGE = os.sysconf("SC_PAGE_SIZE")
WAVE = 256  # sessions created concurrently: one full batch


def rss_bytes() -> int:
    """Resident set size of this process (/proc/self/statm)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def state_bytes(manifest: dict[str, Any]) -> int:
    """Raw recurrent state of one session: layers x hidden x float32 (x 2 for h and c)."""
    arrays = 2 if manifest["cell"] == "lstm" else 1
    return int(manifest["layers"]) * int(manifest["hidden_size"]) * 4 * arrays


async def measure(models: Path, model: str, sessions: int, text: str) -> dict[str, Any]:
    """RSS growth for `sessions` idle sessions of one model (run in a fresh process)."""
    from service.api.predictor import Predictor  # noqa: PLC0415
    from service.config import Settings  # noqa: PLC0415

    settings = Settings(
        models_dir=models,
        default_model=model,
        session_cap=sessions + 2 * WAVE,
        session_ttl_s=86_400.0,
    )
    predictor = await Predictor.start(settings)
    try:

        async def wave(n: int) -> list[dict[str, Any]]:
            return await asyncio.gather(
                *(predictor.create_session(text, model=model) for _ in range(n))
            )

        await wave(WAVE)  # ORT arenas and allocator pools at their batch-256 size
        gc.collect()
        before = rss_bytes()
        started = time.perf_counter()
        for done in range(0, sessions, WAVE):
            await wave(min(WAVE, sessions - done))
        seconds = time.perf_counter() - started
        gc.collect()
        after = rss_bytes()
        held = await predictor.store.count()
    finally:
        await predictor.close()
    return {
        "model": model,
        "sessions": sessions,
        "held": held,
        "rss_before_mb": before / 2**20,
        "rss_after_mb": after / 2**20,
        "bytes_per_session": (after - before) / sessions,
        "sessions_per_s": sessions / seconds,
    }


def run_child(models: Path, model: str, sessions: int, text: str) -> dict[str, Any]:
    """`measure` in a fresh interpreter, so one model's sessions never pad the other's."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            model,
            "--models",
            str(models),
            "--sessions",
            str(sessions),
            "--text",
            text,
        ],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        sys.exit(f"measuring {model} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(report: dict[str, Any]) -> str:
    """The figures as markdown, headed by the machine."""
    lines = [
        *machine_lines(report["machine"], MODULES),
        report["models_note"],
        f"{report['sessions']:,} idle sessions per model, each created with the text "
        f"{report['text']!r} through Predictor.create_session (in-process store, no HTTP); "
        "RSS from /proc/self/statm, after one warm-up batch, in a fresh process per model",
        "",
        "| model | cell | layers x hidden | raw state | stored state (current + previous) "
        "| RSS growth per session | overhead over stored | sessions held | RSS before -> after "
        "| created/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        raw, per = r["raw_state_bytes"], r["bytes_per_session"]
        stored = 2 * raw
        lines.append(
            f"| {r['model']} | {r['cell']} | {r['layers']} x {r['hidden_size']} | {raw:,} B "
            f"| {stored:,} B | {per:,.0f} B ({per / raw:.2f}x raw) | {per - stored:+,.0f} B "
            f"| {r['held']:,} | {r['rss_before_mb']:,.0f} -> {r['rss_after_mb']:,.0f} MB "
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
    p.add_argument("--model", action="append", help="models to measure (default: lstm and gru)")
    p.add_argument("--text", default="hello", help="the text each session is created with")
    p.add_argument("--json", type=Path, help="also write the figures as JSON to this path")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure one model
    args = p.parse_args(argv)

    if args.child:
        result = asyncio.run(measure(args.models, args.child, args.sessions, args.text))
        print(json.dumps(result))
        return

    info = machine(MODULES)
    with models_dir(args.models, args.fallback) as (models, note):
        results = []
        for model in args.model or ["lstm", "gru"]:
            manifest = json.loads((models / model / "manifest.json").read_text())
            print(f"{model}: {args.sessions:,} sessions ...", file=sys.stderr, flush=True)
            result = run_child(models, model, args.sessions, args.text)
            result.update(
                cell=manifest["cell"],
                layers=manifest["layers"],
                hidden_size=manifest["hidden_size"],
                raw_state_bytes=state_bytes(manifest),
            )
            results.append(result)
    report = {
        "machine": info,
        "models_note": note,
        "sessions": args.sessions,
        "text": args.text,
        "command": " ".join(
            [
                Path(sys.executable).name,
                "benchmarks/bench_memory.py",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),
        "results": results,
    }
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
