"""Where an adapted batch's maths goes, function by function: microseconds per row.

The batch of `bench_adapt --functions` (256 rows of a bundled model, each memory first fed
`--history` tokens of WikiText-2 valid or a Zipf stream, one token a row a step), and each
step's hooks as the engine calls them, split into the functions of `service.engine.adapt`
they spend their time in: `update`, `live`, `gather_ids`, `top_k`, and inside `top_k` the
word slots (`_Held.of`), the mixture (`_scores`, and inside it the slot of each pair after
the last word, `_slots_of`) and the best k of the candidates (`_best`). Each is timed
alone on the step's inputs by the thread's CPU time (`time.thread_time`: on a shared
machine it moves less with the other work than the wall clock), the median over the steps;
the parts of a function are not subtracted from it. The mixing is timed on the memories'
active width (`adapt.active_width`: the columns before every row's empty tail), as the
engine mixes them.

    python -m benchmarks.adapt_profile [--model lstm] [--steps 40] [--history 1000]

A profile, not a comparison: for old against new code alternated, use `bench_adapt`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_adapt import token_rows
from benchmarks.lib.models import models_dir
from service.contract.artifact import ModelArtifact
from service.engine import adapt

ROWS = 256


def cpu_us(fn: Callable[[], Any], repeat: int = 5) -> float:
    """The least thread CPU time of `repeat` calls of `fn`, in microseconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best * 1e6


def profile(path: Path, steps: int, history: int) -> dict[str, float]:
    """Microseconds per row of each function (the median over `steps` steps)."""
    from service.engine.runtime import OrtModel  # noqa: PLC0415

    artifact = ModelArtifact.load(path)
    runner = OrtModel(artifact, ["CPUExecutionProvider"])
    vocab = runner.vocab
    params = adapt.params_of(artifact.manifest)
    ids, _ = token_rows(vocab, ROWS, history + steps + 1)
    keys, weights = adapt.empty_cache(ROWS, params.capacity)
    batch = Batch(vocab, params, ids, keys, weights)
    batch.count(0, history)
    state = runner.run(ids[:, max(0, history - 32) : history], runner.zero_state(ROWS)).state
    samples: dict[str, list[float]] = {}
    for t in range(history, history + steps):
        out = runner.run(ids[:, t : t + 1], state, want_probs=True)
        state = out.state
        for name, value in batch.step(t, out).items():
            samples.setdefault(name, []).append(value)
    return {name: float(np.median(v)) for name, v in samples.items()}


class Batch:
    """A batch's memories and text, stepped one token a row at a time."""

    def __init__(
        self,
        vocab: Any,
        params: adapt.AdaptParams,
        ids: np.ndarray,
        keys: np.ndarray,
        weights: np.ndarray,
    ) -> None:
        self.vocab, self.params, self.ids = vocab, params, ids
        self.size = len(vocab)
        self.layout = adapt.Layout.of(self.size, params)
        self.remembered = np.where(vocab.suggestible[ids], ids, adapt.EMPTY).astype(np.int32)
        self.keys, self.weights = keys, weights

    def count(self, start: int, end: int) -> None:
        """Tokens start..end of every row into the memories."""
        before = self.ids[:, start - 1] if start else np.full(ROWS, self.vocab.eos_id)
        adapt.update(
            self.keys, self.weights, self.remembered[:, start:end], np.full(ROWS, end - start),
            self.params, self.size, self.ids[:, start:end], before,
        )  # fmt: skip

    def step(self, t: int, out: Any) -> dict[str, float]:
        """Token t counted, then each function timed on this step's inputs: us per row."""
        keys, weights, params, layout, vocab = (
            self.keys, self.weights, self.params, self.layout, self.vocab
        )  # fmt: skip
        size = self.size
        memory = (keys.copy(), weights.copy())

        def update() -> None:
            # each call from the step's memory (copy timed too)
            self.keys[:], self.weights[:] = memory
            self.count(t, t + 1)

        parts: dict[str, Callable[[], Any]] = {"update (and a copy of the memory)": update}
        update()  # the memory the answer mixes in
        # What the engine mixes in (`Mixing.used`): the columns before every row's empty tail.
        active = adapt.active_width(keys)
        keys, weights = keys[:, :active], weights[:, :active]
        gather = adapt.gather_ids(keys, size, vocab.unk_id)
        at_keys = np.take_along_axis(out.probs, gather.astype(np.int64), 1)
        last = self.ids[:, t]
        held = adapt._Held.of(keys, weights, layout)
        at, p_unk = at_keys[:, :-1], at_keys[:, -1:]
        none: list[Any] = [None] * ROWS
        parts["live"] = lambda: adapt.live(keys, weights, size, params)
        parts["gather_ids"] = lambda: adapt.gather_ids(keys, size, vocab.unk_id)
        parts["top_k"] = lambda: adapt.top_k(
            keys, weights, None, out.topk_ids, out.topk_probs, vocab.unk_id, vocab.suggestible,
            5, params.lam, none, none, at_keys, None, params, last, none,
        )  # fmt: skip
        parts["  _Held.of (word slots)"] = lambda: adapt._Held.of(keys, weights, layout)
        parts["  _scores (the mixture)"] = lambda: adapt._scores(
            keys, weights, at, p_unk, last, size, params, layout, held
        )
        shifted, pairs = adapt._pairs_after(keys, last, layout)
        pr, pc = np.divmod(np.flatnonzero(pairs), keys.shape[1])
        nxt = shifted[pr, pc].astype(np.int16)
        narrow = np.minimum(adapt._unsigned(keys), layout.words).astype(np.int16)
        parts["    _pairs_after"] = lambda: adapt._pairs_after(keys, last, layout)
        parts["    _slots_of (pairs' words)"] = lambda: adapt._slots_of(narrow, pr, nxt)
        mix = adapt._scores(keys, weights, at, p_unk, last, size, params, layout, held)
        floor = mix.model * out.topk_probs[:, 4:5]
        r, c = np.divmod(np.flatnonzero(mix.scores >= floor), keys.shape[1])
        key = keys[r, c].astype(np.int64)
        parts["  _shown_at (candidates)"] = lambda: adapt._shown_at(
            keys, r, key, vocab.suggestible, layout, params
        )
        shown = adapt._shown_at(keys, r, key, vocab.suggestible, layout, params)
        r, c, key = r[shown], c[shown], key[shown]
        counts = np.bincount(r, minlength=ROWS)
        width = 5 + int(counts.max(initial=0))
        cand_ids = np.full((ROWS, width), adapt.EMPTY, dtype=np.int64)
        cand = np.full((ROWS, width), np.float32(-1.0), dtype=np.float32)
        cand_ids[:, :5] = out.topk_ids[:, :5]
        cand[:, :5] = mix.model * out.topk_probs[:, :5]
        column = 5 + np.arange(len(r)) - (np.cumsum(counts) - counts)[r]
        cand_ids[r, column] = key
        cand[r, column] = mix.scores[r, c]
        parts["  _best (the best k)"] = lambda: adapt._best(cand_ids, cand, 5)
        times = {name: cpu_us(fn) / ROWS for name, fn in parts.items()}
        times["(active width: columns mixed)"] = active
        times["(candidates a row)"] = len(r) / ROWS
        times["(pairs after the last word a row)"] = len(pr) / ROWS
        return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="models folder (bundled)")
    parser.add_argument("--model", nargs="+", default=["lstm", "gru"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--history", type=int, default=1000, help="tokens fed to each first")
    args = parser.parse_args(argv)
    with models_dir(args.models, "full") as (models, label):
        print(label)
        for model in args.model:
            print(
                f"== {model}: a batch of {ROWS}, memories fed {args.history} tokens first; "
                f"median of {args.steps} steps, us per row (thread CPU)"
            )
            for name, value in profile(models / model, args.steps, args.history).items():
                print(f"  {name:40s} {value:7.3f}")


if __name__ == "__main__":
    main()
