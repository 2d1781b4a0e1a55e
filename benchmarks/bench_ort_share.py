"""The engine against ONNX Runtime alone: what the engine keeps of the model's own speed.

Issue 19's figure: with the bundled LSTM at batch 256, the engine in process (`EngineCore`:
scheduler, session store, state pool, answers; `benchmarks.bench_core.in_process`) should
step at least 0.9 of what ONNX Runtime alone does on the same model and batch. "ORT alone"
is one `session.run` per step of 256 one-token rows on the artifact's own graph, with the
engine's session options (`OrtModel`: the same threads, no spinning), the states fed back
from one run to the next and the hot path's outputs only (states and the graph's top-k, at
the artifact's `max_k`): the least any server could do per step. The engine instead runs
the pool's graph (a gather before and a scatter after the model, the top-k as wide as the
batch's steps ask for) and everything around it.

Each figure is measured in a process of its own, the paths alternated round by round, so
that a shared machine's load falls on all; the table gives the medians and the ratios.
`--baseline DIR` adds another checkout's engine (e.g. `git worktree add --detach /tmp/base
main`) to every round, measured between ORT alone and this checkout's engine. `--clock cpu`
times every path by its process's CPU time (all its threads) instead of the wall clock:
what a step costs, less sensitive to other work on a shared machine.

`--graph` times the pool's graph alone (this checkout's code, one process), at the
artifact's top-k width and at the steps' 5, with ONNX Runtime's session options varied,
against ORT alone.

`--profile` instead splits the engine's time per batch into its parts (each checkout's
engine in a process of its own, alternated): the ONNX Runtime call of the pool's graph,
the model runs' Python around it (bindings, outputs), the rest of the batch's execution in
the engine thread (adaptation, results), and what the event loop does between batches
(intake, store, answers).

    python -m benchmarks.bench_ort_share --rounds 5 --seconds 3 --json benchmarks/results/ort-share.json
    python -m benchmarks.bench_ort_share --baseline /tmp/base --clock cpu
    python -m benchmarks.bench_ort_share --baseline /tmp/base --profile --clock cpu
    python -m benchmarks.bench_ort_share --graph --rounds 8
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.lib.checkout import last_line
from benchmarks.lib.machine import command_line, machine, machine_lines
from benchmarks.lib.results import write_report

MODULES = ("onnxruntime", "numpy", "msgspec")
ROOT = Path(__file__).resolve().parent.parent

# Each snippet runs in a checkout's own directory and prints its figure as its last line.
# `CLOCK` (the first argument) is the clock that times the steps: wall or CPU.
_CLOCK = """
import sys, time
clock = time.perf_counter if sys.argv[1] == "wall" else time.process_time
"""

_ENGINE = (
    _CLOCK
    + """
import asyncio, types
from pathlib import Path
from benchmarks import bench_core
models, model, batch, seconds = Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
bench_core.time = types.SimpleNamespace(perf_counter=clock)
print(asyncio.run(bench_core.in_process(models, model, batch, seconds, 0)))
"""
)

_ORT = (
    _CLOCK
    + """
from pathlib import Path
import numpy as np
from service.contract.artifact import TOPK_IDS, TOPK_PROBS, ModelArtifact
from service.engine.runtime import OrtModel
path, batch, seconds = Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
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
steps, start = 0, clock()
while clock() - start < seconds:
    step(steps)
    steps += 1
print(steps * batch / (clock() - start))
"""
)

# The engine's batch in parts: wraps the methods both checkouts have. The ORT call is timed
# inside `StatePool._run` by a stand-in for the step session. By CPU time, each part is
# what the process's threads spent in it: ORT's while it runs (the event loop waits for
# it), the engine's Python otherwise (ORT's threads sleep between runs: no spinning).
_PROFILE = (
    _CLOCK
    + """
import asyncio, json
from pathlib import Path
from benchmarks import bench_core
from service.engine import pool, scheduler
models, model, batch, seconds = Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
spent = {"ort": 0.0, "run": 0.0, "compute": 0.0}
batches = [0]
def timed(cls, name, key):
    inner = getattr(cls, name)
    def wrapper(*args, **kwargs):
        start = clock()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[key] += clock() - start
    setattr(cls, name, wrapper)
class Timed:
    def __init__(self, session):
        self.session = session
    def __getattr__(self, name):
        return getattr(self.session, name)
    def run_with_iobinding(self, binding):
        start = clock()
        try:
            return self.session.run_with_iobinding(binding)
        finally:
            spent["ort"] += clock() - start
inner_run = pool.StatePool._run
def _run(self, *args, **kwargs):
    session, self._step = self._step, Timed(self._step)
    try:
        return inner_run(self, *args, **kwargs)
    finally:
        self._step = session
pool.StatePool._run = _run
timed(pool.StatePool, "run", "run")
timed(scheduler.StepBatcher, "_compute", "compute")
inner_compute = scheduler.StepBatcher._compute
def counted(self, *args, **kwargs):
    batches[0] += 1
    return inner_compute(self, *args, **kwargs)
scheduler.StepBatcher._compute = counted
async def measure():
    # The engine's start (the pool's check, the sessions' creation) is left out.
    marks = []
    class Clock:
        @staticmethod
        def perf_counter():
            now = clock()
            if not marks:  # the timed loop starts: count from here
                spent.update(dict.fromkeys(spent, 0.0))
                batches[0] = 0
            marks.append(now)
            return now
    import types
    bench_core.time = types.SimpleNamespace(perf_counter=Clock.perf_counter)
    rate = await bench_core.in_process(models, model, batch, seconds, 0)
    return rate, marks[-1] - marks[0]
rate, wall = asyncio.run(measure())
n = batches[0]
parts = {
    "ort": spent["ort"] / n, "run": (spent["run"] - spent["ort"]) / n,
    "compute": (spent["compute"] - spent["run"]) / n,
    "loop": (wall - spent["compute"]) / n, "batch": wall / n, "rate": rate, "batches": n,
}
print(json.dumps(parts))
"""
)

# The pool's graph alone, in one process: each variant its own session (the same model),
# `rounds` rounds of `runs` runs each, the variants alternated. Prints a JSON line.
_GRAPH = """
import json, sys, time
from pathlib import Path
import numpy as np
import onnxruntime as ort
from service.contract.artifact import TOPK_IDS, TOPK_PROBS, ModelArtifact
from service.engine.pool import StatePool
from service.engine.runtime import OrtModel
path, batch, rounds, runs = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
artifact = ModelArtifact.load(path)
def spin(o):
    o.add_session_config_entry("session.intra_op.allow_spinning", "1")
    o.add_session_config_entry("session.force_spinning_stop", "1")
def extended(o):
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
def no_pattern(o):
    o.enable_mem_pattern = False
def blocks(o):
    o.add_session_config_entry("session.dynamic_block_base", "4")
# name: (session options changed, intra-op threads (0: the engine's), top-k width)
VARIANTS = {
    "ORT alone: the artifact's graph, session.run, top max_k": (None, 0, None),
    "pool graph, top max_k (the code before)": (None, 0, None),
    "pool graph, top 5 (the engine's steps ask for 5)": (None, 0, 5),
    "pool graph, top 5, spinning during runs (force_spinning_stop)": (spin, 0, 5),
    "pool graph, top 5, session.dynamic_block_base 4": (blocks, 0, 5),
    "pool graph, top 5, ORT_ENABLE_EXTENDED": (extended, 0, 5),
    "pool graph, top 5, no memory pattern": (no_pattern, 0, 5),
    "pool graph, top 5, 1 intra-op thread": (None, 1, 5),
}
rng = np.random.default_rng(0)
tokens = [rng.integers(3, len(artifact.vocab), (batch, 1)) for _ in range(16)]
steps = {}
for i, (name, (change, threads, top)) in enumerate(VARIANTS.items()):
    model = OrtModel(artifact, ["CPUExecutionProvider"], threads)
    if change is not None:
        change(model._options)
    if i == 0:
        session, outs = model.session, model.state_outputs
        state = [np.zeros((model.layers, batch, model.hidden_size), np.float32) for _ in outs]
        def step(j, session=session, outs=outs, state=state, model=model):
            feeds = {"tokens": tokens[j % 16], **dict(zip(model.state_inputs, state))}
            state[:] = session.run([*outs, TOPK_PROBS, TOPK_IDS], feeds)[: len(outs)]
    else:
        pool = StatePool(model, 2 * batch + 8)
        rows = [pool.take(batch)]
        def step(j, pool=pool, rows=rows, top=top):
            out = pool.run(tokens[j % 16], rows[0], False, top=top)
            pool.release(rows[0])
            rows[0] = out.rows
    for j in range(3):
        step(j)
    steps[name] = step
times = {name: ([], []) for name in steps}
for r in range(rounds):
    for name, step in steps.items():
        wall, cpu = time.perf_counter(), time.process_time()
        for j in range(runs):
            step(j)
        times[name][0].append((time.perf_counter() - wall) / runs)
        times[name][1].append((time.process_time() - cpu) / runs)
print(json.dumps(times))
"""

PARTS = {
    "ort": "ONNX Runtime call (the pool's graph)",
    "run": "model runs' Python around it (bindings, outputs)",
    "compute": "rest of the engine thread (adaptation, results)",
    "loop": "event loop between batches (intake, store, answers)",
    "batch": "one batch of 256 steps, in all",
}


def one(checkout: Path, code: str, args: list[str]) -> float:
    """The figure printed by `code` run in `checkout` in a process of its own."""
    return float(last_line(checkout, ["-c", code, *args]))


def profile(args: argparse.Namespace, argv: list[str] | None) -> str:
    """The engine's batch in parts, for this checkout (and the baseline), alternated."""
    checkouts = {"this": ROOT} | ({"baseline": args.baseline} if args.baseline else {})
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in checkouts}
    size = [str(args.batch), str(args.seconds)]
    for r in range(args.rounds):
        for name, checkout in reversed(checkouts.items()):
            line = last_line(
                checkout,
                ["-c", _PROFILE, args.clock, str(args.models), args.model, *size],
            )
            runs[name].append(json.loads(line))
        print(f"round {r + 1}: " + ", ".join(
            f"{name} {runs[name][-1]['batch'] * 1e3:.1f} ms/batch" for name in checkouts
        ), flush=True)  # fmt: skip
    names = list(checkouts)
    lines = [
        f"model {args.model}, batch {args.batch}, one token a row; {args.rounds} rounds of "
        f"{args.seconds:g} s, alternated; ms per batch (median over rounds), "
        + ("wall clock" if args.clock == "wall" else "CPU time (all threads)"),
        "",
        "| part | " + " | ".join(f"{n} ({checkouts[n]})" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for key, what in PARTS.items():
        cells = []
        for name in names:
            value = statistics.median(run[key] for run in runs[name])
            share = statistics.median(run[key] / run["batch"] for run in runs[name])
            cells.append(f"{value * 1e3:.2f} ({share:.0%})")
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    lines += [
        "",
        *machine_lines(machine(MODULES), MODULES),
        f"command: {command_line('benchmarks.bench_ort_share', argv)}",
    ]
    return "\n".join(lines)


def graph(args: argparse.Namespace, argv: list[str] | None) -> str:
    """The pool's graph alone against ORT alone, and ONNX Runtime's session options."""
    line = last_line(
        ROOT,
        ["-c", _GRAPH, str(args.models / args.model), str(args.batch), str(args.rounds), "5"],
    )
    times: dict[str, list[list[float]]] = json.loads(line)
    base = statistics.median(times[next(iter(times))][1])
    lines = [
        f"model {args.model}, batch {args.batch}, one token a row; {args.rounds} rounds of 5 "
        "runs, the variants alternated in one process; ms per run (median over rounds)",
        "",
        "| variant | wall ms | CPU ms (all threads) | CPU / ORT alone |",
        "|---|---|---|---|",
    ]
    for name, (wall, cpu) in times.items():
        w, c = statistics.median(wall), statistics.median(cpu)
        lines.append(f"| {name} | {w * 1e3:.2f} | {c * 1e3:.2f} | {c / base:.3f} |")
    lines += [
        "",
        *machine_lines(machine(MODULES), MODULES),
        f"command: {command_line('benchmarks.bench_ort_share', argv)}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "service" / "models")
    parser.add_argument("--model", default="lstm")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--checkout", type=Path, default=ROOT, help="whose engine to measure")
    parser.add_argument("--baseline", type=Path, help="another checkout's engine, alternated")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--profile", action="store_true", help="the engine's batch in parts")
    parser.add_argument("--graph", action="store_true", help="the pool's graph and ORT options")
    parser.add_argument("--json", type=Path, help="write the results here (and .txt beside)")
    args = parser.parse_args(argv)

    if args.profile or args.graph:
        table = profile(args, argv) if args.profile else graph(args, argv)
        print(table)
        if args.json:
            write_report(args.json, {"args": vars(args)}, table)
        return

    info = machine(MODULES)
    engines = {"engine": args.checkout} | ({"baseline": args.baseline} if args.baseline else {})
    rates: dict[str, list[float]] = {"ort": [], **{name: [] for name in engines}}
    size = [str(args.batch), str(args.seconds)]
    for r in range(args.rounds):
        rates["ort"].append(one(ROOT, _ORT, [args.clock, str(args.models / args.model), *size]))
        for name, checkout in reversed(engines.items()):  # the baseline first
            rates[name].append(
                one(checkout, _ENGINE, [args.clock, str(args.models), args.model, *size])
            )
        print(f"round {r + 1}: ORT alone {rates['ort'][-1]:,.0f} steps/s, " + ", ".join(
            f"{name} {rates[name][-1]:,.0f}" for name in engines
        ), flush=True)  # fmt: skip
    per = "CPU second (all threads)" if args.clock == "cpu" else "second"
    a = statistics.median(rates["ort"])
    lines = [
        f"model {args.model} ({args.models / args.model}), batch {args.batch}, one token a row; "
        f"{args.rounds} rounds of {args.seconds:g} s, alternated; steps per {per}",
        "",
        "| path | steps/s (median) | us/step |",
        "|---|---|---|",
        f"| ONNX Runtime alone (session.run, states fed back) | {a:,.0f} | {1e6 / a:.1f} |",
    ]
    for name, checkout in engines.items():
        b = statistics.median(rates[name])
        lines.append(f"| {name} in process ({checkout}) | {b:,.0f} | {1e6 / b:.1f} |")
    lines.append("")
    for name in engines:
        ratios = [e / o for o, e in zip(rates["ort"], rates[name])]
        lines.append(
            f"{name} / ORT alone: {statistics.median(ratios):.2f} (per round: "
            + ", ".join(f"{x:.2f}" for x in ratios)
            + "; issue 19's target >= 0.9)"
        )
    if args.baseline:
        gains = [e / b for e, b in zip(rates["engine"], rates["baseline"])]
        lines.append(
            f"engine / baseline: {statistics.median(gains):.3f} (per round: "
            + ", ".join(f"{x:.3f}" for x in gains)
            + ")"
        )
    lines += [
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
