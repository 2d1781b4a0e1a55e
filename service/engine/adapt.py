"""Suggestions that learn the writer: a per-session recency cache mixed into the model's.

A session's cache is a fixed-capacity sparse decayed count of the words it has typed:
`keys (C,) int32` (-1: empty slot) and `weights (C,) float32`. A key is a suggestible
vocabulary id (0..V-1), or `V + j` for slot j of the session's table of typed
out-of-vocabulary words (a list of at most `max_oov` typed forms kept beside the arrays).
An empty slot weighs 0 and a held one more (every function here keeps it so). The engine
holds one row per session and calls these functions once per batch (B rows): `update`
(or `count`, the same from flat tokens) after each step's tokens, `live`, `gather_ids`
for the graph, then `top_k`. A batch is 256 rows of 512 slots: each pass over (B, C) costs,
so the sparse parts (typed words, the pairs after the last word, the candidates' recency)
are worked on at their slots only (a row's sum of them in float64, rounded once), and every
pass reads only the batch's active width (`active_width`: a young memory's entries sit in
its first columns, the rest empty).

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
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.contract.tokenizer import is_word, normalize
from service.contract.vocab import BLOCKED

EMPTY = -1  # the key of an empty slot, and of a token that is not remembered
_CHUNK = 1 << 18  # values a temporary of the key comparisons holds at most
_NARROW = int(np.iinfo(np.int16).max)  # word keys up to this are compared as int16


@dataclass(frozen=True)
class AdaptParams:
    """Parameters of the cache (tuned per model: `manifest.json` "adaptation" "params").

    The last four have neutral defaults (the cache as it was before them), so that a
    manifest written before them still loads; `DEFAULT_PARAMS` and the bundled models set
    them."""

    lam: float  # mixture weight of the cache
    decay: float  # per-token decay of a remembered word's weight (occurrence t back: decay**t)
    window: int  # an entry whose weight falls below decay**window is dropped
    capacity: int  # C: entries kept per session (a new one when full evicts the smallest)
    max_oov: int  # M: typed out-of-vocabulary words kept per session
    # Mixing starts once the memory's word weight exceeds `warmup` and reaches its full
    # weight at twice that (0: at once).
    warmup: float = 0.0
    # The words of the last `recent` tokens are never raised by the memory (no echo).
    recent: int = 0
    # The part of p(<unk>) a typed out-of-vocabulary word may take as its model share.
    oov_share: float = 1.0
    # Mixture weight of the writer's own "last word -> next word" counts (0: none kept).
    lam_bigram: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0 or not 0.0 <= self.lam_bigram <= 1.0 - self.lam:
            raise ValueError(
                f"lam and lam_bigram must be in [0, 1] with a sum <= 1, got {self.lam}, "
                f"{self.lam_bigram}"
            )
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if self.window < 1 or self.capacity < 1 or self.max_oov < 0:
            raise ValueError(
                f"window and capacity must be >= 1 and max_oov >= 0, got {self.window}, "
                f"{self.capacity}, {self.max_oov}"
            )
        if self.recent >= self.capacity:
            raise ValueError(f"recent ({self.recent}) must be less than capacity ({self.capacity})")
        if self.warmup < 0 or self.recent < 0 or not 0.0 <= self.oov_share <= 1.0:
            raise ValueError(
                f"warmup and recent must be >= 0 and oov_share in [0, 1], got {self.warmup}, "
                f"{self.recent}, {self.oov_share}"
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
        """Parameters from `to_dict`'s form (the first five fields required, no other key)."""
        names = [f.name for f in dataclasses.fields(cls)]
        required = names[:5]
        if not set(required) <= set(d) <= set(names):
            raise ValueError(
                f"adaptation params must have {required} and may have {names[5:]}, got {sorted(d)}"
            )
        defaults = cls(1.0, 1.0, 1, 1, 0)
        get = lambda name: d.get(name, getattr(defaults, name))  # noqa: E731
        return cls(
            lam=float(d["lam"]),
            decay=float(d["decay"]),
            window=int(d["window"]),
            capacity=int(d["capacity"]),
            max_oov=int(d["max_oov"]),
            warmup=float(get("warmup")),
            recent=int(get("recent")),
            oov_share=float(get("oov_share")),
            lam_bigram=float(get("lam_bigram")),
        )


@dataclass(frozen=True)
class Layout:
    """How a row's keys split into kinds, for a vocabulary of V words and M typed words
    (W = V + M word keys):

    - a word: a vocabulary id `k < V`, or `V + j` for typed word j (`k < W`);
    - a recency mark of word k: `W + k`, in one of the first `recent` slots (weight 0):
      the word is among the last `recent` tokens typed;
    - a bigram: `2W + prev * W + k`, the writer typed word k after the token `prev` (a
      vocabulary id, `<unk>` for every word outside it).
    """

    vocab_size: int
    words: int  # W
    recent: bool
    bigrams: bool

    @classmethod
    def of(cls, vocab_size: int, params: AdaptParams) -> Layout:
        """The layout of a model's caches (bigrams off where their keys would overflow int32)."""
        return _layout(vocab_size, params)

    def word_keys(self, keys: np.ndarray) -> np.ndarray:
        """Which keys are words (vocabulary ids or typed words)."""
        keys = np.asarray(keys)
        if keys.dtype.kind == "i":
            return _unsigned(keys) < self.words  # one pass: -1 reads as 2**32 - 1
        return (keys >= 0) & (keys < self.words)


@functools.lru_cache(maxsize=64)
def _layout(vocab_size: int, params: AdaptParams) -> Layout:
    """`Layout.of`, kept per (vocabulary size, parameters): every call of the mixing asks."""
    words = vocab_size + params.max_oov
    fits = 2 * words + vocab_size * words < np.iinfo(np.int32).max
    recent, bigrams = params.recent > 0, params.lam_bigram > 0 and fits
    if not (recent or bigrams):  # every key is a word (a cache counted without them)
        words = int(np.iinfo(np.int32).max)
    return Layout(vocab_size, words, recent, bigrams)


# What a model without tuned parameters uses: near the bundled models' own (tuned on
# WikiText-2 valid by article: see their manifests' "adaptation" "tuning").
DEFAULT_PARAMS = AdaptParams(
    lam=0.1,
    decay=0.995,
    window=919,
    capacity=512,
    max_oov=64,
    warmup=10.0,
    recent=3,
    oov_share=0.1,
    lam_bigram=0.2,
)


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


def active_width(keys: np.ndarray) -> int:
    """How many leading columns of (B, C) `keys` hold every row's keys: past it every slot
    of every row is empty (0: none held).

    A key takes the lowest empty slot (`_insert`), so a young memory holds its entries in
    its first columns and the rest of its C slots are empty: the passes of counting and
    mixing need only these columns. Found from the last column back, in blocks that double
    (a full memory answers at its first block; an empty tail is read once or twice)."""
    hi = keys.shape[1]
    block = 16
    while hi > 0:
        lo = max(0, hi - block)
        part = keys[:, lo:hi]
        if part.size and int(part.max()) > EMPTY:
            held = np.flatnonzero(part.max(0) > EMPTY)
            return lo + int(held[-1]) + 1
        hi, block = lo, 2 * block
    return 0


def _insert(keys: np.ndarray, weights: np.ndarray, key: np.ndarray) -> None:
    """Count one key per row of (R, C) `keys`/`weights` (key -1: none), in place: a held key
    gains 1, a new one takes the lowest empty slot, else the smallest weight (ties: lowest
    slot).

    An empty slot weighs 0 (every function here keeps it so) and a held one weighs more
    unless it decayed to 0, so the first slot of least weight is the slot wanted; a row
    where it holds a key at weight 0 looks again, as the rule says."""
    counted = key >= 0
    rows = np.flatnonzero(counted)
    if not len(rows):
        return
    # -2 matches no slot (an empty slot's key is -1).
    match = keys == np.where(counted, key, -2)[:, None]
    slot = match.argmax(1)
    found = match[np.arange(len(keys)), slot]
    new = np.flatnonzero(counted & ~found)
    if len(new):
        free = weights[new].argmin(1) if len(new) < len(keys) // 4 else weights.argmin(1)[new]
        odd = np.flatnonzero((weights[new, free] == 0) & (keys[new, free] >= 0))
        if len(odd):
            held = keys[new[odd]] >= 0
            free[odd] = np.where(held, weights[new[odd]], np.float32(-1.0)).argmin(1)
        slot[new] = free
    slot, kept = slot[rows], found[rows]
    weights[rows, slot] = np.where(kept, weights[rows, slot], np.float32(0.0)) + np.float32(1.0)
    keys[rows, slot] = key[rows]


def _count_token(
    keys: np.ndarray,
    weights: np.ndarray,
    token: np.ndarray,
    params: AdaptParams,
    layout: Layout | None,
    prev: np.ndarray | None,
) -> None:
    """One token for every row of (R, C) `keys`/`weights`, in place: decay, count its word
    (and, with a layout, its recency mark and its bigram after `prev`, the raw id of the
    token before it, -1: none), drop what fell below the window.

    The recency marks of the last `recent` tokens hold the first `recent` slots, newest
    first (weight 0): a token shifts them by one, so the oldest falls out, and the other
    slots never hold one (no search, no eviction)."""
    token = token.astype(np.int32)
    if layout is not None and layout.recent:
        marks = params.recent
        keys[:, 1:marks] = keys[:, : marks - 1]
        keys[:, 0] = np.where(token >= 0, token + layout.words, EMPTY)
        keys, weights = keys[:, marks:], weights[:, marks:]  # views: the counted slots
    weights *= np.float32(params.decay)
    _insert(keys, weights, token)
    if layout is not None and layout.bigrams and prev is not None:
        w = np.int64(layout.words)
        pair = 2 * w + prev.astype(np.int64) * w + token
        _insert(keys, weights, np.where((token >= 0) & (prev >= 0), pair, EMPTY).astype(np.int32))
    # Few entries fall out a token: they are cleared at their slots (a masked write over
    # every slot costs tens of times more where the cache has empty slots).
    # Within the active width (`update`) most slots are held: the slots below the window
    # are found by weight alone, and the empty ones among them left out at their slots.
    r, c = np.divmod(np.flatnonzero(weights < np.float32(params.threshold)), keys.shape[1])
    held = keys[r, c] != EMPTY
    r, c = r[held], c[held]
    keys[r, c] = EMPTY
    weights[r, c] = np.float32(0.0)


def update(
    keys: np.ndarray,
    weights: np.ndarray,
    new: np.ndarray,
    lengths: np.ndarray,
    params: AdaptParams,
    vocab_size: int = 0,
    ids: np.ndarray | None = None,
    before: np.ndarray | None = None,
) -> None:
    """Count each row's new tokens into its cache, in place.

    keys/weights (B, C); new (B, T) int keys of each row's new tokens (-1: not remembered;
    columns past lengths[b] are padding, ignored); lengths (B,). Row b ends with weights
    `w * decay**n + sum over its i-th new token (of n) of decay**(n-1-i)` for that token's
    key, a new key taking an empty slot or evicting the smallest weight (ties: lowest slot),
    and entries below decay**window dropped. Applied token by token (vectorised over the
    rows), so that a step of n tokens is exactly n steps of one.

    With recency marks or bigrams (`params.recent`, `params.lam_bigram`) the `Layout` needs
    `vocab_size`, and bigrams the raw token ids: `ids` (B, T) aligned with `new`, and
    `before` (B,) the id of the token before each row's first new one (-1: none), so that
    a text split anywhere counts the same pairs.
    """
    lengths = np.asarray(lengths)
    if keys.shape != weights.shape or keys.ndim != 2:
        raise ValueError(f"keys {keys.shape} and weights {weights.shape} must be one (B, C)")
    if new.ndim != 2 or new.shape[0] != keys.shape[0] or lengths.shape != (keys.shape[0],):
        raise ValueError(f"new {new.shape} and lengths {lengths.shape} for {keys.shape[0]} rows")
    steps = int(lengths.max(initial=0))
    if steps > new.shape[1]:
        raise ValueError(f"lengths up to {steps} for {new.shape[1]} columns of new tokens")
    layout = None
    if params.recent or params.lam_bigram:
        if vocab_size <= 0:
            raise ValueError("recency marks and bigrams need the vocabulary's size")
        layout = Layout.of(vocab_size, params)
        if layout.bigrams and (ids is None or before is None):
            raise ValueError("bigrams need the tokens' ids and the id before them")
    # Only the columns the memories use, and the slots this step's keys may take (a word
    # and a pair a token): every slot past them is empty in every row, so a new key finds
    # the same lowest empty slot within them, an eviction (no empty slot) only happens
    # where they are all C, and decay and drops leave an empty slot as it is. The same
    # operations on the same values: the memory ends bit for bit as over all C.
    width = min(keys.shape[1], max(active_width(keys), params.recent) + 2 * steps)
    if width < keys.shape[1]:
        keys, weights = keys[:, :width], weights[:, :width]  # views: written in place
    for t in range(steps):
        prev = None
        if layout is not None and layout.bigrams:
            assert ids is not None and before is not None
            prev = np.asarray(before) if t == 0 else ids[:, t - 1]
        if bool((lengths > t).all()):
            _count_token(keys, weights, new[:, t], params, layout, prev)
            continue
        rows = np.flatnonzero(lengths > t)
        k, w = keys[rows], weights[rows]
        _count_token(k, w, new[rows, t], params, layout, None if prev is None else prev[rows])
        keys[rows], weights[rows] = k, w


def count(
    keys: np.ndarray,
    weights: np.ndarray,
    ids: np.ndarray,
    lengths: np.ndarray,
    params: AdaptParams,
    suggestible: np.ndarray,
    before: np.ndarray | None = None,
    remembered: np.ndarray | None = None,
) -> None:
    """`update` for a batch whose new tokens come flat, as an engine holds them: `ids` (N,)
    the rows' new token ids one row after another, `lengths` (B,) how many each row has
    (sum N), `before` (B,) the id before each row's first (-1: none; needed with bigrams).

    `remembered` (N,) the key each token counts as (default: its id where suggestible,
    else -1); a caller sets a typed out-of-vocabulary word's key (`oov_keys`) there. The
    memory ends as `update` leaves it given the same tokens padded by row."""
    ids = np.asarray(ids, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if ids.ndim != 1 or int(lengths.sum()) != len(ids) or (lengths < 0).any():
        raise ValueError(f"{len(ids)} flat tokens for lengths summing to {int(lengths.sum())}")
    if remembered is None:
        remembered = np.where(suggestible[ids], ids, EMPTY)
    elif np.shape(remembered) != ids.shape:
        raise ValueError(f"remembered {np.shape(remembered)} for {len(ids)} tokens")
    rows = len(lengths)
    if before is None:
        before = np.full(rows, EMPTY, dtype=np.int64)
    width = max(1, int(lengths.max(initial=0)))
    if bool((lengths == width).all()):  # the common step: as many tokens a row, no padding
        new = np.asarray(remembered, dtype=np.int32).reshape(rows, width)
        raw = ids.reshape(rows, width)
    else:
        new = np.full((rows, width), EMPTY, dtype=np.int32)
        raw = np.full((rows, width), EMPTY, dtype=np.int64)
        row_of = np.repeat(np.arange(rows), lengths)
        column = np.arange(len(ids)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        new[row_of, column] = remembered
        raw[row_of, column] = ids
    update(keys, weights, new, lengths, params, len(suggestible), raw, np.asarray(before))


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
    out), whose cache entries (the word, its recency mark, its bigrams) are cleared first
    (`keys_row`/`weights_row`, the row's views into the batch's cache, in place). Blocked
    words and non-words are not kept (-1).

    The weights compared are those before this step's tokens are counted, so when the table
    is full the slot reused can depend on how a text was split (a smaller max_oov than the
    words in the window is the only case).
    """
    layout = Layout.of(vocab_size, params)
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
            held = (keys_row >= vocab_size) & (keys_row < layout.words)
            slot_weight[keys_row[held] - vocab_size] = weights_row[held]
            slot_weight[list(given)] = np.inf
            slot = int(slot_weight.argmin())
            if slot in given:  # every slot already given out in this step
                out.append(EMPTY)
                continue
            key = vocab_size + slot
            cleared = keys_row == key
            if layout.recent:
                cleared |= keys_row == layout.words + key
            if layout.bigrams:
                pairs = keys_row >= 2 * layout.words
                cleared |= pairs & (
                    (keys_row.astype(np.int64) - 2 * layout.words) % layout.words == key
                )
            keys_row[cleared] = EMPTY
            weights_row[cleared] = 0.0
            table_forms[slot] = form
        table[slot] = word
        given.add(slot)
        out.append(vocab_size + slot)
    return out


@dataclass(frozen=True)
class _Held:
    """A batch's word slots (R, C): which slots hold words, their weights (0 elsewhere) and
    each row's sum of them (R, 1). Every mixing step starts from these, so they are taken
    once per call."""

    words: np.ndarray
    weights: np.ndarray
    total: np.ndarray

    @classmethod
    def of(cls, keys: np.ndarray, weights: np.ndarray, layout: Layout) -> _Held:
        """The word slots of `keys`/`weights` under `layout`."""
        words = layout.word_keys(keys)
        w_words = weights * words  # (np.where is ~10x slower; weights are finite, >= 0)
        return cls(words, w_words, w_words.sum(1, keepdims=True))

    def rows(self, index: np.ndarray) -> _Held:
        """The same for some rows."""
        return _Held(self.words[index], self.weights[index], self.total[index])


@dataclass(frozen=True)
class _Scores:
    """A batch's mixture at its cache slots (R, C), from `_scores` (no recency, no masks
    beyond what the scores need)."""

    scores: np.ndarray  # each word slot's probability in the mixture (other slots: unspecified)
    base: np.ndarray  # its model part alone: model * its share of the model
    model: np.ndarray  # (R, 1) the model's weight: what a word the cache does not hold gets
    oov: np.ndarray  # which slots hold typed out-of-vocabulary words


@dataclass(frozen=True)
class _Mixture:
    """A batch's mixture at its cache slots (R, C), from `_mix`."""

    scores: np.ndarray  # each word slot's probability in the mixture (other slots: unspecified)
    base: np.ndarray  # its model part alone: model * its share of the model
    model: np.ndarray  # (R, 1) the model's weight: what a word the cache does not hold gets
    shown: np.ndarray  # which slots may be suggested: words, suggestible, not recent
    recent: np.ndarray  # which word slots were typed among the last `recent` tokens


def _ramp(
    weights: np.ndarray,
    keys: np.ndarray,
    layout: Layout,
    params: AdaptParams,
    total: np.ndarray | None = None,
) -> np.ndarray:
    """(R, 1) how much of its weights the memory of each row gets: 0 until its words weigh
    `warmup`, growing to 1 at twice that (`total`: the words' weight, when known)."""
    if total is None:
        total = _Held.of(keys, weights, layout).total
    if params.warmup <= 0:
        return (total > 0).astype(np.float32)
    ramp = (total - np.float32(params.warmup)) / np.float32(params.warmup)
    return np.minimum(np.maximum(ramp, np.float32(0.0)), np.float32(1.0))  # (np.clip's cost)


def _params(lam: float, params: AdaptParams | None) -> AdaptParams:
    """The parameters a mixing call uses: `params`, or only a weight (the cache before
    warm-up, recency, shares and bigrams)."""
    return params if params is not None else AdaptParams(lam, 1.0, 1, 1, 0)


def _pairs_after(
    keys: np.ndarray, last: np.ndarray, layout: Layout
) -> tuple[np.ndarray, np.ndarray]:
    """Each slot's key less the first pair key after its row's `last` token ((R, C), any
    signed int), and the slots that hold such a pair (the difference in [0, W): the word
    that followed). A row whose `last` is negative holds none."""
    width = layout.words
    last = np.asarray(last, dtype=np.int64)
    # A pair after `last` is a key in [2W + last W, 2W + (last + 1) W); -(W + 1) places a
    # row without a last token where no key (>= -1) falls.
    lo = np.where(last >= 0, 2 * np.int64(width) + last * width, -np.int64(width) - 1)
    # Every key is below `top` (`Layout.of`); when the differences fit int32, they are
    # taken in it (half the bytes of int64).
    top = 2 * width + layout.vocab_size * width
    shifted: np.ndarray
    int32 = np.iinfo(np.int32).max
    if keys.dtype == np.int32 and top + width < int32 and lo.max(initial=0) + width < int32:
        shifted = keys - lo.astype(np.int32)[:, None]
    else:
        shifted = keys.astype(np.int64) - lo[:, None]
    return shifted, _unsigned(shifted) < width


def _unsigned(keys: np.ndarray) -> np.ndarray:
    """Signed integer keys read as unsigned (a view): a negative key reads above every
    key >= 0, so that `0 <= key < n` is one comparison."""
    return keys.view(keys.dtype.str.replace("i", "u"))


def _slots_of(keys: np.ndarray, rows: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The slot of each `key` in its row `rows` of `keys` (R, C), and whether it is held
    there: one comparison of the row's C keys a key, `_CHUNK` values at a time (a join by
    sorted codes searches every slot instead, ~3x slower at a few keys a row)."""
    slot = np.zeros(len(rows), dtype=np.int64)
    hit = np.zeros(len(rows), dtype=bool)
    step = max(1, _CHUNK // max(1, keys.shape[1]))
    for a in range(0, len(rows), step):
        match = keys[rows[a : a + step]] == key[a : a + step, None]
        at = match.argmax(1)
        slot[a : a + step] = at
        hit[a : a + step] = match[np.arange(len(at)), at]
    return slot, hit


def _scores(
    keys: np.ndarray,
    weights: np.ndarray,
    p_model: np.ndarray,
    p_unk: np.ndarray,
    last: np.ndarray | None,
    vocab_size: int,
    params: AdaptParams,
    layout: Layout,
    held: _Held,
) -> _Scores:
    """The mixture of rows (R, C) given the model's probabilities at each slot's key
    (`p_model`, clipped into the vocabulary) and of `<unk>` (`p_unk` (R, 1)), each row's
    last token (`last` (R,), for its bigrams) and its word slots (`held`).

        p(w) = (1 - lu - lb) p_model(w) + lu p_words(w) + lb p_bigram(w | last)

    lu = lam * ramp, lb = lam_bigram * ramp * n / (n + 1) with n the row's weight of pairs
    after `last` (no pair: the model keeps that weight); a typed word's model share is
    `oov_share` of p(<unk>), split by weight among the typed words; a pair counts for a word
    the memory still holds.

    Every (R, C) pass counts here (a batch of 256 rows of 512 slots is 131,072 values a
    pass), so what is sparse (typed words, the pairs after `last`) is worked on at its
    slots only: the same float32 operations as over the whole array, but for a row's sums
    of them (float64, rounded once to float32: the same to float32 rounding)."""
    columns = keys.shape[1]
    ramp = _ramp(weights, keys, layout, params, held.total)
    lu = np.float32(params.lam) * ramp
    oov = held.words & (keys >= vocab_size)
    typed = None  # the typed words' slots and model shares: their part of p(<unk>)
    at = np.flatnonzero(oov)
    if len(at):
        r, c = np.divmod(at, columns)
        # (a sum of the few typed words' weights, at their slots: not a pass over (R, C))
        oov_total = np.bincount(r, weights[r, c], len(keys)).astype(np.float32)[:, None]
        share = p_unk * np.float32(params.oov_share) / np.maximum(oov_total, np.float32(1e-30))
        typed = (r, c, weights[r, c] * share[r, 0])
    lb = np.zeros_like(lu)
    bigram = None
    if layout.bigrams and last is not None:
        shifted, pairs = _pairs_after(keys, last, layout)
        at = np.flatnonzero(pairs)
        if len(at):
            r, c = np.divmod(at, columns)
            pair_weight = weights[r, c]
            n = np.bincount(r, pair_weight, len(keys)).astype(np.float32)[:, None]
            lb = np.float32(params.lam_bigram) * ramp * n / (n + np.float32(1.0))
            bigram = (r, shifted[r, c], pair_weight, n)
    model = np.float32(1.0) - lu - lb
    base = model * p_model  # each slot's model part: model * its share of the model
    if typed is not None:
        r, c, p_share = typed
        # (the dtypes alone: `model * p_share` would broadcast to (R, typed words))
        base = base.astype(np.result_type(base, model.dtype, p_share.dtype), copy=False)
        base[r, c] = model[r, 0] * p_share
    # base + lu * weight / total, in place (a (R, C) temporary less; the same roundings)
    scores = lu * held.weights
    scores /= np.maximum(held.total, np.float32(1e-30))
    scores = np.add(scores, base, out=scores if scores.dtype == base.dtype else None)
    if bigram is not None:
        r, nxt, pair_weight, n = bigram
        part = lb[r, 0] * pair_weight / np.maximum(n[r, 0], np.float32(1e-30))
        # Each pair names a word the row may hold: its slot is found by comparing the
        # row's keys (a row's pairs after `last` name distinct words; a few a row), as
        # int16 where every word fits (half the bytes to copy and compare; a key that is
        # no word reads as W, which no word is).
        if layout.words <= _NARROW:
            narrow = np.minimum(_unsigned(keys), layout.words).astype(np.int16)
            slot, hit = _slots_of(narrow, r, nxt.astype(np.int16))
        else:
            slot, hit = _slots_of(keys, r, nxt)
        scores[r[hit], slot[hit]] += part[hit]
    return _Scores(scores, base, model, oov)


def _recent_at(
    keys: np.ndarray, rows: np.ndarray, key: np.ndarray, layout: Layout, params: AdaptParams
) -> np.ndarray:
    """Whether each word `key` (of row `rows`) was among that row's last `recent` tokens:
    their marks hold the first `recent` slots (`_count_token`), -1 where none."""
    if not layout.recent:
        return np.zeros(len(key), dtype=bool)
    marks = keys[rows, : params.recent].astype(np.int64) - layout.words
    return ((marks == key[:, None]) & (marks >= 0)).any(1)


def _shown_at(
    keys: np.ndarray,
    rows: np.ndarray,
    key: np.ndarray,
    suggestible: np.ndarray,
    layout: Layout,
    params: AdaptParams,
) -> np.ndarray:
    """Whether each `key` (held in row `rows`) may be suggested: a word, suggestible or
    typed, and not recent (`_Mixture.shown` at some slots)."""
    vocab_size = len(suggestible)
    word = (key >= 0) & (key < layout.words)
    oov = word & (key >= vocab_size)
    shown = word & (oov | suggestible[np.clip(key, 0, vocab_size - 1)])
    if layout.recent and shown.any():
        shown &= ~_recent_at(keys, rows, key, layout, params)
    return shown


def _mix(
    keys: np.ndarray,
    weights: np.ndarray,
    p_model: np.ndarray,
    p_unk: np.ndarray,
    last: np.ndarray | None,
    suggestible: np.ndarray,
    params: AdaptParams,
) -> _Mixture:
    """The mixture of rows (R, C) (`_scores`) with which slots may be shown and which were
    typed among the last `recent` tokens, over every slot."""
    vocab_size = len(suggestible)
    layout = Layout.of(vocab_size, params)
    held = _Held.of(keys, weights, layout)
    mix = _scores(keys, weights, p_model, p_unk, last, vocab_size, params, layout, held)
    recent = np.zeros(keys.shape, dtype=bool)
    if layout.recent:
        r, c = np.divmod(np.flatnonzero(held.words), keys.shape[1])
        recent[r, c] = _recent_at(keys, r, keys[r, c].astype(np.int64), layout, params)
    typed = mix.oov | suggestible[np.clip(keys, 0, vocab_size - 1)]
    shown = held.words & ~recent & typed
    return _Mixture(mix.scores, mix.base, mix.model, shown, recent)


def _at_keys(
    keys: np.ndarray, probs_flat: np.ndarray, rows: np.ndarray, vocab_size: int, unk_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """The model's probabilities at each row's keys (clipped into the vocabulary) and at
    `<unk>`, from the batch's (B, V) distribution flattened."""
    base = (rows.astype(np.int64) * vocab_size)[:, None]
    return np.take(probs_flat, base + np.clip(keys, 0, vocab_size - 1)), np.take(
        probs_flat, base + unk_id
    )


def live(keys: np.ndarray, weights: np.ndarray, vocab_size: int, params: AdaptParams) -> np.ndarray:
    """(B,) bool: which rows' memories mix into their answers (past the warm-up)."""
    width = active_width(keys)  # (the slots past it are empty: they weigh nothing)
    keys, weights = keys[:, :width], weights[:, :width]
    return _ramp(weights, keys, Layout.of(vocab_size, params), params)[:, 0] > 0


def probability(
    keys: np.ndarray,
    weights: np.ndarray,
    probs: np.ndarray,
    targets: np.ndarray,
    unk_id: int,
    suggestible: np.ndarray,
    lam: float,
    params: AdaptParams | None = None,
    last: np.ndarray | None = None,
) -> np.ndarray:
    """The mixture's probability of one key per row (B,) float32, as `top_k` shows it.

    `targets` (B,): a vocabulary id (punctuation and `</s>` get the model's share only),
    or V + j for a typed out-of-vocabulary word (0 unless the cache holds it). `<unk>` is
    the class of every out-of-vocabulary word: the model's share of it plus the cache's
    weight on typed words. A word among the last `recent` tokens gets its model share only
    (so what is shown sums to at most 1). A row whose memory is not mixed (empty, or
    before its warm-up) gives the model's probability, unmixed. `params` (else only `lam`)
    and `last` (each row's last token, for bigrams) as in `top_k`.
    """
    params = _params(lam, params)
    batch, vocab_size = probs.shape
    rows = np.arange(batch)
    targets = np.asarray(targets, dtype=np.int64)
    in_vocab = targets < vocab_size
    p_model = np.where(in_vocab, probs[rows, np.where(in_vocab, targets, 0)], np.float32(0.0))
    at, p_unk = _at_keys(keys, probs.reshape(-1), rows, vocab_size, unk_id)
    mix = _mix(keys, weights, at, p_unk, last, suggestible, params)
    words = Layout.of(vocab_size, params).word_keys(keys)
    held = (keys == targets[:, None]) & words
    held_shown = held & mix.shown
    from_cache = np.where(held_shown, mix.scores, np.float32(0.0)).max(1)
    from_base = np.where(held, mix.base, np.float32(0.0)).max(1)
    model = mix.model[:, 0]
    mixed = np.where(
        held_shown.any(1), from_cache, np.where(held.any(1), from_base, model * p_model)
    )
    oov = words & (keys >= vocab_size)
    cache_on_typed = np.where(oov, mix.scores - mix.base, np.float32(0.0)).sum(1)
    unk_class = model * p_model + cache_on_typed
    mixed = np.where(targets == unk_id, unk_class, mixed)
    on = live(keys, weights, vocab_size, params)
    return np.where(on, mixed, p_model).astype(np.float32)


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
    params: AdaptParams,
    last: np.ndarray | None,
    at_keys: np.ndarray | None = None,
    held: _Held | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The best k of rows with a cache and no prefix (arrays already restricted to `rows`;
    `held`: their word slots, when known).

    Candidates: the model's first k (every word the cache does not raise that can win is
    among them) and the shown cache words whose mixture probability reaches the model's
    weight times its k-th: the model's first k all reach it, so nothing below can be among
    the best k. Whether a slot may be shown is asked only of the slots that reach it.
    """
    layout = Layout.of(vocab_size, params)
    if held is None:
        held = _Held.of(keys, weights, layout)
    if at_keys is not None:
        at, p_unk = at_keys[:, :-1], at_keys[:, -1:]
    else:
        at, p_unk = _at_keys(keys, probs_flat, rows, vocab_size, unk_id)
    mix = _scores(keys, weights, at, p_unk, last, vocab_size, params, layout, held)
    scores = mix.scores
    floor = mix.model * topk_probs[:, k - 1 : k]
    # (np.nonzero of a 2-d mask is ~10x slower than flatnonzero and a division)
    r, c = np.divmod(np.flatnonzero(scores >= floor), scores.shape[1])
    key = keys[r, c].astype(np.int64)
    shown = _shown_at(keys, r, key, suggestible, layout, params)
    r, c, key = r[shown], c[shown], key[shown]
    counts = np.bincount(r, minlength=len(rows))
    width = k + int(counts.max(initial=0))
    ids = np.full((len(rows), width), EMPTY, dtype=np.int64)
    cand = np.full((len(rows), width), np.float32(-1.0), dtype=np.float32)
    ids[:, :k] = topk_ids[:, :k]
    cand[:, :k] = mix.model * topk_probs[:, :k]
    column = k + np.arange(len(r)) - (np.cumsum(counts) - counts)[r]
    ids[r, column] = key
    cand[r, column] = scores[r, c]
    return _best(ids, cand, k)


def _rank(
    ids: np.ndarray, score: np.ndarray, k: int, slip: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The best k of one row's candidates by score (times `slip`, each candidate's
    likelihood of what was typed, when given), best first (ties: lower id)."""
    rank_by = score if slip is None else score * slip
    if k < len(ids):
        part = np.argpartition(-rank_by, k - 1)[:k]
        ids, score, rank_by = ids[part], score[part], rank_by[part]
    order = np.lexsort((ids, -rank_by))
    return ids[order], score[order]


def _best_of_prefix(
    keys: np.ndarray,
    weights: np.ndarray,
    probs: np.ndarray,
    row: int,
    unk_id: int,
    suggestible: np.ndarray,
    k: int,
    params: AdaptParams,
    last: np.ndarray | None,
    candidates: np.ndarray,
    oov_match: np.ndarray | None,
    slip: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """One row's best k among a prefix's vocabulary ids (`slip`: their likelihoods, ranked
    by probability times it) and the matching typed words."""
    vocab_size = probs.shape[1]
    candidates = np.asarray(candidates, dtype=np.int64)
    at, p_unk = _at_keys(keys[None], probs.reshape(-1), np.array([row]), vocab_size, unk_id)
    mix = _mix(keys[None], weights[None], at, p_unk, last, suggestible, params)
    scores, shown, model = mix.scores[0], mix.shown[0], mix.model[0, 0]
    in_vocab = (keys >= 0) & (keys < vocab_size)
    cached = in_vocab & np.isin(keys, candidates) & shown
    slot = keys.astype(np.int64) - vocab_size
    allowed = np.zeros(len(keys), dtype=bool)
    if oov_match is not None:
        match = np.asarray(oov_match, dtype=bool)
        typed = (slot >= 0) & (slot < len(match)) & Layout.of(vocab_size, params).word_keys(keys)
        allowed[typed] = match[slot[typed]]
    allowed &= shown
    extra = cached | allowed
    rest = ~np.isin(candidates, keys[cached])
    ids = np.concatenate([candidates[rest], keys[extra].astype(np.int64)])
    score = np.concatenate([model * probs[row, candidates[rest]], scores[extra]])
    if slip is not None:
        # A cached word keeps its candidate's likelihood; a typed word matched the prefix.
        by_id = dict(zip(candidates.tolist(), np.asarray(slip, dtype=np.float32).tolist()))
        slip = np.array([by_id.get(int(i), 1.0) for i in ids], dtype=np.float32)
    return _rank(ids, score, k, slip)


def _model_of_prefix(
    probs_row: np.ndarray, candidates: np.ndarray, k: int, slip: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The model's own best k among a prefix's ids (as `runtime.top_words`)."""
    candidates = np.asarray(candidates, dtype=np.int64)
    return _rank(candidates, probs_row[candidates], k, slip)


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
    params: AdaptParams | None = None,
    last: np.ndarray | None = None,
    slips: Sequence[np.ndarray | None] | None = None,
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
    the row's table) marks, from the full distribution; `slips[b]` (float per candidate),
    when given, ranks them by probability times it (the probability shown stays the
    mixture's). A row whose memory does not mix (empty, or before its warm-up) gives the
    model's own ranking and probabilities, unmixed.

    `params` gives the mixture (else `lam` alone: no warm-up, recency or bigrams); `last`
    (B,) each row's last token id, for its bigrams. A word among a row's last `recent`
    tokens is never raised: it ranks as a word the memory does not hold.

    Rows without a prefix need only the model's probabilities at their keys: `at_keys`
    (B, C + 1, gathered at `gather_ids`) may stand for `probs`, which may then be None
    unless a row has a prefix, or hold only the rows with a prefix (`probs_index` maps a
    batch row to its row of `probs`; `at_keys` then serves the others).
    """
    params = _params(lam, params)
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
    # Every slot past the active width is empty in every row and mixes nothing in: the
    # passes below read only the columns before it (the engine's `Mixing.used` are so
    # already; then this finds it at once).
    width = max(1, active_width(keys))
    if width < keys.shape[1]:
        keys, weights = keys[:, :width], weights[:, :width]
        if at_keys is not None:
            at_keys = np.concatenate([at_keys[:, :width], at_keys[:, -1:]], axis=1)
    layout = Layout.of(vocab_size, params)
    held = _Held.of(keys, weights, layout)
    on = _ramp(weights, keys, layout, params, held.total)[:, 0] > 0
    prefixed = np.zeros(batch, dtype=bool)
    if candidates is not None:
        prefixed[[b for b, c in enumerate(candidates) if c is not None]] = True
    plain = ~prefixed & ~on
    out_ids[plain] = topk_ids[plain, :k]
    out_probs[plain] = topk_probs[plain, :k]
    mixed = np.flatnonzero(~prefixed & on)
    if len(mixed) == batch:  # the common case: no copies of the caches
        out_ids[:], out_probs[:] = _best_mixed(
            keys, weights, flat, mixed, topk_ids, topk_probs,
            vocab_size, unk_id, suggestible, k, params, last, at_keys, held,
        )  # fmt: skip
    elif len(mixed):
        out_ids[mixed], out_probs[mixed] = _best_mixed(
            keys[mixed], weights[mixed], flat, mixed, topk_ids[mixed],
            topk_probs[mixed], vocab_size, unk_id, suggestible, k, params,
            None if last is None else np.asarray(last)[mixed],
            None if at_keys is None else at_keys[mixed], held.rows(mixed),
        )  # fmt: skip
    for b in map(int, np.flatnonzero(prefixed)):
        assert candidates is not None
        at = b if probs_index is None else int(probs_index[b])
        if probs is None or at < 0:
            raise ValueError("a row with a prefix needs the full distribution")
        prefix = np.asarray(candidates[b], dtype=np.int64)
        slip = slips[b] if slips is not None else None
        if on[b]:
            match = oov_match[b] if oov_match is not None else None
            row_last = None if last is None else np.asarray(last)[b : b + 1]
            ids, score = _best_of_prefix(
                keys[b], weights[b], probs, at, unk_id, suggestible, k, params, row_last,
                prefix, match, slip,
            )  # fmt: skip
        else:
            ids, score = _model_of_prefix(probs[at], prefix, k, slip)
        out_ids[b, : len(ids)] = ids
        out_probs[b, : len(ids)] = score
    return out_ids, out_probs
