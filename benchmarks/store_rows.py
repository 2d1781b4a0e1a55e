"""The in-process memory store's own cost per row, as the engine calls it: this checkout
against another, alternated in fresh processes.

A round is one batch of `--sessions` sessions read (`get_many`) and written back
(`put_many`, each at the version it was read at), on the store alone (no engine, no
model), timed by the thread's CPU time (`time.thread_time`, steadier than the wall clock
on a shared machine). Three kinds of record, as the engine writes them: state kept on its
device and no memory (adaptation off, the state pool on: the usual case), the same with a
writer's-words memory of 256 slots (adaptation on), and host states of the bundled LSTM's
shape (4 x 2 x 512 float32: the pool off, or a spilled session).

    python -m benchmarks.store_rows --compare /tmp/base --rounds 3

Each figure is the median over `--rounds` processes of each checkout, old and new taking
turns; the ratio is old / new (above 1: this checkout is cheaper).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import time
from pathlib import Path

KINDS = {  # name -> (state kept on the device, memory slots)
    "device, no memory": (True, 0),
    "device, memory 256": (True, 256),
    "host LSTM state": (False, 0),
}


def measure(sessions: int, seconds: float) -> dict[str, tuple[float, float]]:
    """Microseconds of CPU per row of `get_many` and of `put_many`, per kind of record,
    with the `service` package importable from the path."""
    import numpy as np

    from service.store.base import SessionRecord, WordMemory
    from service.store.memory import MemorySessionStore

    out = {}
    loop = asyncio.new_event_loop()
    ids = [f"session-{i:06d}-{'x' * 14}" for i in range(sessions)]
    for name, (on_device, slots) in KINDS.items():
        store = MemorySessionStore(ttl_s=1e9, cap=10 * sessions)
        state = () if on_device else tuple(np.zeros((2, 512), np.float32) for _ in range(4))

        records = [
            SessionRecord(
                session_id,
                "lstm",
                state,
                1,
                1.0,
                2.0,
                memory=WordMemory.empty(slots) if slots else None,
                state_on_device=on_device,
            )
            for session_id in ids
        ]
        loop.run_until_complete(store.put_many(records, [None] * sessions))
        read = write = 0.0
        rounds = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.thread_time()
            read_back = loop.run_until_complete(store.get_many(ids))
            middle = time.thread_time()
            got = [g for g in read_back if g is not None]
            new = [dataclasses.replace(g, tokens=g.tokens + 1) for g in got]
            versions: list[int | None] = [g.version for g in got]
            before = time.thread_time()
            written = loop.run_until_complete(store.put_many(new, versions))
            after = time.thread_time()
            assert all(written)
            read += middle - start
            write += after - before
            rounds += 1
        rows = rounds * sessions
        out[name] = (read / rows * 1e6, write / rows * 1e6)
    loop.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=256, help="rows per batch")
    parser.add_argument("--seconds", type=float, default=1.5, help="per kind and process")
    parser.add_argument("--compare", type=Path, help="another checkout, measured alternately")
    parser.add_argument("--rounds", type=int, default=3, help="processes of each checkout")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.sessions, args.seconds)))
        return
    from benchmarks.lib.checkout import last_line  # noqa: PLC0415 (parent only: children may run older code)

    here = Path(__file__).resolve().parent.parent
    trees = {"this": here}
    if args.compare:
        trees = {"old": args.compare.resolve(), "new": here}
    figures: dict[str, list[dict[str, list[float]]]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            # This file run as a script, with only the measured checkout's `service` on the path.
            child = [str(Path(__file__).resolve()), "--child"]
            child += ["--sessions", str(args.sessions), "--seconds", str(args.seconds)]
            figures[name].append(json.loads(last_line(tree, child)))
    from benchmarks.lib.machine import machine, machine_lines  # noqa: PLC0415 (parent only)

    for line in machine_lines(machine(["numpy"]), ["numpy"]):
        print(line)
    print(f"{args.sessions} sessions per batch, {args.rounds} rounds, us of CPU per row:")
    header = f"{'records':<20}" + "".join(f"{n + ' read':>12}{n + ' write':>12}" for n in trees)
    print(header + ("   ratio read  ratio write" if args.compare else ""))
    for kind in KINDS:
        cells = {
            name: [statistics.median(run[kind][j] for run in figures[name]) for j in (0, 1)]
            for name in trees
        }
        line = f"{kind:<20}" + "".join(f"{r:>12.2f}{w:>12.2f}" for r, w in cells.values())
        if args.compare:
            (old_r, old_w), (new_r, new_w) = cells["old"], cells["new"]
            line += f"{old_r / new_r:>13.2f}{old_w / new_w:>13.2f}"
        print(line)


if __name__ == "__main__":
    main()
