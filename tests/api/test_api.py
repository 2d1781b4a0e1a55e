"""REST API v1 over the real predictor and the tiny ONNX models (`service.api.routes`)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.errors import EngineRestarting, Overloaded, StepFailed, StoreUnavailable
from tests.api_support import TEXTS, api_settings, assert_same_predictions, splits

MODELS = ["lstm", "gru"]


@pytest.fixture(scope="module")
def client(tiny_artifacts: Path) -> Any:
    """One app (lifespan and batchers running) for the whole module."""
    with TestClient(create_app(api_settings(tiny_artifacts))) as client:
        yield client


def predict(
    client: TestClient, text: str, model: str | None = None, k: int = 5, prefix: str | None = None
) -> dict[str, Any]:
    r = client.post("/v1/predict", json={"text": text, "k": k, "model": model, "prefix": prefix})
    assert r.status_code == 200, r.text
    return r.json()


def new_session(
    client: TestClient, text: str = "", model: str | None = None, k: int = 5
) -> dict[str, Any]:
    r = client.post("/v1/sessions", json={"text": text, "model": model, "k": k})
    assert r.status_code == 201, r.text
    return r.json()


def feed(client: TestClient, session_id: str, text: str, k: int = 5) -> dict[str, Any]:
    r = client.post(f"/v1/sessions/{session_id}/feed", json={"text": text, "k": k})
    assert r.status_code == 200, r.text
    return r.json()


def assert_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


# --- operations ------------------------------------------------------------------


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_readyz_is_503_while_not_ready_or_store_down(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    predictor = client.app.state.predictor  # type: ignore[attr-defined]

    async def store_down() -> None:
        raise StoreUnavailable("redis at 127.0.0.1:6379 does not answer")

    monkeypatch.setattr(predictor, "check_ready", store_down)
    assert_error(client.get("/readyz"), 503, "store_unavailable")
    monkeypatch.undo()
    monkeypatch.setattr(predictor, "ready", False)
    assert_error(client.get("/readyz"), 503, "not_ready")
    monkeypatch.undo()
    assert client.get("/readyz").status_code == 200
    assert client.get("/healthz").status_code == 200


def test_metrics_exposes_latency_per_route_and_engine_metrics(client: TestClient) -> None:
    predict(client, "i am")
    client.get("/v1/sessions/no-such-session")
    text = client.get("/metrics").text
    assert 'nextword_http_request_duration_seconds_count{method="POST",route="/v1/predict"}' in text
    assert (
        'nextword_http_requests_total{method="GET",route="/v1/sessions/{session_id}",status="404"}'
    ) in text
    for name in (
        "nextword_ws_messages_total",
        "nextword_ws_connections",
        "nextword_batch_size",
        "nextword_steps_total",
        "nextword_active_sessions",
    ):
        assert name in text


def test_openapi_documents_limits_and_examples(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path in (
        "/v1/predict",
        "/v1/sessions",
        "/v1/sessions/{session_id}/feed",
        "/v1/sessions/{session_id}",
        "/v1/models",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in schema["paths"], path
    body = schema["components"]["schemas"]["PredictRequest"]
    assert body["properties"]["text"]["maxLength"] == 10_000  # Settings.max_text_chars
    k = body["properties"]["k"]
    assert (k["minimum"], k["maximum"]) == (1, 50)
    assert body["examples"]
    assert client.get("/docs").status_code == 200


# --- models and stateless predictions --------------------------------------------


def test_models(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["default"] == "lstm"
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == {"lstm", "gru"}
    assert by_name["lstm"]["cell"] == "lstm" and by_name["gru"]["cell"] == "gru"
    for model in by_name.values():
        for field in ("vocab_size", "layers", "hidden_size"):
            assert isinstance(model[field], int) and model[field] > 0


@pytest.mark.parametrize("model", MODELS)
def test_predict(client: TestClient, model: str) -> None:
    body = predict(client, "I am coming home", model=model, k=7)
    assert body["model"] == model and body["tokens"] == 4
    words = [p["word"] for p in body["predictions"]]
    probs = [p["probability"] for p in body["predictions"]]
    assert len(words) == 7 and len(set(words)) == 7
    assert all(0 < p <= 1 for p in probs) and probs == sorted(probs, reverse=True)
    assert not {"<unk>", "</s>", "<pad>", ",", ";", ":"} & set(words)


def test_predict_defaults_to_the_default_model(client: TestClient) -> None:
    r = client.post("/v1/predict", json={"text": "i am"})
    assert r.status_code == 200 and r.json()["model"] == "lstm"
    assert len(r.json()["predictions"]) == 5


def test_predict_with_prefix(client: TestClient) -> None:
    body = predict(client, "i am", k=50, prefix="T")
    words = [p["word"] for p in body["predictions"]]
    # The capital typed is kept (a one-letter prefix has no corrections).
    assert words and all(w.startswith("T") for w in words)
    unrestricted = {
        p["word"]: p["probability"] for p in predict(client, "i am", k=50)["predictions"]
    }
    for p in body["predictions"]:  # not renormalised
        if p["word"].lower() in unrestricted:
            assert abs(p["probability"] - unrestricted[p["word"].lower()]) <= 1e-6
    assert predict(client, "i am", prefix="zzzz")["predictions"] == []


def test_empty_text_is_valid(client: TestClient) -> None:
    body = predict(client, "")
    assert body["tokens"] == 0 and len(body["predictions"]) == 5
    session = new_session(client)
    assert session["tokens"] == 0
    assert_same_predictions(session["predictions"], body["predictions"])


def test_emoji_and_control_characters_are_dropped_like_the_tokenizer_does(
    client: TestClient,
) -> None:
    clean = predict(client, "i am coming home")
    noisy = predict(client, "\x00i 😀 am\x07 \u202ecoming\x1b home 🏠\r\n")
    assert noisy["tokens"] == 4
    assert_same_predictions(noisy["predictions"], clean["predictions"])


# --- sessions --------------------------------------------------------------------


def test_session_lifecycle(client: TestClient) -> None:
    r = client.post("/v1/sessions", json={"text": "i am", "k": 3})
    assert r.status_code == 201
    session = r.json()
    sid = session["session_id"]
    assert r.headers["location"] == f"/v1/sessions/{sid}"
    assert len(sid) >= 20 and session["model"] == "lstm" and session["tokens"] == 2
    assert len(session["predictions"]) == 3

    fed = feed(client, sid, "coming home")
    assert fed["session_id"] == sid and fed["tokens"] == 4 and fed["model"] == "lstm"

    info = client.get(f"/v1/sessions/{sid}").json()
    assert info["session_id"] == sid and info["model"] == "lstm" and info["tokens"] == 4
    created = datetime.fromisoformat(info["created_at"])
    used = datetime.fromisoformat(info["last_used_at"])
    assert created.utcoffset() is not None and created <= used

    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    assert_error(client.get(f"/v1/sessions/{sid}"), 404, "unknown_session")
    assert_error(
        client.post(f"/v1/sessions/{sid}/feed", json={"text": "a"}), 404, "unknown_session"
    )
    assert_error(client.delete(f"/v1/sessions/{sid}"), 404, "unknown_session")


def test_create_session_without_body(client: TestClient) -> None:
    r = client.post("/v1/sessions")
    assert r.status_code == 201 and r.json()["tokens"] == 0


def test_feeding_empty_text_repeats_the_current_predictions(client: TestClient) -> None:
    session = new_session(client, "the cat and the dog")
    again = feed(client, session["session_id"], "")
    assert again["tokens"] == 5
    assert_same_predictions(again["predictions"], session["predictions"])


@pytest.mark.parametrize("path", ["/v1/sessions/{sid}", "/v1/sessions/{sid}/feed"])
def test_unknown_session_is_404(client: TestClient, path: str) -> None:
    url = path.format(sid="AAAAAAAAAAAAAAAAAAAAAA")
    r = client.post(url, json={"text": "a"}) if url.endswith("feed") else client.get(url)
    assert_error(r, 404, "unknown_session")


def test_expired_session_is_404(tiny_artifacts: Path) -> None:
    settings = api_settings(tiny_artifacts, session_ttl_s=0.2)
    with TestClient(create_app(settings)) as client:
        sid = new_session(client, "i am")["session_id"]
        assert client.get(f"/v1/sessions/{sid}").status_code == 200
        time.sleep(0.35)
        assert_error(client.get(f"/v1/sessions/{sid}"), 404, "unknown_session")
        assert_error(client.post(f"/v1/sessions/{sid}/feed", json={"text": "a"}), 404)


# --- the invariant ---------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("text_index", range(len(TEXTS)))
def test_session_fed_in_any_split_equals_predict_on_the_whole_text(
    client: TestClient, model: str, text_index: int
) -> None:
    text = TEXTS[text_index]
    for name, chunks in splits(text, seed=text_index).items():
        sid = new_session(client, model=model, k=8)["session_id"]
        fed_so_far: list[str] = []
        for chunk in chunks:
            answer = feed(client, sid, chunk, k=8)
            fed_so_far.append(chunk)
            whole = predict(client, " ".join(fed_so_far), model=model, k=8)
            assert answer["tokens"] == whole["tokens"], name
            assert_same_predictions(answer["predictions"], whole["predictions"])
        client.delete(f"/v1/sessions/{sid}")


def test_session_created_with_text_equals_predict(client: TestClient) -> None:
    for model in MODELS:
        session = new_session(client, TEXTS[1], model=model)
        whole = predict(client, TEXTS[1], model=model)
        assert session["tokens"] == whole["tokens"]
        assert_same_predictions(session["predictions"], whole["predictions"])


def test_64_concurrent_sessions_equal_each_alone(client: TestClient) -> None:
    """Batching changes nothing: concurrent feeds (batched together) == sequential predicts."""
    jobs = [(MODELS[i % 2], TEXTS[i % len(TEXTS)].split()[: 3 + i % 7]) for i in range(64)]

    def run(job: tuple[str, list[str]]) -> list[dict[str, Any]]:
        model, words = job
        sid = new_session(client, model=model)["session_id"]
        return [feed(client, sid, word) for word in words]

    with ThreadPoolExecutor(max_workers=64) as pool:
        concurrent = list(pool.map(run, jobs))
    for (model, words), answers in zip(jobs, concurrent):
        for n, answer in enumerate(answers, 1):
            alone = predict(client, " ".join(words[:n]), model=model)
            assert answer["tokens"] == alone["tokens"]
            assert_same_predictions(answer["predictions"], alone["predictions"])


# --- bad input -------------------------------------------------------------------

JSON = {"content-type": "application/json"}
BAD_PREDICT_BODIES: list[tuple[str, Any, int]] = [
    ("text too long", {"text": "a " * 6000}, 422),
    ("text 2 MB", {"text": "x" * 2_000_000}, 413),
    ("text not a string", {"text": 42}, 422),
    ("text null", {"text": None}, 422),
    ("text missing", {"k": 5}, 422),
    ("k = 0", {"text": "a", "k": 0}, 422),
    ("k = 1000", {"text": "a", "k": 1000}, 422),
    ("k a string", {"text": "a", "k": "5"}, 422),
    ("k a float", {"text": "a", "k": 2.5}, 422),
    ("k a bool", {"text": "a", "k": True}, 422),
    ("model not a string", {"text": "a", "model": 1}, 422),
    ("prefix a list", {"text": "a", "prefix": ["t"]}, 422),
    ("unknown field", {"text": "a", "temperature": 0.7}, 422),
    ("a JSON list", ["i am"], 422),
    ("a JSON string", "i am", 422),
    ("unknown model", {"text": "a", "model": "transformer"}, 404),
]


@pytest.mark.parametrize(
    ("body", "status"),
    [(b, s) for _, b, s in BAD_PREDICT_BODIES],
    ids=[name for name, _, _ in BAD_PREDICT_BODIES],
)
def test_bad_predict_body_is_a_json_4xx(client: TestClient, body: Any, status: int) -> None:
    assert_error(client.post("/v1/predict", json=body), status)


@pytest.mark.parametrize(
    ("content", "headers", "status"),
    [
        (b"{not json", JSON, 400),
        (b"", JSON, 422),
        (b"[" * 50_000, JSON, 400),  # nesting deeper than the parser's recursion limit
        (b'{"text": "\xff\xfe"}', JSON, 400),  # not UTF-8
        (b'{"text": "\\ud800 a"}', JSON, 422),  # a lone surrogate
        (b"i am coming", {"content-type": "text/plain"}, 422),
    ],
    ids=["not JSON", "empty body", "deep nesting", "not UTF-8", "lone surrogate", "text/plain"],
)
def test_unparsable_body_is_a_json_4xx(
    client: TestClient, content: bytes, headers: dict[str, str], status: int
) -> None:
    assert_error(client.post("/v1/predict", content=content, headers=headers), status, "bad_input")


def test_body_over_the_limit_without_content_length_is_413(client: TestClient) -> None:
    def chunks() -> Any:
        yield b'{"text": "'
        for _ in range(200):
            yield b"x" * 1000
        yield b'"}'

    assert_error(client.post("/v1/predict", content=chunks(), headers=JSON), 413, "too_large")


@pytest.mark.parametrize(
    "body",
    [
        {"text": 1},
        {"text": "a", "k": 0},
        {"text": "a", "k": 1000},
        {"text": "a", "model": "x"},
        {"text": "x" * 20_000},
    ],
)
def test_bad_session_bodies_are_4xx(client: TestClient, body: dict[str, Any]) -> None:
    r = client.post("/v1/sessions", json=body)
    assert 400 <= r.status_code < 500 and "error" in r.json()
    sid = new_session(client)["session_id"]
    r = client.post(f"/v1/sessions/{sid}/feed", json=body)  # "model" is not a feed field
    assert 400 <= r.status_code < 500 and "error" in r.json()


def test_too_many_tokens_is_422(client: TestClient) -> None:
    assert_error(client.post("/v1/predict", json={"text": "a " * 4000}), 422, "bad_input")


def test_long_session_id_is_422(client: TestClient) -> None:
    assert_error(client.get("/v1/sessions/" + "a" * 500), 422, "bad_input")


def test_bad_input_leaves_other_sessions_untouched(client: TestClient) -> None:
    session = new_session(client, "the cat and the dog", k=5)
    sid = session["session_id"]
    for _, body, _ in BAD_PREDICT_BODIES:
        client.post("/v1/predict", json=body)
        if isinstance(body, dict):
            client.post(f"/v1/sessions/{sid}/feed", json=body)
    client.post(f"/v1/sessions/{sid}/feed", content=b"{oops", headers=JSON)
    info = client.get(f"/v1/sessions/{sid}").json()
    assert info["tokens"] == 5
    answer = feed(client, sid, "went home")
    assert_same_predictions(
        answer["predictions"], predict(client, "the cat and the dog went home")["predictions"]
    )


def test_unknown_path_and_method_are_json(client: TestClient) -> None:
    assert_error(client.get("/v2/predict"), 404, "not_found")
    assert_error(client.put("/v1/predict", json={}), 405, "method_not_allowed")


# --- errors from the predictor ---------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (Overloaded("queue full"), 503, "overloaded"),
        (StoreUnavailable("redis down"), 503, "store_unavailable"),
        (StepFailed("run failed"), 500, "step_failed"),
    ],
)
def test_predictor_errors_map_to_their_status(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, error: Exception, status: int, code: str
) -> None:
    async def failing(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise error

    monkeypatch.setattr(client.app.state.predictor, "predict", failing)  # type: ignore[attr-defined]
    r = client.post("/v1/predict", json={"text": "a"})
    assert_error(r, status, code)
    if status == 503:
        assert r.headers["retry-after"] == "1"


@pytest.mark.parametrize("maybe_applied", [False, True])
def test_engine_restarting_says_when_to_retry_and_whether_it_applied(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, maybe_applied: bool
) -> None:
    predictor = client.app.state.predictor  # type: ignore[attr-defined]
    feed = predictor.feed

    async def restarting(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise EngineRestarting("the engine process died", 2.5, maybe_applied)

    with client.websocket_connect("/v1/stream") as ws:
        session = ws.receive_json()["session_id"]
        monkeypatch.setattr(predictor, "feed", restarting)
        r = client.post(f"/v1/sessions/{session}/feed", json={"text": "a"})
        assert_error(r, 503, "engine_restarting")
        assert r.headers["retry-after"] == "3"  # whole seconds, rounded up
        assert r.json()["error"]["retry_after_ms"] == 2500
        assert r.json()["error"]["maybe_applied"] is maybe_applied

        ws.send_json({"text": "a", "id": 7})  # in-band, and the connection stays open
        answer = ws.receive_json()
        assert answer["type"] == "error" and answer["id"] == 7
        assert answer["error"]["code"] == "engine_restarting"
        assert answer["error"]["retry_after_ms"] == 2500
        assert answer["error"]["maybe_applied"] is maybe_applied
        monkeypatch.setattr(predictor, "feed", feed)
        ws.send_json({"text": "a", "id": 8})
        assert ws.receive_json()["type"] == "predictions"


def test_unexpected_error_is_a_json_500(tiny_artifacts: Path) -> None:
    async def broken(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise RuntimeError("bug")

    app = create_app(api_settings(tiny_artifacts))
    with TestClient(app, raise_server_exceptions=False) as client:
        client.app.state.predictor.predict = broken  # type: ignore[attr-defined]
        assert_error(client.post("/v1/predict", json={"text": "a"}), 500, "internal")
        assert client.get("/healthz").status_code == 200


def test_lifespan_closes_the_predictor(tiny_artifacts: Path) -> None:
    app = create_app(api_settings(tiny_artifacts))
    with TestClient(app) as client:
        predictor = app.state.predictor
        assert predictor.ready and client.get("/readyz").status_code == 200
    assert app.state.predictor is None and not predictor.ready
    with TestClient(app) as client:  # a restart starts a fresh predictor
        assert client.get("/readyz").status_code == 200


def test_a_feed_sent_again_with_its_idempotency_key_is_not_applied_twice(client: Any) -> None:
    sid = client.post("/v1/sessions", json={"text": "the"}).json()["session_id"]
    key = {"Idempotency-Key": "feed-1"}
    first = client.post(f"/v1/sessions/{sid}/feed", json={"text": "cat sat"}, headers=key)
    again = client.post(f"/v1/sessions/{sid}/feed", json={"text": "cat sat"}, headers=key)
    assert first.status_code == again.status_code == 200
    # The same answer (to batching's float rounding), the context unchanged.
    assert again.json()["tokens"] == first.json()["tokens"]
    assert_same_predictions(again.json()["predictions"], first.json()["predictions"])
    assert client.get(f"/v1/sessions/{sid}").json()["tokens"] == first.json()["tokens"]
    # Another text under the same key is another step; no key: always applied.
    other = client.post(f"/v1/sessions/{sid}/feed", json={"text": "on"}, headers=key)
    assert other.json()["tokens"] == first.json()["tokens"] + 1
    plain = [client.post(f"/v1/sessions/{sid}/feed", json={"text": "on"}) for _ in range(2)]
    assert [p.json()["tokens"] for p in plain] == [other.json()["tokens"] + i for i in (1, 2)]
    too_long = client.post(
        f"/v1/sessions/{sid}/feed", json={"text": "on"}, headers={"Idempotency-Key": "x" * 200}
    )
    assert too_long.status_code == 422
