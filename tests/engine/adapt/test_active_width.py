"""Counting and mixing read only a memory's active width (`adapt.active_width`): the same
memories (bit for bit) and the same answers (to float32 rounding) as over all C slots, for
young memories (an empty tail) and for memories that fill, evict and drop."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine import adapt
from service.engine.adapt import AdaptParams

V = 40  # 0..2 specials, 3..39 words
UNK = 1
SUGGESTIBLE = np.arange(V) >= 3
PARAMS = AdaptParams(
    lam=0.2, decay=0.9, window=30, capacity=48, max_oov=0, recent=2, lam_bigram=0.2
)


def test_active_width_is_one_past_the_last_column_any_row_holds() -> None:
    keys, _ = adapt.empty_cache(3, 300)
    assert adapt.active_width(keys) == 0
    keys[1, 0] = 7
    assert adapt.active_width(keys) == 1
    keys[2, 137] = 0  # key 0 is held (only -1 is empty)
    assert adapt.active_width(keys) == 138
    keys[0, 299] = 5
    assert adapt.active_width(keys) == 300
    assert adapt.active_width(keys[:, :0]) == 0


def _step(keys, weights, tokens, lengths, before) -> None:
    new = np.where(SUGGESTIBLE[tokens], tokens, adapt.EMPTY).astype(np.int32)
    adapt.update(keys, weights, new, lengths, PARAMS, V, tokens, before)


def _memories(rng, rows: int, steps: int, full: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each step's (keys, weights) after it, from a batch fed steps of 1-3 tokens a row
    (a row's padding past its length), counted over all C slots (`full`) or its width."""
    keys, weights = adapt.empty_cache(rows, PARAMS.capacity)
    before = np.full(rows, 0, dtype=np.int64)
    out = []
    for _ in range(steps):
        lengths = rng.integers(0, 4, size=rows)
        tokens = rng.integers(0, V, size=(rows, 3))
        if full:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(adapt, "active_width", lambda k: k.shape[1])
                _step(keys, weights, tokens, lengths, before)
        else:
            _step(keys, weights, tokens, lengths, before)
        last = np.maximum(lengths - 1, 0)
        before = np.where(lengths > 0, tokens[np.arange(rows), last], before)
        out.append((keys.copy(), weights.copy()))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counting_within_the_width_leaves_the_memory_of_counting_over_every_slot(seed) -> None:
    narrow = _memories(np.random.default_rng(seed), 6, 60, full=False)
    wide = _memories(np.random.default_rng(seed), 6, 60, full=True)
    widths = [adapt.active_width(k) for k, _ in narrow]
    assert min(widths) < PARAMS.capacity == max(widths)  # young memories, then full ones
    for (k1, w1), (k2, w2) in zip(narrow, wide):
        np.testing.assert_array_equal(k1, k2)
        np.testing.assert_array_equal(w1, w2)  # bit for bit


@pytest.mark.parametrize("seed", [0, 1])
def test_mixing_within_the_width_gives_the_answers_of_every_slot(seed) -> None:
    rng = np.random.default_rng(seed)
    for keys, weights in _memories(rng, 6, 25, full=False):
        logits = rng.normal(0, 2.5, size=(6, V))
        probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
        masked = np.where(SUGGESTIBLE, probs, -1.0)
        topk_ids = np.argsort(-masked, axis=1, kind="stable")[:, :8]
        topk_probs = np.take_along_axis(probs, topk_ids, 1)
        last = rng.integers(0, V, size=6)
        gather = adapt.gather_ids(keys, V, UNK)
        at_keys = np.take_along_axis(probs, gather.astype(np.int64), 1)
        width = adapt.active_width(keys)

        def answers(k, w, at, topk_ids=topk_ids, topk_probs=topk_probs, last=last):
            return adapt.top_k(
                k, w, None, topk_ids, topk_probs, UNK, SUGGESTIBLE, 5, PARAMS.lam,
                at_keys=at, params=PARAMS, last=last,
            )  # fmt: skip

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(adapt, "active_width", lambda k: k.shape[1])
            want = answers(keys, weights, at_keys)
        # The whole memory (narrowed inside), and the engine's way: only its used columns.
        used = np.concatenate([at_keys[:, :width], at_keys[:, -1:]], axis=1)
        for got in (
            answers(keys, weights, at_keys),
            answers(keys[:, :width], weights[:, :width], used),
        ):
            np.testing.assert_array_equal(got[0], want[0])
            # (a row's sum over fewer slots may round differently in its last bit)
            np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
        on = adapt.live(keys, weights, V, PARAMS)
        np.testing.assert_array_equal(
            on, adapt.live(keys[:, :width], weights[:, :width], V, PARAMS)
        )
