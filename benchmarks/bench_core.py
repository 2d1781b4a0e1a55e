"""The engine without HTTP: steps/s of `EngineCore`, in this process and over ZeroMQ.

What one engine process can do, whatever the number of API processes in front of it:
`--sessions` sessions each step one word per round (a batch of that many one-token
steps), as fast as answers come back. "in process": `EngineCore.handle` called on this
event loop (scheduler, session store, protocol structs; no sockets). "over ZeroMQ": the
engine in its own process (`service.engine.proc`) and a `ZmqClient` here sending each
round as one frame. With a near-free model (hidden 32) this is the engine's own cost per
step; with the bundled LSTM, ONNX Runtime's share shows. "copied" is the in-process
figure again with `NEXTWORD_STATE_POOL=false` (states copied into and out of every run
instead of kept in the model's pool), measured right after it.

    python -m benchmarks.bench_core --json benchmarks/results/core.json

`--compare DIR` measures another checkout (DIR: e.g. `git worktree add --detach /tmp/base
main`) against this one instead, alternated round by round in fresh processes (each
figure a process of its own, old and new taking turns, so that a shared machine's load
falls on both), with adaptation on and off (`NEXTWORD_ADAPT_MEMORY`), in process and over
ZeroMQ, on the near-free model:

    python -m benchmarks.bench_core --compare /tmp/base --sessions 256 --seconds 3 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.lib.checkout import last_line
from benchmarks.lib.machine import machine, machine_lines
from benchmarks.lib.results import write_report
from service import heap
from service.config import Settings
from service.contract.protocol import EngineOutput, StepRequest
from service.engine.client import ZmqClient
from service.engine.core import EngineCore
from service.engine.proc import run_engine

MODULES = ("onnxruntime", "numpy", "msgspec", "zmq")


PROVIDERS = "CPUExecutionProvider"  # --providers


def settings(models: Path, model: str, threads: int, state_pool: bool = True) -> Settings:
    return Settings(
        models_dir=models, default_model=model, providers=PROVIDERS, intra_op_threads=threads,
        state_pool=state_pool,
    )  # fmt: skip


async def in_process(
    models: Path, model: str, sessions: int, seconds: float, threads: int, state_pool: bool = True
) -> float:
    core = await EngineCore.start(settings(models, model, threads, state_pool))
    heap.settle()  # as the engine process does once its models are loaded
    ids = [f"s{i}" for i in range(sessions)]
    try:
        done = asyncio.Event()
        answered: list[EngineOutput] = []

        def reply(output: EngineOutput) -> None:
            answered.append(output)
            if len(answered) == sessions:
                done.set()

        async def round_(requests: list[StepRequest]) -> None:
            answered.clear()
            done.clear()
            core.handle(list(requests), reply, "bench")
            await done.wait()
            assert all(o.error is None for o in answered), answered[0]

        await round_([StepRequest(i, model, [], 5, sid, create=True) for i, sid in enumerate(ids)])
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            word = 10 + steps % 50
            await round_([StepRequest(i, model, [word], 5, sid) for i, sid in enumerate(ids)])
            steps += sessions
        return steps / (time.perf_counter() - start)
    finally:
        await core.close()


async def over_zmq(models: Path, model: str, sessions: int, seconds: float, threads: int) -> float:
    with tempfile.TemporaryDirectory(prefix="nextword-bench-") as run_dir:
        address = f"ipc://{run_dir}/engine"
        context = multiprocessing.get_context("spawn")
        control, theirs = context.Pipe()
        engine = context.Process(
            target=run_engine, args=(settings(models, model, threads), address, theirs)
        )
        engine.start()
        theirs.close()
        if not control.poll(300):
            raise RuntimeError("the engine did not start")
        control.recv()
        client = await ZmqClient.connect(address)
        ids = [f"s{i}" for i in range(sessions)]
        try:

            async def round_(make: Any) -> None:
                outputs = await asyncio.gather(
                    *(client.call(make(client.next_id(), sid)) for sid in ids)
                )
                assert all(o.error is None for o in outputs), outputs[0]

            await round_(lambda rid, sid: StepRequest(rid, model, [], 5, sid, create=True))
            steps, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                word = 10 + steps % 50
                await round_(lambda rid, sid, w=word: StepRequest(rid, model, [w], 5, sid))
                steps += sessions
            return steps / (time.perf_counter() - start)
        finally:
            await client.close()
            control.send("stop")
            engine.join(30)


# Run in a checkout's own directory: its `benchmarks.bench_core` and `service` (the old
# code's functions take the same arguments). Prints the steps/s as the last line.
_ONE = """
import asyncio, sys
from pathlib import Path
from benchmarks import bench_core
models, mode, sessions, seconds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
if mode == "zmq":
    rate = asyncio.run(bench_core.over_zmq(models, "lstm", sessions, seconds, 0))
elif mode == "cpu":  # in process, per CPU second of this process (all its threads)
    import time, types
    bench_core.time = types.SimpleNamespace(perf_counter=time.process_time)
    rate = asyncio.run(bench_core.in_process(models, "lstm", sessions, seconds, 0))
else:
    rate = asyncio.run(bench_core.in_process(models, "lstm", sessions, seconds, 0))
print(rate)
"""


PATHS = {
    "in_process": "in process",
    # The same, timed by the process's CPU time (the engine's threads and ORT's): what a
    # step costs, less sensitive than the wall clock to other work on a shared machine.
    "cpu": "in process, per CPU second",
    "zmq": "over ZeroMQ",
}


def measure_in(checkout: Path, models: Path, mode: str, sessions: int, seconds: float,
               adapt: bool) -> float:  # fmt: skip
    """Steps/s of one figure, measured by `checkout`'s code in a process of its own."""
    args = ["-c", _ONE, str(models), mode, str(sessions), str(seconds)]
    return float(last_line(checkout, args, env={"NEXTWORD_ADAPT_MEMORY": str(adapt)}))


def compare(old: Path, sessions: int, seconds: float, rounds: int) -> list[str]:
    """Old and new code alternated: the table's lines (median steps/s of `rounds` each)."""
    from benchmarks.lib.models import tiny_models

    new = Path(__file__).resolve().parent.parent
    lines = [
        f"old: {old}; new: {new}; near-free model (hidden 32), {sessions} sessions, "
        f"{seconds:g} s a figure, {rounds} rounds alternated (median)",
        "",
        "| path | adaptation | old steps/s | new steps/s | old us/step | new us/step | new/old |",
        "|---|---|---|---|---|---|---|",
    ]
    with tiny_models() as tiny:
        for mode in ("in_process", "cpu", "zmq"):
            for adapt in (False, True):
                rates: dict[str, list[float]] = {"old": [], "new": []}
                for _ in range(rounds):
                    for label, checkout in (("old", old), ("new", new)):
                        rate = measure_in(checkout, tiny, mode, sessions, seconds, adapt)
                        rates[label].append(rate)
                        print(f"{mode} adapt={adapt} {label}: {rate:,.0f}", flush=True)
                a, b = statistics.median(rates["old"]), statistics.median(rates["new"])
                lines.append(
                    f"| {PATHS[mode]} | {'on' if adapt else 'off'} | {a:,.0f} | "
                    f"{b:,.0f} | {1e6 / a:.1f} | {1e6 / b:.1f} | {b / a:.2f}x |"
                )
    return lines


def main(argv: list[str] | None = None) -> None:
    global PROVIDERS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=0, help="ORT threads (0: one per core)")
    parser.add_argument("--json", type=Path, help="write the results here (and .txt beside)")
    parser.add_argument("--providers", default=PROVIDERS, help="NEXTWORD_PROVIDERS (auto: CUDA)")
    parser.add_argument("--compare", type=Path, help="another checkout, measured alternately")
    parser.add_argument("--rounds", type=int, default=3, help="--compare: rounds of each")
    args = parser.parse_args(argv)
    PROVIDERS = args.providers
    if args.compare is not None:
        info = machine(MODULES)
        text = "\n".join(
            machine_lines(info, MODULES)
            + compare(args.compare.resolve(), args.sessions[-1], args.seconds, args.rounds)
        )
        print(text)
        if args.json:
            write_report(args.json, {"machine": info, "compare": text}, text)
        return
    from benchmarks.lib.models import models_dir, tiny_models

    info = machine(MODULES)
    lines = machine_lines(info, MODULES) + [f"providers: {PROVIDERS}"]
    rows = []
    with tiny_models() as tiny, models_dir(None, "full") as (bundled, label):
        lines.append(f"{label}; and tiny random-weight models (hidden 32)")
        for name, models, model in (("tiny (hidden 32)", tiny, "lstm"), ("lstm", bundled, "lstm")):
            for sessions in args.sessions:
                local = asyncio.run(in_process(models, model, sessions, args.seconds, args.threads))
                copied = asyncio.run(
                    in_process(models, model, sessions, args.seconds, args.threads, False)
                )
                remote = asyncio.run(over_zmq(models, model, sessions, args.seconds, args.threads))
                rows.append(
                    {
                        "model": name,
                        "sessions": sessions,
                        "in_process": local,
                        "in_process_copied": copied,
                        "zmq": remote,
                    }
                )
                print(
                    f"{name} x{sessions}: {local:,.0f} in process ({copied:,.0f} copied), "
                    f"{remote:,.0f} over ZeroMQ"
                )
    table = [
        "| model | batch (sessions) | in process steps/s | us/step | copied states steps/s "
        "| resident / copied | over ZeroMQ steps/s | us/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['model']} | {r['sessions']} | {r['in_process']:,.0f} | "
            f"{1e6 / r['in_process']:.1f} | {r['in_process_copied']:,.0f} | "
            f"{r['in_process'] / r['in_process_copied']:.2f}x | "
            f"{r['zmq']:,.0f} | {1e6 / r['zmq']:.1f} |"
        )
    text = "\n".join([*lines, "", *table])
    print(text)
    if args.json:
        write_report(args.json, {"machine": info, "rows": rows}, text)


if __name__ == "__main__":
    main()
