"""Suggestions that learn the writer, through the API: the writer's words and typed names
come back as suggestions, `adapt` switches it per request, session and stream, the memory
can be forgotten, blocked words never show, and the invariant holds (test_api covers it
for every text of `TEXTS`, one of them with repeated names outside the vocabulary)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from tests.api_support import api_settings, assert_same_predictions

# Long enough for the memory to mix at full weight (it waits for twice the default
# `warmup`'s words), and the last "Zorblax" more than `recent` words back (the words just
# typed are never raised).
NAMES = (
    "hello Zorblax , i am here . Zorblax and i went home . then Zorblax came to see the "
    "house and the garden , and Zorblax said that it was a good day for Zorblax and "
    "for me . then"
)


@pytest.fixture(scope="module")
def client(tiny_artifacts: Path) -> Any:
    with TestClient(create_app(api_settings(tiny_artifacts))) as client:
        yield client


def words(answer: dict[str, Any]) -> list[str]:
    return [p["word"] for p in answer["predictions"]]


def create(client: TestClient, **body: Any) -> dict[str, Any]:
    made = client.post("/v1/sessions", json=body)
    assert made.status_code == 201, made.text
    return dict(made.json())


def feed(client: TestClient, session_id: str, **body: Any) -> dict[str, Any]:
    answer = client.post(f"/v1/sessions/{session_id}/feed", json=body)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


@pytest.mark.parametrize("model", ["lstm", "gru"])
def test_a_name_typed_before_is_suggested_as_typed(client: TestClient, model: str) -> None:
    sid = create(client, model=model)["session_id"]
    feed(client, sid, text=NAMES)
    answer = feed(client, sid, text="said", k=5)
    assert "Zorblax" in words(answer)  # outside the vocabulary, shown as typed
    completed = feed(client, sid, text="", prefix="zor", k=5)
    # Prefix completion finds it (case-insensitive); other words come as corrections only
    # ("or": a "z" too many).
    clean = [p["word"] for p in completed["predictions"] if not p["corrected"]]
    assert clean == ["Zorblax"]
    assert sum(p["probability"] for p in answer["predictions"]) <= 1.0
    info = client.get(f"/v1/sessions/{sid}").json()
    assert info["adapt"] is True and info["memory"]["words"] >= 5
    assert info["memory"]["bytes"] > 0


def test_adapt_false_answers_from_the_model_alone(client: TestClient) -> None:
    text = NAMES + " said"
    plain = client.post("/v1/predict", json={"text": text, "adapt": False, "k": 10}).json()
    adapted = client.post("/v1/predict", json={"text": text, "k": 10}).json()
    assert "Zorblax" not in words(plain) and "Zorblax" in words(adapted)
    # A session made with adapt false answers as the plain predict, feed by feed ...
    sid = create(client, adapt=False, k=10)["session_id"]
    assert client.get(f"/v1/sessions/{sid}").json()["adapt"] is False
    answer = feed(client, sid, text=text, k=10)
    assert_same_predictions(answer["predictions"], plain["predictions"])
    # ... but it remembered the words: one request may still ask for them.
    once = feed(client, sid, text="", k=10, adapt=True)
    assert_same_predictions(once["predictions"], adapted["predictions"])


def test_forgetting_the_words_keeps_the_context(client: TestClient) -> None:
    sid = create(client, text=NAMES, k=10)["session_id"]
    before = feed(client, sid, text="said", k=10)
    assert "Zorblax" in words(before)
    assert client.delete(f"/v1/sessions/{sid}/memory").status_code == 204
    info = client.get(f"/v1/sessions/{sid}").json()
    assert info["memory"]["words"] == 0 and info["tokens"] == before["tokens"]
    after = feed(client, sid, text="", k=10)
    plain = client.post(
        "/v1/predict", json={"text": NAMES + " said", "k": 10, "adapt": False}
    ).json()
    assert_same_predictions(after["predictions"], plain["predictions"])
    assert client.delete("/v1/sessions/nope/memory").status_code == 404


def test_a_reset_forgets_the_words_too(client: TestClient) -> None:
    sid = create(client, text=NAMES)["session_id"]
    with client.websocket_connect(f"/v1/stream?session_id={sid}") as ws:
        assert ws.receive_json()["type"] == "ready"
        ws.send_json({"type": "reset"})
        assert ws.receive_json()["tokens"] == 0
    assert client.get(f"/v1/sessions/{sid}").json()["memory"]["words"] == 0


def test_a_blocked_word_is_never_suggested_even_when_typed(client: TestClient) -> None:
    text = "bastard bastard , i am bastard and you are bastard"
    sid = create(client, text=text, k=20)["session_id"]
    assert all(w.lower() != "bastard" for w in words(feed(client, sid, text="a", k=20)))
    completed = feed(client, sid, text="", prefix="bas", k=5)["predictions"]
    assert all(p["corrected"] and p["word"].lower() != "bastard" for p in completed)


def test_adapt_must_be_a_boolean(client: TestClient) -> None:
    for bad in ("yes", 1, {"a": 1}):
        answer = client.post("/v1/predict", json={"text": "i", "adapt": bad})
        assert answer.status_code == 422, answer.text


def test_the_stream_takes_adapt_for_the_stream_and_per_message(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream?adapt=false&k=10") as ws:
        assert ws.receive_json()["type"] == "ready"
        ws.send_json({"text": NAMES + " said"})
        assert "Zorblax" not in words(ws.receive_json())
        ws.send_json({"text": "", "adapt": True})
        assert "Zorblax" in words(ws.receive_json())
    with client.websocket_connect("/v1/stream?adapt=maybe") as ws:
        error = ws.receive_json()
        assert error["type"] == "error" and error["error"]["code"] == "bad_input"


def test_long_texts_in_chunks_remember_what_word_by_word_feeding_does(tiny_artifacts: Path) -> None:
    """Chunked prefill counts words chunk by chunk: the same memory, the same answers."""
    names = ["Zorblax", "Quux", "Marisol", "Okonkwo", "Kettleworth"]
    text = " ".join(
        f"{names[i % 5]} and the dog went home , then {names[(i * 3) % 5]} said hello ."
        for i in range(12)
    )
    settings = api_settings(tiny_artifacts, prefill_chunk=4)
    with TestClient(create_app(settings)) as client:
        whole = client.post("/v1/predict", json={"text": text, "k": 10}).json()
        made = create(client, text=text, k=10)
        assert_same_predictions(made["predictions"], whole["predictions"])
        sid = create(client, k=10)["session_id"]
        for word in text.split():
            answer = feed(client, sid, text=word, k=10)
        assert answer["tokens"] == whole["tokens"] == made["tokens"]
        assert_same_predictions(answer["predictions"], whole["predictions"])
        for prefix in ("k", "m", "o", "q", "z"):
            completed = feed(client, sid, text="", prefix=prefix, k=10)
            want = client.post("/v1/predict", json={"text": text, "k": 10, "prefix": prefix})
            assert_same_predictions(completed["predictions"], want.json()["predictions"])
            assert any(w in names for w in words(completed)), (prefix, words(completed))


def test_nothing_of_the_memory_is_logged(
    tiny_artifacts: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    with TestClient(create_app(api_settings(tiny_artifacts))) as client:
        sid = create(client, text=NAMES)["session_id"]
        feed(client, sid, text="", prefix="zo")
        client.get(f"/v1/sessions/{sid}")
        client.post(f"/v1/sessions/{sid}/feed", json={"text": "Zorblax", "adapt": "x"})
        client.delete(f"/v1/sessions/{sid}/memory")
    logged = "\n".join(r.getMessage() for r in caplog.records).lower()
    assert caplog.records and "zorblax" not in logged


def test_the_service_default_and_no_memory_at_all(tiny_artifacts: Path) -> None:
    text = NAMES + " said"
    with TestClient(create_app(api_settings(tiny_artifacts, adapt=False))) as client:
        plain = client.post("/v1/predict", json={"text": text, "k": 10}).json()
        assert "Zorblax" not in words(plain)
        sid = create(client, text=NAMES, k=10)["session_id"]
        assert client.get(f"/v1/sessions/{sid}").json()["adapt"] is False
        assert "Zorblax" in words(feed(client, sid, text="said", k=10, adapt=True))
    settings = api_settings(tiny_artifacts, adapt_memory=False)
    with TestClient(create_app(settings)) as client:
        sid = create(client, text=NAMES, k=10, adapt=False)["session_id"]
        answer = feed(client, sid, text="said", k=10, adapt=True)  # nothing to mix in
        assert_same_predictions(answer["predictions"], plain["predictions"])
        info = client.get(f"/v1/sessions/{sid}").json()
        assert info["memory"] == {"words": 0, "bytes": 0}
        assert info["adapt"] is False  # the session's default is still what it was made with


def test_a_stream_message_with_a_wrong_adapt_is_answered_in_band(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream") as ws:
        assert ws.receive_json()["type"] == "ready"
        ws.send_json({"text": "i am", "adapt": "yes", "id": 7})
        error = ws.receive_json()
        assert error["type"] == "error" and error["id"] == 7
        assert error["error"]["code"] == "bad_input"
        ws.send_json({"text": "i am", "adapt": False})
        assert ws.receive_json()["tokens"] == 2  # the connection stayed open
