"""The WebSocket `/v1/stream` over the real predictor and the tiny ONNX models."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from service.api import create_app
from service.errors import Overloaded
from tests.api_support import TEXTS, api_settings, assert_same_predictions, splits

MODELS = ["lstm", "gru"]


@pytest.fixture(scope="module")
def client(tiny_artifacts: Path) -> Any:
    """One app (lifespan and batchers running) for the whole module."""
    with TestClient(create_app(api_settings(tiny_artifacts))) as client:
        yield client


def predict(client: TestClient, text: str, model: str | None = None, k: int = 5) -> dict[str, Any]:
    r = client.post("/v1/predict", json={"text": text, "model": model, "k": k})
    assert r.status_code == 200, r.text
    return r.json()


def ask(ws: Any, message: dict[str, Any]) -> dict[str, Any]:
    ws.send_json(message)
    answer: dict[str, Any] = ws.receive_json()
    return answer


def assert_closed(ws: Any, code: int) -> None:
    with pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_json()
    assert closed.value.code == code


def assert_in_band_error(answer: dict[str, Any], code: str = "bad_input", id: Any = None) -> None:
    assert answer["type"] == "error", answer
    assert answer["error"]["code"] == code and answer["error"]["message"], answer
    assert answer["id"] == id


# --- connecting ------------------------------------------------------------------


def test_ready_opens_a_new_session(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream?k=3") as ws:
        ready = ws.receive_json()
    assert ready["type"] == "ready" and ready["model"] == "lstm" and ready["tokens"] == 0
    assert len(ready["predictions"]) == 3
    assert_same_predictions(ready["predictions"], predict(client, "", k=3)["predictions"])
    info = client.get(f"/v1/sessions/{ready['session_id']}").json()
    assert info["tokens"] == 0 and info["model"] == "lstm"


def test_ready_with_a_model(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream?model=gru") as ws:
        ready = ws.receive_json()
    assert ready["model"] == "gru" and len(ready["predictions"]) == 5


def test_resume_a_session_by_id(client: TestClient) -> None:
    r = client.post("/v1/sessions", json={"text": "the cat and the"})
    sid = r.json()["session_id"]
    with client.websocket_connect(f"/v1/stream?session_id={sid}") as ws:
        ready = ws.receive_json()
        assert ready["session_id"] == sid and ready["tokens"] == 4
        assert_same_predictions(ready["predictions"], r.json()["predictions"])
        answer = ask(ws, {"text": "dog"})
    assert answer["tokens"] == 5
    assert client.get(f"/v1/sessions/{sid}").json()["tokens"] == 5
    assert_same_predictions(
        answer["predictions"], predict(client, "the cat and the dog")["predictions"]
    )


def test_unknown_session_gets_an_error_then_4404(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream?session_id=AAAAAAAAAAAAAAAAAAAAAA") as ws:
        assert_in_band_error(ws.receive_json(), "unknown_session")
        assert_closed(ws, 4404)


def test_expired_session_gets_an_error_then_4404(tiny_artifacts: Path) -> None:
    with TestClient(create_app(api_settings(tiny_artifacts, session_ttl_s=0.2))) as client:
        sid = client.post("/v1/sessions", json={"text": "i am"}).json()["session_id"]
        time.sleep(0.35)
        with client.websocket_connect(f"/v1/stream?session_id={sid}") as ws:
            assert_in_band_error(ws.receive_json(), "unknown_session")
            assert_closed(ws, 4404)


def test_session_deleted_while_connected_gets_an_error_then_4404(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream") as ws:
        sid = ws.receive_json()["session_id"]
        assert client.delete(f"/v1/sessions/{sid}").status_code == 204
        assert_in_band_error(ask(ws, {"text": "hello", "id": 7}), "unknown_session", id=7)
        assert_closed(ws, 4404)


@pytest.mark.parametrize(
    ("query", "code", "close"),
    [
        ("model=transformer", "unknown_model", 4404),
        ("k=0", "bad_input", 4422),
        ("k=1000", "bad_input", 4422),
        ("k=five", "bad_input", 4422),
        ("k=" + "9" * 5000, "bad_input", 4422),  # past int()'s 4,300 digits: no traceback
        ("k=" + "0" * 5000, "bad_input", 4422),
        ("adapt=" + "x" * 5000, "bad_input", 4422),
    ],
)
def test_bad_connect_parameters_get_an_error_then_close(
    client: TestClient, query: str, code: str, close: int
) -> None:
    with client.websocket_connect(f"/v1/stream?{query}") as ws:
        assert_in_band_error(ws.receive_json(), code)
        assert_closed(ws, close)


def test_resume_with_another_model_is_refused(client: TestClient) -> None:
    sid = client.post("/v1/sessions", json={"model": "gru"}).json()["session_id"]
    with client.websocket_connect(f"/v1/stream?session_id={sid}&model=lstm") as ws:
        assert_in_band_error(ws.receive_json(), "bad_input")
        assert_closed(ws, 4422)


# --- messages --------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("text_index", range(len(TEXTS)))
def test_stream_in_any_split_equals_predict_on_the_whole_text(
    client: TestClient, model: str, text_index: int
) -> None:
    text = TEXTS[text_index]
    for chunks in splits(text, seed=100 + text_index).values():
        with client.websocket_connect(f"/v1/stream?model={model}&k=8") as ws:
            sid = ws.receive_json()["session_id"]
            for n, chunk in enumerate(chunks):
                answer = ask(ws, {"text": chunk, "id": n})
                whole = predict(client, " ".join(chunks[: n + 1]), model=model, k=8)
                assert answer["type"] == "predictions" and answer["session_id"] == sid
                assert answer["id"] == n and answer["tokens"] == whole["tokens"]
                assert_same_predictions(answer["predictions"], whole["predictions"])


def test_pipelined_messages_are_answered_in_order(client: TestClient) -> None:
    words = TEXTS[1].split()
    with client.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        for n, word in enumerate(words):
            ws.send_json({"text": word, "id": f"m{n}"})
        answers = [ws.receive_json() for _ in words]
    assert [a["id"] for a in answers] == [f"m{n}" for n in range(len(words))]
    assert [a["tokens"] for a in answers] == [
        predict(client, " ".join(words[: n + 1]))["tokens"] for n in range(len(words))
    ]
    assert_same_predictions(answers[-1]["predictions"], predict(client, TEXTS[1])["predictions"])


def test_ids_of_any_json_type_are_echoed(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        for message_id in [0, "abc", 1.5, None, [1, "x"], {"n": {"m": True}}]:
            assert ask(ws, {"text": "a", "id": message_id})["id"] == message_id
        assert "id" in ask(ws, {"text": "a"})


def test_per_message_k_and_prefix(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream?k=2") as ws:
        assert len(ws.receive_json()["predictions"]) == 2
        assert len(ask(ws, {"text": "i"})["predictions"]) == 2
        assert len(ask(ws, {"text": "am", "k": 9})["predictions"]) == 9
        answer = ask(ws, {"text": "", "k": 50, "prefix": "Th"})
        assert answer["tokens"] == 2
        words = [p["word"] for p in answer["predictions"] if not p["corrected"]]
        assert words and all(w.startswith("Th") for w in words)  # the capitals typed kept


def test_reset_starts_the_text_afresh(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream?model=gru") as ws:
        sid = ws.receive_json()["session_id"]
        ask(ws, {"text": "the cat and the dog"})
        answer = ask(ws, {"type": "reset", "id": "r"})
        assert answer["type"] == "predictions" and answer["id"] == "r" and answer["tokens"] == 0
        assert_same_predictions(
            answer["predictions"], predict(client, "", model="gru")["predictions"]
        )
        after = ask(ws, {"text": "i am"})
    assert after["tokens"] == 2
    assert_same_predictions(
        after["predictions"], predict(client, "i am", model="gru")["predictions"]
    )
    assert client.get(f"/v1/sessions/{sid}").json()["tokens"] == 2


def test_empty_emoji_and_control_characters_are_valid_text(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        assert ask(ws, {"text": ""})["tokens"] == 0
        answer = ask(ws, {"text": "\x00i 😀 am\x07 \u202ecoming\x1b home 🏠\r\n"})
    assert answer["tokens"] == 4
    assert_same_predictions(
        answer["predictions"], predict(client, "i am coming home")["predictions"]
    )


# --- bad messages ----------------------------------------------------------------

BAD_MESSAGES: list[tuple[str, str, Any]] = [
    ("not JSON", "hello there", None),
    ("truncated JSON", '{"text": "a", "id": 3', None),
    ("JSON list", '["a"]', None),
    ("JSON string", '"a"', None),
    ("deep nesting", "[" * 10_000, None),
    ("lone surrogate", '{"text": "\\ud800", "id": 4}', None),
    ("text missing", '{"id": 5}', 5),
    ("text a number", '{"text": 1, "id": 6}', 6),
    ("k = 0", '{"text": "a", "k": 0, "id": 7}', 7),
    ("k = 1000", '{"text": "a", "k": 1000, "id": 8}', 8),
    ("k a string", '{"text": "a", "k": "5", "id": 9}', 9),
    ("prefix a number", '{"text": "a", "prefix": 1, "id": 10}', 10),
    ("unknown type", '{"type": "rewind", "id": 11}', 11),
    ("reset with text", '{"type": "reset", "text": "a", "id": 12}', 12),
    ("unknown field", '{"text": "a", "model": "gru", "id": 13}', 13),
    ("text over max_text_chars", json.dumps({"text": "a " * 6000, "id": 14}), 14),
    ("too many tokens", json.dumps({"text": "a " * 3000, "id": 15}), 15),
]


def test_bad_messages_get_in_band_errors_and_the_connection_stays_open(
    client: TestClient,
) -> None:
    with (
        client.websocket_connect("/v1/stream") as other,
        client.websocket_connect("/v1/stream") as ws,
    ):
        other_sid = other.receive_json()["session_id"]
        ask(other, {"text": "we can"})
        ws.receive_json()
        ask(ws, {"text": "the cat"})
        for name, frame, message_id in BAD_MESSAGES:
            ws.send_text(frame)
            answer = ws.receive_json()
            assert answer["type"] == "error", name
            assert_in_band_error(answer, "bad_input", id=message_id)
        ws.send_bytes(b'{"text": "a"}')
        assert_in_band_error(ws.receive_json(), "bad_input")
        # Nothing was applied: the session holds "the cat" and goes on from there.
        answer = ask(ws, {"text": "and the dog", "id": "after"})
        assert answer["id"] == "after" and answer["tokens"] == 5
        assert_same_predictions(
            answer["predictions"], predict(client, "the cat and the dog")["predictions"]
        )
        # The other session is untouched.
        other_answer = ask(other, {"text": "make it"})
        assert other_answer["tokens"] == 4
        assert_same_predictions(
            other_answer["predictions"], predict(client, "we can make it")["predictions"]
        )
    assert client.get(f"/v1/sessions/{other_sid}").json()["tokens"] == 4


def test_over_size_frame_closes_with_1009_and_keeps_the_session(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream") as ws:
        sid = ws.receive_json()["session_id"]
        ask(ws, {"text": "i am"})
        ws.send_text(json.dumps({"text": "x" * 2_000_000}))
        assert_in_band_error(ws.receive_json(), "bad_input")
        assert_closed(ws, 1009)
    with client.websocket_connect(f"/v1/stream?session_id={sid}") as ws:
        ready = ws.receive_json()
    assert ready["tokens"] == 2
    assert_same_predictions(ready["predictions"], predict(client, "i am")["predictions"])


def test_websocket_metrics(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        ask(ws, {"text": "a"})
        ws.send_text("oops")
        ws.receive_json()
        text = client.get("/metrics").text
        assert "nextword_ws_connections 1.0" in text
    for line in (
        'nextword_ws_messages_total{type="ready"}',
        'nextword_ws_messages_total{type="predictions"}',
        'nextword_ws_messages_total{type="error"}',
        "nextword_ws_message_duration_seconds_count",
    ):
        assert line in text


# --- the predictor failing or slow -----------------------------------------------


def test_predictor_errors_are_in_band(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    async def overloaded(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise Overloaded("queue full")

    with client.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        monkeypatch.setattr(client.app.state.predictor, "feed", overloaded)  # type: ignore[attr-defined]
        assert_in_band_error(ask(ws, {"text": "a", "id": 1}), "overloaded", id=1)
        monkeypatch.undo()
        assert ask(ws, {"text": "a", "id": 2})["type"] == "predictions"


def test_unexpected_error_closes_with_1011(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise RuntimeError("bug")

    with client.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        monkeypatch.setattr(client.app.state.predictor, "feed", broken)  # type: ignore[attr-defined]
        assert_in_band_error(ask(ws, {"text": "a"}), "internal")
        assert_closed(ws, 1011)


def test_a_client_that_leaves_cancels_its_pending_step(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, cancelled = threading.Event(), threading.Event()

    async def slow_feed(*args: Any, **kwargs: Any) -> dict[str, Any]:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("not cancelled")

    with client.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        monkeypatch.setattr(client.app.state.predictor, "feed", slow_feed)  # type: ignore[attr-defined]
        ws.send_json({"text": "a"})
        assert started.wait(10)
    assert cancelled.wait(10)


def test_an_integral_float_k_is_an_integer_as_over_rest(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        assert len(ask(ws, {"text": "i", "k": 3.0})["predictions"]) == 3
        assert_in_band_error(ask(ws, {"text": "i", "k": 2.5, "id": 1}), id=1)


def test_a_message_sent_again_with_its_id_is_answered_not_applied_twice(
    client: TestClient,
) -> None:
    with client.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        first = ask(ws, {"text": "the cat", "id": "m-1"})
        again = ask(ws, {"text": "the cat", "id": "m-1"})  # a retry: its answer was lost
        assert again["tokens"] == first["tokens"] == 2
        assert_same_predictions(again["predictions"], first["predictions"])
        assert ask(ws, {"text": "the cat", "id": "m-2"})["tokens"] == 4
        assert ask(ws, {"type": "reset", "id": 9})["tokens"] == 0
        assert ask(ws, {"text": "sat", "id": 10})["tokens"] == 1
        assert ask(ws, {"type": "reset", "id": 9})["tokens"] == 0  # not the last step: applied
