"""Helpers shared by the API tests (REST, WebSocket, end to end): texts and comparisons."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from service.config import Settings

TOLERANCE = 1e-4  # DESIGN.md: probabilities within 1e-4
# Float32 rounding differs between batch shapes by ~1e-9 here; a swap of two words
# is accepted only when their probabilities are this close (the tiny test models'
# distributions are flat, so a looser bound would hide a wrong context).
NEAR_TIE = 1e-6

# Texts in the tiny test vocabulary (tests/conftest.py), with a few unknown words,
# punctuation and sentence ends, so that prefill, <unk> and </s> are all exercised.
TEXTS = [
    "i am coming home",
    "the cat and the dog went home . they were very good",
    "do you want to go , or not ? i think we should",
    "hello world , hello zebra",
    "it's a well-known thing : people like food and water",
    "she said that he had made a big car for the child",
    "what time is it now ? it is night",
    "we can make it work if we try",
    # The writer's own words (adaptation): names outside the vocabulary, typed again.
    "Hello Zorblax , i am Quux . Zorblax went home and Quux said Zorblax was good",
]


def api_settings(models_dir: Path, **overrides: Any) -> Settings:
    """Settings for an app over the tiny test models."""
    return Settings(models_dir=models_dir, providers="CPUExecutionProvider", **overrides)


def random_chunks(words: list[str], rng: random.Random) -> list[str]:
    """The words cut into random runs of whole words (each run non-empty)."""
    chunks, i = [], 0
    while i < len(words):
        n = rng.randint(1, 4)
        chunks.append(" ".join(words[i : i + n]))
        i += n
    return chunks


def splits(text: str, seed: int) -> dict[str, list[str]]:
    """Ways to feed `text` to a session: word by word, and random whole-word chunks."""
    words = text.split()
    return {"word by word": words, "random chunks": random_chunks(words, random.Random(seed))}


def assert_same_predictions(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """Same words with probabilities within 1e-4.

    Two words whose probabilities differ by less than float32 rounding may trade
    places between a batch of one and a batch of many, so an order or membership
    difference is accepted only between such near-ties (NEAR_TIE).
    """
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want):
        assert abs(g["probability"] - w["probability"]) <= TOLERANCE, (got, want)
    if [p["word"] for p in got] == [p["word"] for p in want]:
        return
    got_p = {p["word"]: p["probability"] for p in got}
    want_p = {p["word"]: p["probability"] for p in want}
    for i, (g, w) in enumerate(zip(got, want)):
        if g["word"] != w["word"]:  # only a near-tie may change places
            assert abs(g["probability"] - w["probability"]) <= NEAR_TIE, (i, got, want)
    for word in got_p.keys() & want_p.keys():
        assert abs(got_p[word] - want_p[word]) <= NEAR_TIE, (word, got, want)
