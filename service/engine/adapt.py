"""Suggestions that learn the writer: a per-session recency cache mixed into the model's.

A session's cache is a fixed-capacity sparse decayed count of the words it has typed:
`keys (C,) int32` (-1: empty slot) and `weights (C,) float32`. A key is a suggestible
vocabulary id (0..V-1), or `V + j` for slot j of the session's table of typed
out-of-vocabulary words (a list of at most `max_oov` typed forms kept beside the arrays).
The engine holds one row per session and calls these functions once per batch (B rows).

Weights: an occurrence t tokens back weighs `decay**t` (the last token weighs 1). Tokens
that are not remembered (punctuation, `</s>`, specials, blocked words, an `<unk>` without a
typed form) still count as tokens for the decay. The suggestion of a word w is the mixture

    p(w) = (1 - lam) * p_model(w) + lam * p_cache(w),    p_cache(w) = weight(w) / sum(weights)

where a typed out-of-vocabulary word (key V+j) takes, as its model share, the part of
p_model(<unk>) that its weight is of the row's out-of-vocabulary weights. What is shown
sums to at most 1: the model's shares sum to at most its mass on suggestible words plus
`<unk>`, the cache's to 1. A row whose cache is empty answers the model's probabilities,
unmixed: a fresh session answers exactly as without adaptation.

Split invariance: `update` applies a step of n tokens token by token (decay, count the
token, drop what fell below the window), the same operations a run of n one-token steps
applies, so feeding a text in any split at word boundaries leaves the same cache bit for
bit, eviction and window drops included: the result is `weights * decay**n + [decay**(n-1),
..., decay, 1]` either way. The one path-dependent choice is `oov_keys` reusing a slot when
the table of typed words is full (the weights it compares are those before the step).

Against an unbounded cache, the window drops only entries whose every occurrence is more
than `window` tokens back, which would all weigh less than decay**window / (1 - decay)
together; so it moves a word's cache share by less than that over sum(weights), and a
probability by less than `lam` times it. `capacity` bounds the memory (C x 8 bytes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.contract.tokenizer import is_word, normalize
from service.contract.vocab import BLOCKED

EMPTY = -1  # the key of an empty slot, and of a token that is not remembered


@dataclass(frozen=True)
class AdaptParams:
    """Parameters of the cache (tuned per model: `manifest.json` "adaptation" "params")."""

    lam: float  # mixture weight of the cache
    decay: float  # per-token decay of a remembered word's weight (occurrence t back: decay**t)
    window: int  # an entry whose weight falls below decay**window is dropped
    capacity: int  # C: distinct words kept per session (a new word when full evicts the smallest)
    max_oov: int  # M: typed out-of-vocabulary words kept per session

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {self.lam}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if self.window < 1 or self.capacity < 1 or self.max_oov < 0:
            raise ValueError(
                f"window and capacity must be >= 1 and max_oov >= 0, got {self.window}, "
                f"{self.capacity}, {self.max_oov}"
            )

    @property
    def threshold(self) -> float:
        """The weight below which an entry is dropped: decay**window."""
        return float(self.decay**self.window)

    def to_dict(self) -> dict[str, Any]:
        """The parameters as JSON-ready values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdaptParams:
        """Parameters from `to_dict`'s form (every field, no other key)."""
        names = [f.name for f in dataclasses.fields(cls)]
        if set(d) != set(names):
            raise ValueError(f"adaptation params must have exactly {names}, got {sorted(d)}")
        return cls(
            lam=float(d["lam"]),
            decay=float(d["decay"]),
            window=int(d["window"]),
            capacity=int(d["capacity"]),
            max_oov=int(d["max_oov"]),
        )


# What a model without tuned parameters uses: between the bundled models' own (tuned on the
# six NLTK corpora's valid split by model_export/tune_adapt.py: gru 0.05, 0.995, 460, 128,
# 16; lstm 0.05, 0.998, 1151, 256, 64).
DEFAULT_PARAMS = AdaptParams(lam=0.05, decay=0.995, window=919, capacity=256, max_oov=64)


def params_of(manifest: Mapping[str, Any]) -> AdaptParams:
    """An artifact's tuned parameters (manifest "adaptation" "params"), else DEFAULT_PARAMS."""
    params = (manifest.get("adaptation") or {}).get("params")
    return AdaptParams.from_dict(params) if params else DEFAULT_PARAMS


def empty_cache(batch: int, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Empty caches for `batch` rows: keys (B, C) int32 all -1, weights (B, C) float32 zeros."""
    return (
        np.full((batch, capacity), EMPTY, dtype=np.int32),
        np.zeros((batch, capacity), dtype=np.float32),
    )


def _count_token(
    keys: np.ndarray, weights: np.ndarray, token: np.ndarray, decay: np.float32, floor: np.float32
) -> None:
    """One token for every row of (R, C) `keys`/`weights`, in place: decay, count, drop."""
    weights *= decay
    token = token.astype(np.int32)
    rows = np.flatnonzero(token >= 0)
    if len(rows):
        # -2 matches no slot (an empty slot's key is -1).
        match = keys == np.where(token >= 0, token, -2)[:, None]
        found = match.any(1)
        # Not found: the lowest empty slot, else the smallest weight (ties: lowest slot).
        free = np.where(keys < 0, np.float32(-1.0), weights).argmin(1)
        slot = np.where(found, match.argmax(1), free)[rows]
        kept = found[rows]
        weights[rows, slot] = np.where(kept, weights[rows, slot], np.float32(0.0)) + np.float32(1.0)
        keys[rows, slot] = token[rows]
    stale = weights < floor  # empty slots too (weight 0): clearing them again is harmless
    np.copyto(keys, EMPTY, where=stale)
    np.copyto(weights, np.float32(0.0), where=stale)


def update(
    keys: np.ndarray,
    weights: np.ndarray,
    new: np.ndarray,
    lengths: np.ndarray,
    params: AdaptParams,
) -> None:
    """Count each row's new tokens into its cache, in place.

    keys/weights (B, C); new (B, T) int keys of each row's new tokens (-1: not remembered;
    columns past lengths[b] are padding, ignored); lengths (B,). Row b ends with weights
    `w * decay**n + sum over its i-th new token (of n) of decay**(n-1-i)` for that token's
    key, a new key taking an empty slot or evicting the smallest weight (ties: lowest slot),
    and entries below decay**window dropped. Applied token by token (vectorised over the
    rows), so that a step of n tokens is exactly n steps of one.
    """
    lengths = np.asarray(lengths)
    if keys.shape != weights.shape or keys.ndim != 2:
        raise ValueError(f"keys {keys.shape} and weights {weights.shape} must be one (B, C)")
    if new.ndim != 2 or new.shape[0] != keys.shape[0] or lengths.shape != (keys.shape[0],):
        raise ValueError(f"new {new.shape} and lengths {lengths.shape} for {keys.shape[0]} rows")
    steps = int(lengths.max(initial=0))
    if steps > new.shape[1]:
        raise ValueError(f"lengths up to {steps} for {new.shape[1]} columns of new tokens")
    decay = np.float32(params.decay)
    floor = np.float32(params.threshold)
    for t in range(steps):
        if bool((lengths > t).all()):
            _count_token(keys, weights, new[:, t], decay, floor)
            continue
        rows = np.flatnonzero(lengths > t)
        k, w = keys[rows], weights[rows]
        _count_token(k, w, new[rows, t], decay, floor)
        keys[rows], weights[rows] = k, w


def oov_keys(
    table: list[str],
    words: Sequence[str],
    vocab_size: int,
    keys_row: np.ndarray,
    weights_row: np.ndarray,
    params: AdaptParams,
) -> list[int]:
    """Keys (V + slot) of one row's typed out-of-vocabulary words, in order; -1: not kept.

    `table` (the row's typed forms by slot) is updated in place: a word matches a slot by
    normalized form (the display form kept is the latest typed), a new word takes a new
    slot while fewer than `max_oov` are used, else reuses the slot whose cache weight is
    smallest (absent from the cache: 0; ties: lowest slot; never a slot this call gave
    out), whose cache entry is cleared first (`keys_row`/`weights_row`, the row's views
    into the batch's cache, in place). Blocked words and non-words are not kept (-1).

    The weights compared are those before this step's tokens are counted, so when the table
    is full the slot reused can depend on how a text was split (a smaller max_oov than the
    words in the window is the only case).
    """
    table_forms = [normalize(word) for word in table]
    given: set[int] = set()
    out: list[int] = []
    for word in words:
        form = normalize(word)
        if not is_word(form) or form in BLOCKED or params.max_oov == 0:
            out.append(EMPTY)
            continue
        if form in table_forms:
            slot = table_forms.index(form)
        elif len(table) < params.max_oov:
            slot = len(table)
            table.append(word)
            table_forms.append(form)
        else:
            slot_weight = np.zeros(len(table), dtype=np.float64)
            held = keys_row >= vocab_size
            slot_weight[keys_row[held] - vocab_size] = weights_row[held]
            slot_weight[list(given)] = np.inf
            slot = int(slot_weight.argmin())
            if slot in given:  # every slot already given out in this step
                out.append(EMPTY)
                continue
            cleared = keys_row == vocab_size + slot
            keys_row[cleared] = EMPTY
            weights_row[cleared] = 0.0
            table_forms[slot] = form
        table[slot] = word
        given.add(slot)
        out.append(vocab_size + slot)
    return out


def _cache_scores(
    keys: np.ndarray,
    weights: np.ndarray,
    probs_flat: np.ndarray,
    rows: np.ndarray,
    vocab_size: int,
    unk_id: int,
    lam: float,
    at_keys: np.ndarray | None = None,
) -> np.ndarray:
    """The mixture's probability of each cache key of `rows` (R, C) float32.

    `probs_flat` is the batch's (B, V) model distribution flattened; `rows` index into it.
    Or `at_keys` (R, C + 1): the model's probabilities at each row's keys (clipped into the
    vocabulary, `gather_ids`) and at `<unk>`, gathered on the model's device.
    Empty slots get an unspecified value: callers look only at keys >= 0.
    """
    base = (rows.astype(np.int64) * vocab_size)[:, None]
    if at_keys is not None:
        p_model = at_keys[:, :-1]
    else:
        p_model = np.take(probs_flat, base + np.clip(keys, 0, vocab_size - 1))
    total = weights.sum(1, keepdims=True)
    scale = np.float32(lam) / np.maximum(total, np.float32(1e-30))
    oov = keys >= vocab_size
    if oov.any():
        # A typed word's model share: its part of p(<unk>) among the row's typed words.
        oov_total = np.where(oov, weights, np.float32(0.0)).sum(1, keepdims=True)
        p_unk = at_keys[:, -1:] if at_keys is not None else np.take(probs_flat, base + unk_id)
        share = p_unk / np.maximum(oov_total, np.float32(1e-30))
        p_model = np.where(oov, weights * share, p_model)
    return p_model * np.float32(1.0 - lam) + weights * scale


def _shown(keys: np.ndarray, vocab_size: int, suggestible: np.ndarray) -> np.ndarray:
    """Which keys may be shown: typed words, and suggestible vocabulary ids."""
    return (keys >= vocab_size) | ((keys >= 0) & suggestible[np.clip(keys, 0, vocab_size - 1)])


def probability(
    keys: np.ndarray,
    weights: np.ndarray,
    probs: np.ndarray,
    targets: np.ndarray,
    unk_id: int,
    suggestible: np.ndarray,
    lam: float,
) -> np.ndarray:
    """The mixture's probability of one key per row (B,) float32, as `top_k` shows it.

    `targets` (B,): a vocabulary id (punctuation and `</s>` get the model's share only),
    or V + j for a typed out-of-vocabulary word (0 unless the cache holds it). `<unk>` is
    the class of every out-of-vocabulary word: the model's share of it plus the cache's
    weight on typed words, so the mixture sums to 1 over the vocabulary, as the model
    does. A row with an empty cache gives the model's probability, unmixed.
    """
    batch, vocab_size = probs.shape
    rows = np.arange(batch)
    targets = np.asarray(targets, dtype=np.int64)
    in_vocab = targets < vocab_size
    p_model = np.where(in_vocab, probs[rows, np.where(in_vocab, targets, 0)], np.float32(0.0))
    scores = _cache_scores(keys, weights, probs.reshape(-1), rows, vocab_size, unk_id, lam)
    held = (keys == targets[:, None]) & _shown(keys, vocab_size, suggestible)
    from_cache = np.where(held, scores, np.float32(0.0)).max(1)
    mixed = np.where(held.any(1), from_cache, np.float32(1.0 - lam) * p_model)
    total = weights.sum(1)
    typed = np.where(keys >= vocab_size, weights, np.float32(0.0)).sum(1)
    unk_class = np.float32(1.0 - lam) * p_model + np.float32(lam) * typed / np.maximum(
        total, np.float32(1e-30)
    )
    mixed = np.where(targets == unk_id, unk_class, mixed)
    return np.where(total > 0, mixed, p_model).astype(np.float32)


def _best(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of (R, N) candidates, the best k (ids, scores): higher score, then lower id.

    An id may appear twice (a model column and a cache column): its higher score counts.
    Padding has id -1 and a negative score; rows short of k are padded so.
    """
    if ids.shape[1] > 2 * k:  # each id at most twice: the best 2k hold k distinct ids
        part = np.argpartition(-scores, 2 * k - 1, axis=1)[:, : 2 * k]
        ids = np.take_along_axis(ids, part, 1)
        scores = np.take_along_axis(scores, part, 1)
    by_id = np.lexsort((-scores, ids), axis=1)
    ids = np.take_along_axis(ids, by_id, 1)
    scores = np.take_along_axis(scores, by_id, 1)
    repeat = np.zeros(ids.shape, dtype=bool)
    repeat[:, 1:] = ids[:, 1:] == ids[:, :-1]
    scores = np.where(repeat, np.float32(-2.0), scores)
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    ids = np.take_along_axis(ids, order, 1)
    scores = np.take_along_axis(scores, order, 1)
    shown = scores >= 0
    return np.where(shown, ids, EMPTY), np.where(shown, scores, np.float32(0.0))


def _best_mixed(
    keys: np.ndarray,
    weights: np.ndarray,
    probs_flat: np.ndarray,
    rows: np.ndarray,
    topk_ids: np.ndarray,
    topk_probs: np.ndarray,
    vocab_size: int,
    unk_id: int,
    suggestible: np.ndarray,
    k: int,
    lam: float,
    at_keys: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The best k of rows with a cache and no prefix (arrays already restricted to `rows`).

    Candidates: the model's first k (every word the cache lacks that can win is among
    them) and the cache keys whose mixture probability reaches (1 - lam) times the model's
    k-th: the model's first k all reach it, so nothing below it can be among the best k.
    """
    scores = _cache_scores(keys, weights, probs_flat, rows, vocab_size, unk_id, lam, at_keys)
    floor = np.float32(1.0 - lam) * topk_probs[:, k - 1 : k]
    # (np.nonzero of a 2-d mask is ~10x slower than flatnonzero and a division)
    r, c = np.divmod(np.flatnonzero(scores >= floor), scores.shape[1])
    key = keys[r, c]
    ok = _shown(key, vocab_size, suggestible)
    r, c, key = r[ok], c[ok], key[ok]
    counts = np.bincount(r, minlength=len(rows))
    width = k + int(counts.max(initial=0))
    ids = np.full((len(rows), width), EMPTY, dtype=np.int64)
    cand = np.full((len(rows), width), np.float32(-1.0), dtype=np.float32)
    ids[:, :k] = topk_ids[:, :k]
    cand[:, :k] = np.float32(1.0 - lam) * topk_probs[:, :k]
    column = k + np.arange(len(r)) - (np.cumsum(counts) - counts)[r]
    ids[r, column] = key
    cand[r, column] = scores[r, c]
    return _best(ids, cand, k)


def _best_of_prefix(
    keys: np.ndarray,
    weights: np.ndarray,
    probs: np.ndarray,
    row: int,
    unk_id: int,
    suggestible: np.ndarray,
    k: int,
    lam: float,
    candidates: np.ndarray,
    oov_match: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """One row's best k among a prefix's vocabulary ids and the matching typed words."""
    vocab_size = probs.shape[1]
    candidates = np.asarray(candidates, dtype=np.int64)
    scores = _cache_scores(
        keys[None], weights[None], probs.reshape(-1), np.array([row]), vocab_size, unk_id, lam
    )[0]
    cached = (keys >= 0) & (keys < vocab_size) & np.isin(keys, candidates)
    slot = keys.astype(np.int64) - vocab_size
    allowed = np.zeros(len(keys), dtype=bool)
    if oov_match is not None:
        match = np.asarray(oov_match, dtype=bool)
        typed = (slot >= 0) & (slot < len(match))
        allowed[typed] = match[slot[typed]]
    extra = (cached & _shown(keys, vocab_size, suggestible)) | allowed
    rest = candidates[~np.isin(candidates, keys[cached])]
    ids = np.concatenate([rest, keys[extra].astype(np.int64)])
    score = np.concatenate([np.float32(1.0 - lam) * probs[row, rest], scores[extra]])
    if k < len(ids):
        part = np.argpartition(-score, k - 1)[:k]
        ids, score = ids[part], score[part]
    order = np.lexsort((ids, -score))
    return ids[order], score[order]


def _model_of_prefix(
    probs_row: np.ndarray, candidates: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The model's own best k among a prefix's ids (as `runtime.top_words`)."""
    candidates = np.asarray(candidates, dtype=np.int64)
    scores = probs_row[candidates]
    if k < len(candidates):
        best = np.argpartition(-scores, k - 1)[:k]
    else:
        best = np.arange(len(candidates))
    best = best[np.lexsort((candidates[best], -scores[best]))]
    return candidates[best], scores[best]


def gather_ids(keys: np.ndarray, vocab_size: int, unk_id: int) -> np.ndarray:
    """(B, C + 1) int32: where `top_k`'s `at_keys` gathers each row's model probabilities,
    its keys clipped into the vocabulary, then `<unk>`."""
    ids = np.empty((keys.shape[0], keys.shape[1] + 1), dtype=np.int32)
    np.clip(keys, 0, vocab_size - 1, out=ids[:, :-1])
    ids[:, -1] = unk_id
    return ids


def top_k(
    keys: np.ndarray,
    weights: np.ndarray,
    probs: np.ndarray | None,
    topk_ids: np.ndarray,
    topk_probs: np.ndarray,
    unk_id: int,
    suggestible: np.ndarray,
    k: int,
    lam: float,
    candidates: Sequence[np.ndarray | None] | None = None,
    oov_match: Sequence[np.ndarray | None] | None = None,
    at_keys: np.ndarray | None = None,
    probs_index: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Best k (keys, probabilities) per row of the mixture, best first: (B, k) each.

    Keys are vocabulary ids, or V + j for slot j of the row's typed words; a row with
    fewer than k candidates is padded with key -1, probability 0. Ties: higher probability
    first, then lower key (as `service.engine.runtime.top_words`).

    keys/weights (B, C) the caches; probs (B, V) the model's full distribution; topk_ids/
    topk_probs (B, K >= k) the graph's top K over suggestible words, best first. Without a
    prefix a row's candidates are the model's top k united with its cache keys (no other
    word can rank higher). With `candidates[b]` (the vocabulary ids of a prefix, any order)
    row b ranks only those ids and the typed words whose slots `oov_match[b]` (bool over
    the row's table) marks, from the full distribution. A row whose cache is empty gives
    the model's own ranking and probabilities, unmixed.

    Rows without a prefix need only the model's probabilities at their keys: `at_keys`
    (B, C + 1, gathered at `gather_ids`) may stand for `probs`, which may then be None
    unless a row has a prefix, or hold only the rows with a prefix (`probs_index` maps a
    batch row to its row of `probs`; `at_keys` then serves the others).
    """
    batch, vocab_size = keys.shape[0], len(suggestible)
    if probs is None and at_keys is None:
        raise ValueError("top_k needs probs or at_keys")
    if probs_index is not None and at_keys is None:
        raise ValueError("top_k with the distribution of some rows only needs at_keys")
    flat = np.empty(0, dtype=np.float32) if probs is None else probs.reshape(-1)
    if not 1 <= k <= topk_ids.shape[1]:
        raise ValueError(f"k must be in 1..{topk_ids.shape[1]}, got {k}")
    out_ids = np.full((batch, k), EMPTY, dtype=np.int64)
    out_probs = np.zeros((batch, k), dtype=np.float32)
    live = weights.sum(1) > 0
    prefixed = np.zeros(batch, dtype=bool)
    if candidates is not None:
        prefixed[[b for b, c in enumerate(candidates) if c is not None]] = True
    plain = ~prefixed & ~live
    out_ids[plain] = topk_ids[plain, :k]
    out_probs[plain] = topk_probs[plain, :k]
    mixed = np.flatnonzero(~prefixed & live)
    if len(mixed) == batch:  # the common case: no copies of the caches
        out_ids[:], out_probs[:] = _best_mixed(
            keys, weights, flat, mixed, topk_ids, topk_probs,
            vocab_size, unk_id, suggestible, k, lam, at_keys,
        )  # fmt: skip
    elif len(mixed):
        out_ids[mixed], out_probs[mixed] = _best_mixed(
            keys[mixed], weights[mixed], flat, mixed, topk_ids[mixed],
            topk_probs[mixed], vocab_size, unk_id, suggestible, k, lam,
            None if at_keys is None else at_keys[mixed],
        )  # fmt: skip
    for b in map(int, np.flatnonzero(prefixed)):
        assert candidates is not None
        at = b if probs_index is None else int(probs_index[b])
        if probs is None or at < 0:
            raise ValueError("a row with a prefix needs the full distribution")
        prefix = np.asarray(candidates[b], dtype=np.int64)
        if live[b]:
            match = oov_match[b] if oov_match is not None else None
            ids, score = _best_of_prefix(
                keys[b], weights[b], probs, at, unk_id, suggestible, k, lam, prefix, match
            )
        else:
            ids, score = _model_of_prefix(probs[at], prefix, k)
        out_ids[b, : len(ids)] = ids
        out_probs[b, : len(ids)] = score
    return out_ids, out_probs
