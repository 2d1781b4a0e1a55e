"""Typing slips (service.contract.slips): the noise model, and the words a slipped prefix
may have meant, found in a vocabulary."""

from __future__ import annotations

import random

import numpy as np

from model_export.tiny import tiny_vocab_tokens
from service.contract import slips
from service.contract.vocab import Vocabulary


def test_qwerty_neighbours_are_adjacent_keys_both_ways() -> None:
    assert set(slips.NEIGHBOURS["g"]) == set("tyfhvb")
    assert set(slips.NEIGHBOURS["a"]) == set("qwsz")
    for key, near in slips.NEIGHBOURS.items():
        assert key not in near
        assert all(key in slips.NEIGHBOURS[other] for other in near)


def test_each_kind_of_slip_is_undone() -> None:
    meant = slips.meant
    assert meant("tje")["the"] == slips.LIKELIHOOD["neighbour"]  # j next to h
    assert meant("teh")["the"] == slips.LIKELIHOOD["swap"]
    assert meant("oprat")["operat"] == slips.LIKELIHOOD["missing"]
    assert meant("thhe")["the"] == slips.LIKELIHOOD["extra"]
    assert "tqe" not in meant("tze")  # q is not next to z: no slip gives it
    assert meant("t") == {} and "th" not in meant("th")  # too short; never itself


def test_candidates_rank_clean_completions_above_slips() -> None:
    vocab = Vocabulary(tiny_vocab_tokens())
    ids, likelihoods, clean = slips.candidates(vocab, "th")
    assert list(ids) == sorted(ids) and len(ids) == len(likelihoods)
    words = {vocab.tokens[i]: float(lk) for i, lk in zip(ids, likelihoods)}
    assert clean == sum(1 for w in words if w.startswith("th")) > 0
    assert all((lk == 1.0) == w.startswith("th") for w, lk in words.items())
    ids, likelihoods, clean = slips.candidates(vocab, "teh")
    assert clean == 0 and "the" in {vocab.tokens[i] for i in ids}
    assert (likelihoods < 1).all()


def test_a_simulated_slip_is_one_the_service_undoes() -> None:
    rng = random.Random(5)
    words = [w for w in tiny_vocab_tokens() if w.isalpha() and len(w) >= 3]
    kinds = 0
    for _ in range(500):
        word = rng.choice(words)
        typed = slips.slip(word, rng)
        if typed == word:
            continue
        kinds += 1
        # The word is a clean completion of what was typed, or one slip away from it.
        assert word.startswith(typed) or any(word.startswith(m) for m in slips.meant(typed))
    assert kinds > 400
    assert slips.slip("a", rng) == "a"


def test_likelihoods_are_float32_for_the_wire() -> None:
    vocab = Vocabulary(tiny_vocab_tokens())
    ids, likelihoods, _ = slips.candidates(vocab, "wh")
    assert ids.dtype == np.int64 and likelihoods.dtype == np.float32


def test_the_api_offers_and_marks_corrections(tiny_artifacts) -> None:
    from fastapi.testclient import TestClient

    from service.api import create_app
    from tests.api_support import api_settings

    with TestClient(create_app(api_settings(tiny_artifacts))) as client:
        for model in ("lstm", "gru"):
            body = {"text": "we saw", "k": 50, "prefix": "teh", "model": model}
            got = client.post("/v1/predict", json=body).json()["predictions"]
            assert {"word": "the", "corrected": True} in [
                {"word": p["word"], "corrected": p["corrected"]} for p in got
            ]
            assert all(p["corrected"] for p in got)  # nothing starts with "teh"
            # Ranked by probability times the slip's likelihood: clean words keep their
            # order among themselves, and each is marked as it is.
            body["prefix"] = "th"
            got = client.post("/v1/predict", json=body).json()["predictions"]
            clean = [p for p in got if not p["corrected"]]
            assert clean and all(p["word"].startswith("th") for p in clean)
            assert all(not p["word"].startswith("th") for p in got if p["corrected"])
            probs = [p["probability"] for p in clean]
            assert probs == sorted(probs, reverse=True)
            # The stream says the same.
            with client.websocket_connect(f"/v1/stream?model={model}&k=50&adapt=false") as ws:
                ws.receive_json()
                ws.send_json({"text": "we saw", "prefix": "th"})
                streamed = ws.receive_json()["predictions"]
            body["adapt"] = False
            want = client.post("/v1/predict", json=body).json()["predictions"]
            assert [(p["word"], p["corrected"]) for p in streamed] == [
                (p["word"], p["corrected"]) for p in want
            ]
