"""Measuring like a keyboard (model_export.keyboard): the typist's arithmetic against a
scripted predictor, and a run through the real in-process service on tiny models."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import pytest

from model_export.keyboard import (
    KeyboardTally,
    _Budget,
    cased_documents,
    evaluate_keyboard,
    type_document,
    typed_pieces,
)


class Oracle:
    """Suggests the next word of the text, but only once two of its letters are typed
    (and, right after a word, that word again: an echo)."""

    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.at = 0  # the index of the next word

    def _answer(self, prefix: str | None) -> dict[str, Any]:
        word = self.words[self.at] if self.at < len(self.words) else ""
        shown = [word] if prefix and len(prefix) >= 2 and word.startswith(prefix) else []
        if not prefix and self.at:
            shown = [self.words[self.at - 1]]
        return {"session_id": "s", "predictions": [{"word": w} for w in shown]}

    async def create_session(self, text: str, k: int, model: str) -> dict[str, Any]:
        return self._answer(None)

    async def feed(self, sid: str, text: str, k: int, **kw: Any) -> dict[str, Any]:
        self.at += len(text.split())
        return self._answer(kw.get("prefix"))


def test_the_typist_takes_a_word_once_it_is_suggested() -> None:
    words = ["Send", "the", "letters", "today"]
    tally = KeyboardTally()
    oracle = Oracle(words)
    budget = _Budget(100, type("Bar", (), {"update": lambda self, n: None})())
    asyncio.run(
        type_document(oracle, "m", [" ".join(words) + "."], random.Random(1), tally, budget)
    )
    m = tally.metrics()
    assert tally.words == 4 and m["next_top3"] == 0.0
    # Each word: two letters, then one key takes it (and its space): 3 keys of len + 1.
    needed = sum(len(w) + 1 for w in words)
    assert tally.keys_needed == needed and tally.keys_used == 3 * len(words)
    assert m["keystroke_savings"] == pytest.approx(1 - 12 / needed)
    # The oracle echoes the last word after every word: 3 lists of 3 after a word.
    assert tally.after_word == 3 and m["echo_top3"] == 1.0
    # A completion from one letter misses, from two or more hits.
    assert 0 < tally.completion_hits[3] <= tally.completions == 4


def test_pieces_keep_the_case_as_written() -> None:
    pieces = list(typed_pieces(["The U.S. Army\u2019s men, said I."]))
    assert pieces[:3] == [(True, "The"), (True, "U"), (False, ".")]
    assert (True, "Army's") in pieces and (False, ",") in pieces and (True, "I") in pieces


def test_a_run_through_the_service_and_its_record(tiny_artifacts: Path, tmp_path: Path) -> None:
    text = tmp_path / "held-out.txt"
    text.write_text("i am coming home . we went there , and then we came back .\n" * 3)
    artifact = tmp_path / "models" / "lstm"
    artifact.parent.mkdir()
    import shutil

    shutil.copytree(tiny_artifacts / "lstm", artifact)
    assert [
        len(lines) for _, lines in cased_documents([str(text)], [], "test", None)["held-out.txt"]
    ] == [3]
    results = evaluate_keyboard(str(artifact), [str(text)], [], max_words=25, record=True)
    m = results["held-out.txt"]
    assert m["words"] == 25
    # The memory never raises the word just typed: no more echoes than the model alone.
    assert m["echo_top3"] <= m["echo_top3_plain"]
    for key, value in m.items():
        if key != "words":
            assert 0.0 <= value <= 1.0, key
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["keyboard"] == results
    # GET /v1/models carries them.
    from fastapi.testclient import TestClient

    from service.api import create_app
    from tests.api_support import api_settings

    with TestClient(create_app(api_settings(artifact.parent))) as client:
        (model,) = client.get("/v1/models").json()["models"]
        assert model["keyboard"] == results
