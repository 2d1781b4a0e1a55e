"""What one batch costs the engine: CPU per batch at several batch sizes, in process.

`EngineCore` on this event loop (scheduler, session store, state pool, adaptation, ONNX
Runtime; no sockets), `--rounds` batches of B one-word session steps for each B in
`--batches`, the process's CPU time (every thread) read around them. A least-squares line
through (B, CPU per batch) splits the cost into a fixed part per batch and a part per step:
end to end, where batches are smaller than `max_batch` (a closed loop's cohorts, or a paced
load's few steps per run), the fixed part is what each message pays for the batch it rode.

    python -m benchmarks.engine_batch_cost                       # tiny model and bundled LSTM
    python -m benchmarks.engine_batch_cost --batches 1 8 64 256 --rounds 100
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_core import MODULES, settings
from benchmarks.lib.machine import command_line, machine, machine_lines
from benchmarks.lib.models import models_dir, tiny_models
from service import heap
from service.contract.protocol import EngineOutput, EngineRequest, StepRequest
from service.engine.core import EngineCore


async def cpu_per_batch(models: Path, batches: list[int], rounds: int) -> list[float]:
    """CPU seconds per batch of B one-word steps of B sessions, for each B in `batches`."""
    core = await EngineCore.start(settings(models, "lstm", 0))
    heap.settle()  # as the engine process does once its models are loaded
    ids = [f"s{i}" for i in range(max(batches))]
    answered: list[EngineOutput] = []
    done = asyncio.Event()
    want = 0

    def reply(output: EngineOutput) -> None:
        answered.append(output)
        if len(answered) == want:
            done.set()

    async def batch(requests: list[StepRequest]) -> None:
        nonlocal want
        answered.clear()
        done.clear()
        want = len(requests)
        core.handle(list[EngineRequest](requests), reply, "bench")
        await done.wait()
        assert all(o.error is None for o in answered), answered[0]

    try:
        await batch([StepRequest(i, "lstm", [], 5, s, create=True) for i, s in enumerate(ids)])
        costs = []
        for size in batches:
            chosen = ids[:size]
            for r in range(3):  # warm: the sessions' rows, ORT's buffers for this shape
                await batch([StepRequest(i, "lstm", [10 + r], 5, s) for i, s in enumerate(chosen)])
            started = time.process_time()
            for r in range(rounds):
                word = 10 + r % 50
                await batch([StepRequest(i, "lstm", [word], 5, s) for i, s in enumerate(chosen)])
            costs.append((time.process_time() - started) / rounds)
        return costs
    finally:
        await core.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 128, 256])
    parser.add_argument("--rounds", type=int, default=60, help="batches timed per size")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    lines = machine_lines(machine(MODULES), MODULES)
    lines += [
        f"command: {command_line('benchmarks.engine_batch_cost')}",
        f"in process, one-word session steps, {args.rounds} batches per size, process CPU "
        "(all threads); ORT threads: one per core",
        "",
        "| model | "
        + " | ".join(f"B={b} ms/batch" for b in args.batches)
        + " | fixed ms/batch | us/step | fixed share at B=16, 128 |",
        "|---|" + "---|" * (len(args.batches) + 3),
    ]
    with tiny_models() as tiny, models_dir(None, "full") as (bundled, _label):
        for name, models in (("tiny (hidden 32)", tiny), ("lstm (bundled)", bundled)):
            costs = asyncio.run(cpu_per_batch(models, args.batches, args.rounds))
            per_step, fixed = np.polyfit(args.batches, costs, 1)
            shares = [fixed / (fixed + per_step * b) for b in (16, 128)]
            cells = " | ".join(f"{1e3 * c:.2f}" for c in costs)
            lines.append(
                f"| {name} | {cells} | {1e3 * fixed:.2f} | {1e6 * per_step:.1f} "
                f"| {shares[0]:.0%}, {shares[1]:.0%} |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
