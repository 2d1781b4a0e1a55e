"""Adaptation's batch hooks (service/engine/adapt_hooks.py) on hand-made step runs: counting
in chunks gives the memory counting at once gives, and a run mixes in only the memories of
the rows that mix."""

from __future__ import annotations

import numpy as np

from service.engine import adapt
from service.engine.adapt_hooks import Adaptation
from service.engine.runtime import StepOutput
from service.engine.steps import Step, StepRun
from service.store.base import SessionRecord, WordMemory, columns_of

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


def test_an_answer_names_its_typed_words_only_where_its_own_k_shows_one() -> None:
    hooks = adaptation()
    typed = ["Zorblax"]
    # Two sessions that typed the same unknown word (id 1) often, then other words (a word
    # among the last `recent` is never raised): their memories hold it (key V + 0); a
    # third that did not.
    rows = [run([1, 5] * 6 + [6, 7, 8, 9]), run([1, 5] * 6 + [6, 7, 8, 9]), run([5, 6] * 6)]
    for row in rows[:2]:
        row.step.typed = typed * 6
    for row in rows:
        row.final = row.mixed = True
    rows[1].step.k = 1
    hooks.count(rows)
    assert all(r.memory is not None for r in rows)
    assert rows[0].memory.words == rows[1].memory.words == ("Zorblax",)  # type: ignore[union-attr]
    mixing = hooks.prepare(rows)
    assert mixing is not None
    # A flat model but for the unknown word: the typed word takes a share of its mass.
    probs = np.full((3, V), 0.5 / V, dtype=np.float32)
    probs[:, 1] = 0.5
    order = np.argsort(-probs, axis=1, kind="stable")[:, :5]
    output = StepOutput(
        np.take_along_axis(probs, order, 1), order.astype(np.int64), probs, state=()
    )
    hooks.answer(rows, output, mixing)
    for row in rows:
        assert row.answer is not None
        ids = row.answer[0]
        assert len(ids) == row.step.k
        # The flag says exactly whether the row's own answer names an id >= V.
        assert row.typed_answer == bool((ids >= V).any())
    assert rows[0].typed_answer  # the typed word is among the top 5 of its writer
    # The same memory with k = 1: the run ranked the typed word second, past this row's k.
    assert rows[1].answer is not None and len(rows[1].answer[0]) == 1
    assert not rows[1].typed_answer
    assert not rows[2].typed_answer  # never typed it


def test_counting_a_reads_memory_columns_equals_counting_the_memories_one_by_one() -> None:
    hooks = adaptation()
    steps = [Step([5, 6, 7] * 3, session_id="a"), Step([8, 9] * 3, session_id="b")]
    first, _, _ = hooks.count_columns(steps, [None, None], [0, 0], [9, 6], [0, 0], [0, 0])
    # As a store read gives them: rows of one pair of read-only (B, C) columns.
    keys = np.stack([m.keys for m in first])
    weights = np.stack([m.weights for m in first])
    keys.flags.writeable = weights.flags.writeable = False
    read = WordMemory.rows(keys, weights, [m.words for m in first])
    alone = [WordMemory(m.keys.copy(), m.weights.copy(), m.words) for m in first]
    more = [Step([7, 10], session_id="a"), Step([11, 8], session_id="b")]
    outs = [
        hooks.count_columns(more, memories, [0, 0], [2, 2], [7, 9], [0, 0])
        for memories in (read, alone)
    ]
    (by_columns, live, stacked), (by_rows, live_alone, _) = outs
    assert live == live_alone
    for a, b in zip(by_columns, by_rows):
        np.testing.assert_array_equal(a.keys, b.keys)
        np.testing.assert_array_equal(a.weights, b.weights)
    # The read's columns are left as they were; the memories after are the new columns.
    np.testing.assert_array_equal(keys, np.stack([m.keys for m in first]))
    columns = columns_of(by_columns)
    assert columns is not None and columns.keys is stacked[0] and stacked[0] is not keys
    assert 10 in by_columns[0].keys.tolist() and 11 in by_columns[1].keys.tolist()


def test_a_memory_stored_under_the_old_capacity_is_kept_in_the_new_one() -> None:
    hooks = adaptation()  # 512 slots, recency marks and pairs
    old = adapt.AdaptParams(lam=0.05, decay=0.998, window=1151, capacity=256, max_oov=64)
    keys, weights = adapt.empty_cache(1, old.capacity)
    text = np.array([5, 6, 7, 5, 8, 9, 5, 12] * 3, dtype=np.int64)  # past the warm-up
    adapt.count(keys, weights, text, np.array([len(text)]), old, hooks.suggestible)
    stored = WordMemory(keys[0].copy(), weights[0].copy(), ("Okonkwo",))
    record = SessionRecord("s", "m", (), len(text), 0.0, 0.0, 3, last_token=12, memory=stored)
    memory = hooks.memory_of(Step([13], session_id="s"), record)
    assert memory is not None and len(memory.keys) == hooks.params.capacity
    assert memory.words == ("Okonkwo",)
    layout = adapt.Layout.of(V, hooks.params)
    recent = hooks.params.recent
    assert memory.keys[0] == layout.words + 12  # the last token is marked recent
    assert (memory.keys[1:recent] == adapt.EMPTY).all()
    held = stored.keys != adapt.EMPTY
    np.testing.assert_array_equal(memory.keys[recent : recent + held.sum()], stored.keys[held])
    np.testing.assert_array_equal(
        memory.weights[recent : recent + held.sum()], stored.weights[held]
    )
    assert (memory.keys[recent + held.sum() :] == adapt.EMPTY).all()
    # It counts on from there as any memory of this capacity does.
    after, live, _ = hooks.count_columns(
        [Step([13], session_id="s")], [memory], [0], [1], [12], [0]
    )
    assert live == [True] and 13 in after[0].keys.tolist() and 5 in after[0].keys.tolist()
    # A memory that is not plain words (a pair, a mark) is not kept: an empty one starts.
    pair = stored.keys.copy()
    pair[held.sum()] = 2 * layout.words + 5 * layout.words + 6
    odd = SessionRecord("s", "m", (), 1, 0.0, 0.0, 3, memory=WordMemory(pair, stored.weights))
    assert hooks.memory_of(Step([13], session_id="s"), odd) is None


def test_a_run_mixes_in_its_memories_active_width_with_the_answers_of_every_slot(
    monkeypatch,
) -> None:
    hooks = adaptation()
    rng = np.random.default_rng(3)
    rows = [run(rng.integers(2, V, size=n).tolist()) for n in (40, 12, 25)]
    for row in rows:
        row.final = row.mixed = True
    hooks.count(rows)
    mixing = hooks.prepare(rows)
    assert mixing is not None
    # The longest memory's last held slot ends the width; every slot past it is empty.
    held = [int(np.flatnonzero(r.memory.keys != adapt.EMPTY)[-1]) for r in rows]  # type: ignore[union-attr]
    assert mixing.width == max(held) + 1 < hooks.params.capacity
    keys, weights = mixing.used
    assert keys.shape == (3, mixing.width) and (mixing.keys[:, mixing.width :] == -1).all()
    assert hooks.gather_ids(mixing).shape == (3, mixing.width + 1)
    logits = rng.normal(0, 2.0, size=(3, V))
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :5]
    topk = np.take_along_axis(probs, order, 1)

    def answers(mixing) -> list:
        gathered = np.take_along_axis(probs, hooks.gather_ids(mixing).astype(np.int64), 1)
        output = StepOutput(topk, order.astype(np.int64), None, (), gathered)
        hooks.answer(rows, output, mixing)
        return [r.answer for r in rows]

    narrow = answers(mixing)
    monkeypatch.setattr(adapt, "active_width", lambda keys: keys.shape[1])
    wide = hooks.prepare(rows)
    assert wide is not None and wide.width == hooks.params.capacity
    for (a_ids, a_probs), (b_ids, b_probs) in zip(narrow, answers(wide)):
        np.testing.assert_array_equal(a_ids, b_ids)
        np.testing.assert_allclose(a_probs, b_probs, rtol=1e-6)
