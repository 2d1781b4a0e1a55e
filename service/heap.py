"""The garbage collector in a serving process: what it keeps for life is left out of it.

A process that has loaded what it keeps until it exits (imports, models, their ONNX
graphs: ~195,000 objects the collector tracks in the engine) calls `settle()` once. Those
objects go to the permanent generation (`gc.freeze`), so that full collections no longer
walk them, and the youngest generation's threshold is raised from 700 to `YOUNG`: a
batch of 256 steps allocates a few thousand objects that live until it is answered, and
with 700 each batch would carry some of them into older generations to be walked again.

What is frozen is never collected, not even when it later becomes unreachable in a
reference cycle: `settle()` is for a process that keeps what it has loaded until it
exits (the engine process; an API process of `nextword serve`), called once.

Measured with `benchmarks/bench_core.py`'s in-process engine (tiny model, 256 sessions,
one word each per round, 2-core machine): 115-131 us per step with the defaults,
109-112 with `gc.freeze` alone, 95 with both, 80-83 with the collector off; full
collections took 0.46 s of 3 s with the defaults.
"""

from __future__ import annotations

import gc

YOUNG = 20_000  # objects allocated (net) before a young collection


def settle() -> None:
    """Collect once, freeze what is left, and raise the young generation's threshold."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG, middle, old)
