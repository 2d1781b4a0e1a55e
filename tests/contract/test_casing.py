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


# --- case that depends on the word before ------------------------------------------------

CASED_CORPUS = (
    "we went to the big House today .\n" * 6  # a name: "House" after "big"
    + "the house was good and the house was old .\n" * 4  # "house" alone is lower-case
    + "I said we went to the big House .\n" * 5
    + "we saw the Big day come .\n"  # a sentence start is not counted ...
    + "Big house .\n" * 2  # ... but the word after it is: 11 "House" of 13 after "big"
)


def test_pair_forms_count_a_word_after_its_previous_word(tmp_path: Path) -> None:
    from model_export.casing import count_forms, display_forms, pair_forms
    from service.contract.vocab import Vocabulary

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        CASED_CORPUS
        + "the United Kingdom and the Bush .\n" * 5
        + "the kingdom was old .\n" * 4  # so "kingdom" alone is not shown "Kingdom"
    )
    vocab = Vocabulary(
        ["<pad>", "<unk>", "</s>", "the", "big", "house", "i", "united", "kingdom", "bush"]
    )
    counts = count_forms([str(corpus)], vocab, split=None)  # every document of the file
    display = display_forms([str(corpus)], vocab, counts=counts)
    pairs = pair_forms([str(corpus)], vocab, counts=counts, display=display)
    assert display["i"] == "I" and "house" not in display and "kingdom" not in display
    assert pairs[("big", "house")] == "House" and pairs[("united", "kingdom")] == "Kingdom"
    assert ("the", "house") not in pairs  # the word's own (lower) form: no pair needed
    # "the" then "bush": "Bush" every time here, so the word's own form is already "Bush"
    assert display["bush"] == "Bush" and ("the", "bush") not in pairs
    # a pair seen fewer than `min_count` times is not kept (13 times "big" then "house",
    # 5 times "united" then "kingdom")
    assert pair_forms([str(corpus)], vocab, counts=counts, display=display, min_count=10) == {
        ("big", "house"): "House"
    }


def test_display_form_after_a_word() -> None:
    from service.contract.casing import display_form
    from service.contract.vocab import Vocabulary

    vocab = Vocabulary(["<pad>", "<unk>", "</s>", "united", "kingdom", "i", "bush"])
    vocab.set_display_forms({"i": "I", "bush": "Bush"})
    vocab.set_pair_forms(
        {
            ("united", "kingdom"): "Kingdom",
            ("the", "bush"): "bush",  # "the" is not in this vocabulary: ignored
            ("united", "bush"): "BOSH",  # not a form of "bush": ignored
        }
    )
    united, kingdom, i, bush = (vocab.index[w] for w in ("united", "kingdom", "i", "bush"))
    assert display_form(vocab, kingdom, united) == "Kingdom"
    assert (
        display_form(vocab, kingdom) == "kingdom" and display_form(vocab, kingdom, i) == "kingdom"
    )
    assert display_form(vocab, kingdom, -1) == "kingdom"  # no previous token known
    assert display_form(vocab, i, united) == "I" and display_form(vocab, bush, united) == "Bush"
    assert vocab.pair_display == {(united, kingdom): "Kingdom"}


@pytest.fixture(scope="module")
def pair_client(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The API over a tiny artifact whose casing was counted from `CASED_CORPUS`."""
    from model_export.casing import write_casing
    from tests.conftest import make_models_dir

    root = make_models_dir(tmp_path_factory.mktemp("pair-models"))
    corpus = root.parent / "corpus.txt"
    corpus.write_text(CASED_CORPUS)
    for name in ("lstm", "gru"):
        assert write_casing(root / name, [str(corpus)], split=None) == {
            "display.tsv": 1,  # "I"
            "display_pairs.tsv": 1,  # ("big", "house") -> "House"
        }
    with TestClient(create_app(api_settings(root))) as client:
        yield client


def test_a_word_is_cased_as_after_its_previous_word(pair_client: TestClient) -> None:
    def first(text: str, prefix: str, model: str = "lstm") -> str:
        """The completion of `prefix` that is the word it starts (not a slip's correction)."""
        got = words(pair_client, text=text, prefix=prefix, model=model)
        return next(w for w in got if w.lower().startswith(prefix.lower()))

    for model in ("lstm", "gru"):
        assert first("we went to the big", "hou", model) == "House"
        assert first("we went to the", "hou", model) == "house"
    assert first("we went to the big", "HOU") == "HOUSE"  # capitals typed: the word so
    assert first("we went home.", "hou") == "House"  # a sentence start
    after_big = words(pair_client, text="we went to the big", prefix="i")
    assert "I" in after_big and "i" not in after_big  # "I" is "I" after any word
    assert first("we went to the Big", "hou") == "House"  # however the context was typed
    # a session and the stream case it the same way
    sid = pair_client.post("/v1/sessions", json={"text": "to the big", "k": 5}).json()
    feed = pair_client.post(
        f"/v1/sessions/{sid['session_id']}/feed", json={"text": "", "k": 5, "prefix": "hou"}
    )
    assert "House" in [p["word"] for p in feed.json()["predictions"]]
    with pair_client.websocket_connect("/v1/stream?k=5") as ws:
        ws.receive_json()
        ws.send_json({"text": "to the big", "prefix": "hou"})
        assert "House" in [p["word"] for p in ws.receive_json()["predictions"]]


def test_casing_is_counted_on_the_training_split_only(tmp_path: Path) -> None:
    from model_export.casing import count_forms, display_forms
    from model_export.corpora import split_of
    from service.contract.vocab import Vocabulary

    folder = tmp_path / "texts"
    folder.mkdir()
    names = [f"doc{i}.txt" for i in range(200)]
    held_out = next(n for n in names if split_of(f"texts/{n}#0") == "test")
    trained = next(n for n in names if split_of(f"texts/{n}#0") == "train")
    (folder / held_out).write_text("we met Zed there .\n" * 6)
    (folder / trained).write_text("we met Paris there .\n" * 6)
    vocab = Vocabulary(["<pad>", "<unk>", "</s>", "we", "met", "zed", "paris"])
    assert display_forms([str(folder)], vocab) == {"paris": "Paris"}
    every = count_forms([str(folder)], vocab, split=None)
    assert display_forms([], vocab, counts=every) == {"paris": "Paris", "zed": "Zed"}


def test_agreement_counts_words_written_as_shown() -> None:
    from model_export.casing import agreement
    from service.contract.vocab import Vocabulary

    vocab = Vocabulary(["<pad>", "<unk>", "</s>", "the", "big", "house", "i"])
    vocab.set_display_forms({"i": "I"})
    vocab.set_pair_forms({("big", "house"): "House"})
    docs = [("doc", ["The big House and the house , I said .", "THE BIG HOUSE IS HERE ."])]
    # counted: big, House, the, house, I (not "The": a sentence start; not the line in
    # capitals); "House" is shown so only after "big"
    assert agreement(docs, vocab) == {"words": 5, "own": 4 / 5, "with_pairs": 1.0}


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_the_bundled_models_write_kingdom_after_united(name: str) -> None:
    from service.contract.artifact import ModelArtifact
    from service.contract.casing import display_form
    from tests.paths import BUNDLED_MODELS

    vocab = ModelArtifact.load(BUNDLED_MODELS / name).vocab
    ids = {w: vocab.index[w] for w in ("the", "united", "kingdom", "new", "jersey", "i")}
    assert display_form(vocab, ids["kingdom"], ids["united"]) == "Kingdom"
    assert display_form(vocab, ids["kingdom"], ids["the"]) == "kingdom"
    assert display_form(vocab, ids["united"], ids["the"]) == "United"
    assert display_form(vocab, ids["jersey"], ids["new"]) == "Jersey"
    assert display_form(vocab, ids["i"], ids["united"]) == "I"
