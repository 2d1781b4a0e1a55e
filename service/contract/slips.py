"""Typing slips: the words a writer may have meant when the letters typed are off by one.

The noise model (shared by the service and `nextword evaluate`): a slip is one of

| slip | the writer meant | likelihood (a clean prefix: 1) |
|---|---|---|
| neighbour | one letter replaced by a key next to it on a QWERTY layout | 0.05 |
| swap | two adjacent letters swapped | 0.05 |
| missing | one letter left out (not the last: that is a clean prefix) | 0.02 |
| extra | one letter too many | 0.02 |

A word is offered for a prefix with the likelihood of the likeliest slip that turns the
prefix into the start of the word; a word the prefix starts cleanly has likelihood 1.
The service ranks a prefix's words by the model's probability times this likelihood.
Slips are looked for only in prefixes of `MIN_SLIP_CHARS` letters or more, and never
leave fewer than that: a one-letter prefix says too little to correct.
"""

from __future__ import annotations

import random
from typing import Protocol

import numpy as np

from service.contract.tokenizer import normalize

LIKELIHOOD = {"neighbour": 0.05, "swap": 0.05, "missing": 0.02, "extra": 0.02}
MIN_SLIP_CHARS = 2
LETTERS = "abcdefghijklmnopqrstuvwxyz'-"

_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_OFFSETS = (0.0, 0.25, 0.75)  # how far each row sits right of the one above


def _neighbours() -> dict[str, str]:
    place = {ch: (r, c + _OFFSETS[r]) for r, row in enumerate(_ROWS) for c, ch in enumerate(row)}
    return {
        ch: "".join(
            other
            for other, (r2, x2) in place.items()
            if other != ch and abs(r2 - r) <= 1 and abs(x2 - x) <= 1.0
        )
        for ch, (r, x) in place.items()
    }


NEIGHBOURS = _neighbours()  # "g": "tyfhvb" ...


class PrefixIndex(Protocol):
    """What slips need of a vocabulary: the ids of the words starting with a prefix."""

    def ids_with_prefix(self, prefix: str) -> np.ndarray: ...


def meant(prefix: str) -> dict[str, float]:
    """{what the writer may have meant to type: likelihood} for one slip in `prefix`
    (normalized), the prefix itself excluded."""
    p = normalize(prefix)
    out: dict[str, float] = {}

    def offer(form: str, kind: str) -> None:
        if len(form) >= MIN_SLIP_CHARS and form != p:
            out[form] = max(out.get(form, 0.0), LIKELIHOOD[kind])

    if len(p) < MIN_SLIP_CHARS:
        return out
    for i, ch in enumerate(p):
        for other in NEIGHBOURS.get(ch, ""):
            offer(p[:i] + other + p[i + 1 :], "neighbour")
        offer(p[:i] + p[i + 1 :], "extra")
        for letter in LETTERS:
            offer(p[:i] + letter + p[i:], "missing")
        if i + 1 < len(p) and p[i + 1] != ch:
            offer(p[:i] + p[i + 1] + ch + p[i + 2 :], "swap")
    return out


def candidates(vocab: PrefixIndex, prefix: str) -> tuple[np.ndarray, np.ndarray, int]:
    """The ids a prefix may complete to, sorted, with their likelihoods (float32; 1 for a
    clean completion), and how many of them complete it cleanly."""
    clean = vocab.ids_with_prefix(prefix)
    best: dict[int, float] = {}
    for form, likelihood in meant(prefix).items():
        for i in vocab.ids_with_prefix(form).tolist():
            if best.get(i, 0.0) < likelihood:
                best[i] = likelihood
    for i in clean.tolist():
        best[i] = 1.0
    ids = np.array(sorted(best), dtype=np.int64)
    likelihoods = np.array([best[i] for i in ids.tolist()], dtype=np.float32)
    return ids, likelihoods, len(clean)


def slip(word: str, rng: random.Random) -> str:
    """`word` with one slip drawn from the noise model (kinds in proportion to their
    likelihoods, the place uniform); the word itself when it is too short to slip."""
    kinds = [k for k in LIKELIHOOD if len(word) >= (3 if k == "swap" else 2)]
    if not kinds:
        return word
    kind = rng.choices(kinds, weights=[LIKELIHOOD[k] for k in kinds])[0]
    i = rng.randrange(len(word) - (1 if kind == "swap" else 0))
    if kind == "neighbour":
        near = NEIGHBOURS.get(word[i], "")
        return word[:i] + rng.choice(near) + word[i + 1 :] if near else word
    if kind == "swap":
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == "missing":
        return word[:i] + word[i + 1 :]
    return word[:i] + rng.choice(LETTERS[:26]) + word[i:]
