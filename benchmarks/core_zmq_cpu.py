"""Over ZeroMQ, where the CPU goes: the engine process's and the client process's CPU per step.

`bench_core`'s ZeroMQ round (one `ZmqClient` in this process, `--sessions` one-word steps
a round, near-free model), with each process's CPU time (user + system, every thread) read
from /proc around the timed rounds: on a 2-core machine the two processes share the cores,
so steps/s alone does not say which side limits. It measures the code on its path, so an
older checkout too:

    python -m benchmarks.core_zmq_cpu --seconds 4
    cd /tmp/base && PYTHONPATH=/tmp/base .venv/bin/python /path/to/benchmarks/core_zmq_cpu.py
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def measure(models: Path, seconds: float, sessions: int) -> str:
    from benchmarks import bench_core
    from service.contract.protocol import StepRequest
    from service.engine.client import ZmqClient
    from service.engine.proc import run_engine

    model = "lstm"
    with tempfile.TemporaryDirectory(prefix="nextword-bench-") as run_dir:
        address = f"ipc://{run_dir}/engine"
        context = multiprocessing.get_context("spawn")
        control, theirs = context.Pipe()
        settings = bench_core.settings(models, model, 0)
        engine = context.Process(target=run_engine, args=(settings, address, theirs))
        engine.start()
        theirs.close()
        if not control.poll(300):
            raise RuntimeError("the engine did not start")
        control.recv()
        client = await ZmqClient.connect(address)
        ids = [f"s{i}" for i in range(sessions)]
        try:

            async def round_(make: Any) -> None:
                calls = (client.call(make(client.next_id(), sid)) for sid in ids)
                outputs = await asyncio.gather(*calls)
                assert all(o.error is None for o in outputs), outputs[0]

            await round_(lambda rid, sid: StepRequest(rid, model, [], 5, sid, create=True))
            assert engine.pid is not None
            theirs_cpu, ours_cpu = psutil.Process(engine.pid), psutil.Process()
            engine_start, client_start = cpu_seconds(theirs_cpu), cpu_seconds(ours_cpu)
            steps, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                word = 10 + steps % 50
                await round_(lambda rid, sid, w=word: StepRequest(rid, model, [w], 5, sid))
                steps += sessions
            wall = time.perf_counter() - start
            engine_cpu = cpu_seconds(theirs_cpu) - engine_start
            client_cpu = cpu_seconds(ours_cpu) - client_start
        finally:
            await client.close()
            control.send("stop")
            engine.join(30)
    adapt = os.environ.get("NEXTWORD_ADAPT_MEMORY", "True")
    return (
        f"adaptation {'off' if adapt == 'False' else 'on'}: {steps / wall:,.0f} steps/s; "
        f"engine process {1e6 * engine_cpu / steps:.1f} us CPU/step, "
        f"client process {1e6 * client_cpu / steps:.1f} us CPU/step"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--sessions", type=int, default=256)
    args = parser.parse_args()
    from benchmarks.lib.models import tiny_models

    with tiny_models() as models:
        print(asyncio.run(measure(models, args.seconds, args.sessions)))


if __name__ == "__main__":
    main()
