"""Adaptation's per-row work around the functions: the batch hooks of this tree against
another checkout's, alternated on the same rows in one process.

The bundled LSTM's vocabulary and parameters; `--sessions` rows (a batch of one-word steps),
each session's memory first fed a writer's text (typed names included) by the hooks
themselves; then per round, for each version in turn: `count` (the new words into the
memories), `prepare`, `answer` (on a fixed distribution) and the check `_result` makes of
whether an answer names a typed word. The adaptation functions (`service.engine.adapt`)
are this tree's for both, so the difference is the hooks' own work. Microseconds per row,
the median round, and the median of each round's old/new ratio; a check that both give
the same memories and answers.

    python -m benchmarks.bench_hooks --baseline /tmp/base-hooks
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from benchmarks.bench_adapt import TEXT
from benchmarks.lib.machine import machine, machine_lines
from service.contract.artifact import ModelArtifact
from service.engine import adapt, adapt_hooks
from service.engine.runtime import StepOutput
from service.engine.steps import Step, StepRun
from service.store import SessionRecord


def load_hooks(root: Path) -> ModuleType:
    """Another checkout's `service/engine/adapt_hooks.py`, under its own name (it calls this
    tree's `adapt`)."""
    spec = importlib.util.spec_from_file_location(
        "nextword_baseline_hooks", root / "service/engine/adapt_hooks.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def records(hooks: Any, ids: list[int], typed: list[str], sessions: int) -> list[SessionRecord]:
    """Sessions whose memories hold the writer's text (counted by `hooks`)."""
    rows = [
        StepRun(Step(list(ids), session_id=f"s{i}", typed=list(typed)), None)
        for i in range(sessions)
    ]
    for row in rows:
        row.final, row.last_token = True, 0
    hooks.count(rows)
    return [
        SessionRecord(f"s{i}", "lstm", (), len(ids), 0.0, 0.0, 1, ids[-1], "", row.memory, True)
        for i, row in enumerate(rows)
    ]


def one_round(
    hooks: Any,
    new: bool,
    stored: list[SessionRecord],
    word: int,
    output: StepOutput,
    vocab_size: int,
) -> tuple[float, list[Any]]:
    """One batch of one-word steps through the hooks and `_result`'s check (old: each row's
    ids compared with V; new: the flag `answer` set); its seconds and what it left."""
    rows = []
    for record in stored:
        row = StepRun(Step([word], session_id=record.session_id), record)
        row.final, row.last_token, row.context_tokens = True, record.last_token, record.tokens
        rows.append(row)
    start = time.perf_counter()
    live = hooks.count(rows)
    for row, holds in zip(rows, live):
        row.mixed = holds
    mixing = hooks.prepare(rows)
    if mixing is not None:
        hooks.answer(rows, output, mixing)
    words = []
    for row in rows:  # what `_result` asks of each row
        assert row.answer is not None
        if new:
            words.append(row.memory.words if row.typed_answer and row.memory else ())
        elif row.memory is not None and row.memory.words and (row.answer[0] >= vocab_size).any():
            words.append(row.memory.words)
        else:
            words.append(())
    elapsed = time.perf_counter() - start
    left = []
    for row, shown in zip(rows, words):
        assert row.memory is not None and row.answer is not None
        memory, (ids, probs) = row.memory, row.answer
        left.append(
            (
                memory.keys.tobytes(),
                memory.weights.tobytes(),
                memory.words,
                ids.tobytes(),
                probs.tobytes(),
                shown,
            )
        )
    return elapsed, left


def main() -> None:
    """Parse the arguments, time both versions alternated, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="another checkout")
    parser.add_argument("--sessions", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    artifact = ModelArtifact.load(Path(adapt_hooks.__file__).parent.parent / "models" / "lstm")
    vocab = artifact.vocab
    vocab_size = len(vocab.tokens)
    params = adapt.params_of(artifact.manifest)
    versions = {
        "old": load_hooks(args.baseline).Adaptation(
            params, vocab.suggestible, vocab.unk_id, vocab_size
        ),
        "new": adapt_hooks.Adaptation(params, vocab.suggestible, vocab.unk_id, vocab_size),
    }
    ids, typed = vocab.encode_typed(TEXT * 4)
    ids = ids[:300]
    typed = typed[: sum(1 for i in ids if i == vocab.unk_id)]
    stored = {name: records(h, ids, typed, args.sessions) for name, h in versions.items()}
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(vocab_size, 0.05), size=args.sessions).astype(np.float32)
    probs[:, ~vocab.suggestible] = 0.0
    order = np.argsort(-probs, axis=1, kind="stable")[:, :10]
    output = StepOutput(
        np.take_along_axis(probs, order, 1), order.astype(np.int64), probs, state=()
    )
    words = [i for i in ids if i != vocab.unk_id]
    times: dict[str, list[float]] = {"old": [], "new": []}
    for n in range(args.rounds):
        got = {}
        for name, hooks in versions.items():
            elapsed, got[name] = one_round(
                hooks, name == "new", stored[name], words[n % len(words)], output, vocab_size
            )
            times[name].append(elapsed)
        if got["old"] != got["new"]:
            raise SystemExit(f"round {n}: old and new hooks differ")
    print("\n".join(machine_lines(machine(("numpy",)), ("numpy",))))
    print(f"{args.sessions} rows, {args.rounds} rounds, alternated; same memories and answers: yes")
    for name in times:
        print(f"{name}: {1e6 * statistics.median(times[name]) / args.sessions:.2f} us/row")
    ratio = statistics.median(o / n for o, n in zip(times["old"], times["new"]))
    print(f"old/new (median of paired rounds): {ratio:.2f}x")


if __name__ == "__main__":
    main()
