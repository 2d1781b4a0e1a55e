"""Where the engine's CPU goes per step: `bench_core`'s in-process round, phase by phase.

Each phase of the engine (the core's intake, the store's read and write, taking the batch,
the executor's work and within it the model runs, the results and the adaptation hooks) is
timed by the CPU time of the thread that runs it (`time.thread_time`), summed over the run
and divided by the steps answered; "process" is the whole process's CPU per step (every
thread: the event loop's own work, futures, answers and ONNX Runtime's pool thread
included, and the engine's start amortised over the run). CPU time, not the wall clock:
on a shared machine it moves far less with the other work.

It names the phases by the methods of the code it runs, so it measures an older checkout
too (`PYTHONPATH=<checkout>`, run from there): phases it does not find are left out.

    python -m benchmarks.core_profile --seconds 4 [--adapt]
    cd /tmp/base && PYTHONPATH=/tmp/base python /path/to/benchmarks/core_profile.py --seconds 4
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import importlib
import inspect
import os
import time
from typing import Any

PHASES = [
    ("service.engine.core", "EngineCore", "handle", "loop: intake (Step.from_request, submit)"),
    ("service.store.memory", "MemorySessionStore", "get_many", "loop: store read"),
    ("service.store.memory", "MemorySessionStore", "put_many", "loop: store write"),
    ("service.engine.scheduler", "StepBatcher", "submit", "loop:   queueing a step (submit)"),
    ("service.engine.scheduler", "StepBatcher", "submit_many", "loop:   queueing a step (submit)"),
    ("service.engine.scheduler", "StepBatcher", "_end", "loop:   ending steps (_end, sinks)"),
    ("service.engine.scheduler", "StepBatcher", "_take", "loop: taking the batch"),
    ("service.engine.scheduler", "StepBatcher", "_locate", "loop: rows' states (_locate)"),
    ("service.engine.scheduler", "StepBatcher", "_write", "loop: write, commit, answers"),
    ("service.engine.scheduler", "StepBatcher", "_write_common", "loop: write, commit, answers"),
    ("service.engine.scheduler", "StepBatcher", "_commit", "loop:   residency commit"),
    ("service.engine.scheduler", "StepBatcher", "_carry_on", "loop: carrying on (_carry_on)"),
    ("service.engine.scheduler", "StepBatcher", "_compute", "executor: all its work"),
    ("service.engine.scheduler", "StepBatcher", "_run", "executor:   model runs (ORT, rows)"),
    ("service.engine.scheduler", "StepBatcher", "_plan", "executor:   planning"),
    ("service.engine.scheduler", "StepBatcher", "_result", "executor:   results and records"),
    ("service.engine.execute", "Execution", "run", "executor:   model runs (ORT, rows)"),
    ("service.engine.execute", "Execution", "run_rows", "executor:   model runs (ORT, rows)"),
    ("service.engine.execute", "Execution", "plan", "executor:   planning"),
    ("service.engine.execute", "Execution", "result", "executor:   results and records"),
    ("service.engine.execute", "Execution", "results", "executor:   results and records"),
    ("service.engine.scheduler", "StepBatcher", "_remember", "executor:   adaptation: count"),
    ("service.engine.scheduler", "StepBatcher", "_answer_mixed", "executor:   adaptation: answer"),
    ("service.engine.adapt_hooks", "Adaptation", "count", "executor:   adaptation: count"),
    ("service.engine.adapt_hooks", "Adaptation", "answer", "executor:   adaptation: answer"),
    ("service.engine.adapt_hooks", "Adaptation", "count_columns", "executor:   adaptation: count"),
    (
        "service.engine.adapt_hooks",
        "Adaptation",
        "answer_columns",
        "executor:   adaptation: answer",
    ),
]


def instrument(spent: collections.defaultdict[str, float]) -> None:
    """Wrap every phase found in the code on the path so that it adds its CPU to `spent`
    (a phase called within one of the same label, such as `count` calling
    `count_columns`, is counted once)."""
    active: set[str] = set()
    for module_name, class_name, method, label in PHASES:
        try:
            owner = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        original = getattr(owner, method, None)
        if original is None:
            continue
        if inspect.iscoroutinefunction(original):
            # The memory store's coroutines never suspend: the thread's CPU is theirs.
            async def timed_async(*a: Any, _f: Any = original, _l: str = label, **k: Any) -> Any:
                if _l in active:
                    return await _f(*a, **k)
                active.add(_l)
                start = time.thread_time()
                try:
                    return await _f(*a, **k)
                finally:
                    spent[_l] += time.thread_time() - start
                    active.discard(_l)

            setattr(owner, method, functools.wraps(original)(timed_async))
        else:

            def timed(*a: Any, _f: Any = original, _l: str = label, **k: Any) -> Any:
                if _l in active:
                    return _f(*a, **k)
                active.add(_l)
                start = time.thread_time()
                try:
                    return _f(*a, **k)
                finally:
                    spent[_l] += time.thread_time() - start
                    active.discard(_l)

            setattr(owner, method, functools.wraps(original)(timed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--sessions", type=int, default=256)
    parser.add_argument("--adapt", action="store_true", help="adaptation on (default off)")
    args = parser.parse_args()
    os.environ["NEXTWORD_ADAPT_MEMORY"] = str(args.adapt)
    from benchmarks import bench_core
    from benchmarks.lib.models import tiny_models

    spent: collections.defaultdict[str, float] = collections.defaultdict(float)
    instrument(spent)
    with tiny_models() as models:
        asyncio.run(bench_core.in_process(models, "lstm", args.sessions, 1.0, 0))  # warm
        spent.clear()
        cpu = time.process_time()
        rate = asyncio.run(bench_core.in_process(models, "lstm", args.sessions, args.seconds, 0))
        cpu = time.process_time() - cpu
    steps = rate * args.seconds
    print(
        f"near-free model, {args.sessions} sessions, adaptation {'on' if args.adapt else 'off'}: "
        f"{rate:,.0f} steps/s (wall clock), process CPU {1e6 * cpu / steps:.1f} us/step"
    )
    for label, seconds in sorted(spent.items()):
        print(f"  {label:44s} {1e6 * seconds / steps:6.1f} us/step")


if __name__ == "__main__":
    main()
