"""The engine against ONNX Runtime alone: what the engine keeps of the model's own speed.

Issue 19's figure: with the bundled LSTM at batch 256, the engine in process (`EngineCore`:
scheduler, session store, state pool, answers; `benchmarks.bench_core.in_process`) should
step at least 0.9 of what ONNX Runtime alone does on the same model and batch. "ORT alone"
is one `session.run` per step of 256 one-token rows on the artifact's own graph, with the
engine's session options (`OrtModel`: the same threads, no spinning), the states fed back
from one run to the next and the hot path's outputs only (states and top-k): the least any
server could do per step. The engine instead runs the pool's graph (a gather before and a
scatter after the model) and everything around it.

Each figure is measured in a process of its own, the two alternated round by round, so that
a shared machine's load falls on both; the table gives the medians and their ratio.

    python -m benchmarks.bench_ort_share --rounds 5 --seconds 3 --json benchmarks/results/ort-share.json
    python -m benchmarks.bench_ort_share --checkout /tmp/base   # another checkout's engine
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.lib.checkout import last_line
from benchmarks.lib.machine import command_line, machine, machine_lines
from benchmarks.lib.results import write_report

MODULES = ("onnxruntime", "numpy", "msgspec")
ROOT = Path(__file__).resolve().parent.parent

# Run in a checkout's own directory; prints steps/s as its last line.
_ENGINE = """
import asyncio, sys
from pathlib import Path
from benchmarks import bench_core
models, model, batch, seconds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
print(asyncio.run(bench_core.in_process(models, model, batch, seconds, 0)))
"""

_ORT = """
import sys, time
from pathlib import Path
import numpy as np
from service.contract.artifact import TOPK_IDS, TOPK_PROBS, ModelArtifact
from service.engine.runtime import OrtModel
path, batch, seconds = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
model = OrtModel(ModelArtifact.load(path), ["CPUExecutionProvider"])
session, outs = model.session, model.state_outputs
state = [np.zeros((model.layers, batch, model.hidden_size), np.float32) for _ in outs]
rng = np.random.default_rng(0)
tokens = [rng.integers(3, len(model.vocab), (batch, 1)) for _ in range(64)]
def step(i):
    feeds = {"tokens": tokens[i % 64], **dict(zip(model.state_inputs, state))}
    result = session.run([*outs, TOPK_PROBS, TOPK_IDS], feeds)
    state[:] = result[: len(outs)]
for i in range(5):
    step(i)
steps, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    step(steps)
    steps += 1
print(steps * batch / (time.perf_counter() - start))
"""


def one(checkout: Path, code: str, args: list[str]) -> float:
    """Steps/s printed by `code` run in `checkout` in a process of its own."""
    return float(last_line(checkout, ["-c", code, *args]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "service" / "models")
    parser.add_argument("--model", default="lstm")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--checkout", type=Path, default=ROOT, help="whose engine to measure")
    parser.add_argument("--json", type=Path, help="write the results here (and .txt beside)")
    args = parser.parse_args(argv)

    info = machine(MODULES)
    rates: dict[str, list[float]] = {"ort": [], "engine": []}
    for r in range(args.rounds):
        ort = one(ROOT, _ORT, [str(args.models / args.model), str(args.batch), str(args.seconds)])
        engine = one(
            args.checkout,
            _ENGINE,
            [str(args.models), args.model, str(args.batch), str(args.seconds)],
        )
        rates["ort"].append(ort)
        rates["engine"].append(engine)
        print(f"round {r + 1}: ORT alone {ort:,.0f} steps/s, engine {engine:,.0f}", flush=True)
    a, b = statistics.median(rates["ort"]), statistics.median(rates["engine"])
    ratios = [e / o for o, e in zip(rates["ort"], rates["engine"])]
    lines = [
        f"model {args.model} ({args.models / args.model}), batch {args.batch}, one token a row; "
        f"engine: {args.checkout}; {args.rounds} rounds of {args.seconds:g} s, alternated",
        "",
        "| path | steps/s (median) | us/step |",
        "|---|---|---|",
        f"| ONNX Runtime alone (session.run, states fed back) | {a:,.0f} | {1e6 / a:.1f} |",
        f"| engine in process (EngineCore, state pool) | {b:,.0f} | {1e6 / b:.1f} |",
        "",
        f"engine / ORT alone: {b / a:.2f} (per round: "
        + ", ".join(f"{x:.2f}" for x in ratios)
        + "; issue 19's target >= 0.9)",
        "",
        *machine_lines(info, MODULES),
        f"command: {command_line('benchmarks.bench_ort_share', argv)}",
    ]
    table = "\n".join(lines)
    print(table)
    if args.json:
        write_report(args.json, {"machine": info, "rates": rates, "args": vars(args)}, table)


if __name__ == "__main__":
    main()
