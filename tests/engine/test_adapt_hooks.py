"""Adaptation's batch hooks (service/engine/adapt_hooks.py) on hand-made step runs: counting
in chunks gives the memory counting at once gives, and a run mixes in only the memories of
the rows that mix."""

from __future__ import annotations

import numpy as np

from service.engine import adapt
from service.engine.adapt_hooks import Adaptation
from service.engine.steps import Step, StepRun

V = 50  # a vocabulary of 50 ids; 0 is the end of sentence


def adaptation() -> Adaptation:
    return Adaptation(adapt.params_of({}), np.ones(V, dtype=bool), unk_id=1, vocab_size=V)


def run(tokens: list[int]) -> StepRun:
    row = StepRun(Step(tokens, session_id="s"), None)
    row.last_token = 0
    return row


def test_counting_a_long_step_in_chunks_gives_the_memory_of_counting_it_at_once() -> None:
    hooks = adaptation()
    words = [5, 6, 7, 5, 8, 9, 5]
    whole = run(words)
    whole.final = True
    hooks.count([whole])
    chunked = run(words)
    for done, piece in ((0, 3), (3, 3)):
        chunked.done, chunked.piece, chunked.final = done, piece, False
        hooks.count([chunked, run([11])])  # beside another session's step, as in a batch
    chunked.final = True
    hooks.count([chunked])
    assert whole.memory is not None and chunked.memory is not None
    np.testing.assert_array_equal(chunked.memory.keys, whole.memory.keys)
    np.testing.assert_allclose(chunked.memory.weights, whole.memory.weights, rtol=1e-6)
    assert 5 in whole.memory.keys.tolist() and 9 in whole.memory.keys.tolist()


def test_a_run_mixes_in_only_the_memories_of_the_rows_that_mix() -> None:
    hooks = adaptation()
    rows = [run([5, 6, 7] * 4), run([8, 9] * 4)]
    for row in rows:
        row.final = True
    hooks.count(rows)
    assert hooks.prepare(rows) is None  # nobody mixes: nothing to prepare
    rows[0].mixed = True
    mixing = hooks.prepare(rows)
    assert mixing is not None and rows[0].memory is not None
    assert mixing.keys.shape == (2, hooks.params.capacity)
    np.testing.assert_array_equal(mixing.keys[0], rows[0].memory.keys)
    assert (mixing.keys[1] == adapt.EMPTY).all() and not mixing.weights[1].any()
