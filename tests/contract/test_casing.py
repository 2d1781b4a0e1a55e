"""How a suggested word is written where it goes (service.contract.casing), and through
the API: capitals at a sentence start, the prefix's capitals kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.contract.casing import at_sentence_start, written_form
from tests.api_support import api_settings


def test_written_form() -> None:
    assert written_form("the", True) == "The"
    assert written_form("the", False) == "the"
    assert written_form("I'm", False) == "I'm" and written_form("NASA", True) == "NASA"
    assert written_form("apple", False, "Ap") == "Apple"
    assert written_form("apple", False, "ap") == "apple"
    assert written_form("usa", False, "US") == "USA"  # capitals typed: the word so
    assert written_form("mcdonald", False, "mcD") == "mcDonald"  # the typed capital kept
    assert written_form("operation", False, "Opr") == "Operation"  # a corrected word
    assert written_form("1995", True) == "1995"


def test_sentence_start() -> None:
    assert at_sentence_start(2, 2, 5) and at_sentence_start(7, 2, 0)
    assert not at_sentence_start(7, 2, 5)


@pytest.fixture(scope="module")
def client(tiny_artifacts: Path) -> Any:
    with TestClient(create_app(api_settings(tiny_artifacts))) as client:
        yield client


def words(client: TestClient, **body: Any) -> list[str]:
    answer = client.post("/v1/predict", json={"k": 20, "adapt": False, **body})
    assert answer.status_code == 200, answer.text
    return [p["word"] for p in answer.json()["predictions"]]


def test_a_sentence_start_is_capitalised_everywhere(client: TestClient) -> None:
    for text in ("", "we went home.", "is it done ?", "Stop!"):
        got = words(client, text=text)
        assert got and all(w[0] == w[0].upper() for w in got), (text, got)
    inside = words(client, text="we went")
    assert any(w[0].islower() for w in inside)
    # The same on a session and the stream: the engine reports where the context ends.
    sid = client.post("/v1/sessions", json={"text": "we went home.", "k": 5}).json()
    feed = client.post(f"/v1/sessions/{sid['session_id']}/feed", json={"text": "", "k": 5})
    assert all(
        p["word"][0].isupper() or not p["word"][0].isalpha() for p in feed.json()["predictions"]
    )
    with client.websocket_connect("/v1/stream?k=5") as ws:
        ready = ws.receive_json()
        assert all(p["word"][0].isupper() for p in ready["predictions"] if p["word"][0].isalpha())
        ws.send_json({"text": "we went"})
        inside_ws = [p["word"] for p in ws.receive_json()["predictions"]]
        assert inside_ws == words(client, text="we went", k=5, adapt=None)


def test_a_capital_typed_in_the_prefix_is_kept(client: TestClient) -> None:
    lower = words(client, text="we went", prefix="th")
    upper = words(client, text="we went", prefix="Th")
    assert upper == [w[0].upper() + w[1:] for w in lower]


def test_display_forms_count_names_and_acronyms(tmp_path: Path) -> None:
    from model_export.casing import display_forms
    from service.contract.vocab import Vocabulary

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "we saw the NASA team and I said Paris was fine .\n" * 6
        + "Nasa said so . US troops and us .\n" * 2
        + "THE TV SHOW WAS LOUD .\nwe watched TV at home .\n" * 6
        + "the us and them , us again .\n" * 3
    )
    vocab = Vocabulary(
        ["<pad>", "<unk>", "</s>", "we", "saw", "the", "nasa", "paris", "tv", "us", "i"]
    )
    forms = display_forms([str(corpus)], vocab)
    assert forms["nasa"] == "NASA"  # capitals outside sentence starts
    assert forms["paris"] == "Paris" and forms["i"] == "I"
    assert forms["tv"] == "TV"  # the lines in capitals not counted, the others are
    assert "us" not in forms and "the" not in forms  # mostly lower-case
