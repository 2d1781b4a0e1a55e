"""service.api.lean: the fast path of predict and feed answers as FastAPI's path does.

A body sent as `application/json` takes the fast path; the same body as
`application/vnd.test+json` is JSON to FastAPI but not to the fast path, so it is answered
by FastAPI's handler: the two answers are compared. The fast path runs ahead of the router
(`DirectRoutes`): metrics, errors, body limits and the root path act on it as on the other.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import service.api.app as app_module
import service.api.routes as routes
from service.api import create_app
from tests.api_support import api_settings

PLAIN = {"Content-Type": "application/json"}
FASTAPI_ONLY = {"Content-Type": "application/vnd.test+json"}


@pytest.fixture
def fast_answers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Every answer the fast handlers send, as they send it."""
    sent: list[dict[str, Any]] = []
    original = routes.json_response

    def record(answer: dict[str, Any], status_code: int = 200) -> Any:
        sent.append(answer)
        return original(answer, status_code)

    monkeypatch.setattr(routes, "json_response", record)
    yield sent


def post(client: TestClient, path: str, body: str, headers: dict[str, str]) -> Any:
    return client.post(path, content=body.encode(), headers=headers)


@pytest.mark.parametrize(
    "body",
    [
        '{"text": "I am going to the"}',
        '{"text": "the", "k": 3, "prefix": "Ca", "adapt": false, "model": "gru"}',
        '{"text": "", "k": 50, "prefix": null, "model": null, "adapt": null}',
        '{"text": "caf\\u00e9 \\ud83d\\ude00 and", "k": 2}',
    ],
)
def test_predict_answers_alike_on_both_paths(
    client: TestClient, fast_answers: list[dict[str, Any]], body: str
) -> None:
    fast = post(client, "/v1/predict", body, PLAIN)
    assert len(fast_answers) == 1  # it took the fast path
    full = post(client, "/v1/predict", body, FASTAPI_ONLY)
    assert len(fast_answers) == 1  # that one did not
    assert fast.status_code == full.status_code == 200
    assert fast.headers["content-type"] == full.headers["content-type"] == "application/json"
    assert fast.json() == full.json()


def test_feed_answers_alike_on_both_paths(
    client: TestClient, fast_answers: list[dict[str, Any]]
) -> None:
    answers = []
    for headers in (PLAIN, FASTAPI_ONLY):
        session = client.post("/v1/sessions", json={"text": "we will"}).json()["session_id"]
        path = f"/v1/sessions/{session}/feed"
        first = post(client, path, '{"text": "see you", "k": 4, "prefix": "t"}', headers)
        again = post(client, path, '{"text": "there"}', {**headers, "Idempotency-Key": "a"})
        retry = post(client, path, '{"text": "there"}', {**headers, "Idempotency-Key": "a"})
        assert first.status_code == again.status_code == retry.status_code == 200
        assert retry.json()["tokens"] == again.json()["tokens"]  # a retry: not applied twice
        answers.append(
            [{k: v for k, v in r.json().items() if k != "session_id"} for r in (first, again)]
        )
    assert len(fast_answers) == 3
    assert answers[0] == answers[1]


@pytest.mark.parametrize(
    "body",
    [
        '{"text": "a", "k": "5"}',  # no coercion
        '{"text": "a", "k": 0}',
        '{"text": "a", "k": true}',
        '{"text": "a", "extra": 1}',
        '{"k": 3}',
        '{"text": null}',
        '["text"]',
        '{"text": "a", "adapt": "yes"}',
        '{"text": "\\ud800"}',
        "{not json",
        "",
    ],
)
def test_what_the_fast_path_refuses_gets_fastapis_answer(
    client: TestClient, fast_answers: list[dict[str, Any]], body: str
) -> None:
    fast = post(client, "/v1/predict", body, PLAIN)
    full = post(client, "/v1/predict", body, FASTAPI_ONLY)
    assert not fast_answers
    assert fast.status_code in (400, 422) or body == '{"text": "\\ud800"}'
    if body not in ("{not json", ""):  # the error text says where JSON broke: same offsets
        assert (fast.status_code, fast.json()) == (full.status_code, full.json())


def test_an_integral_float_k_is_taken_as_before(
    client: TestClient, fast_answers: list[dict[str, Any]]
) -> None:
    answer = post(client, "/v1/predict", '{"text": "the", "k": 3.0}', PLAIN)
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 3
    assert not fast_answers  # FastAPI's path (the schema's integral float)


def test_feed_limits_of_path_and_header_stay_fastapis(
    client: TestClient, fast_answers: list[dict[str, Any]]
) -> None:
    too_long = "x" * 129
    answer = post(client, f"/v1/sessions/{too_long}/feed", '{"text": "a"}', PLAIN)
    assert answer.status_code == 422
    session = client.post("/v1/sessions", json={}).json()["session_id"]
    answer = post(
        client,
        f"/v1/sessions/{session}/feed",
        '{"text": "a"}',
        {**PLAIN, "Idempotency-Key": "k" * 129},
    )
    assert answer.status_code == 422
    assert answer.json()["error"]["code"] == "bad_input"
    assert not fast_answers


# --- the direct path (service.api.lean.DirectRoutes): the same middleware effects --------------


def request_counts(client: TestClient, route: str) -> dict[str, float]:
    """`nextword_http_requests_total` of a route template, by status."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "nextword_http_requests_total" and sample.labels["route"] == route:
                status = sample.labels["status"]
                found[status] = found.get(status, 0.0) + sample.value
    return found


def test_direct_answers_are_counted_under_their_route_template(
    client: TestClient, fast_answers: list[dict[str, Any]]
) -> None:
    session = client.post("/v1/sessions", json={}).json()["session_id"]
    feed = "/v1/sessions/{session_id}/feed"
    before = request_counts(client, "/v1/predict"), request_counts(client, feed)
    assert post(client, "/v1/predict", '{"text": "the"}', PLAIN).status_code == 200
    assert post(client, f"/v1/sessions/{session}/feed", '{"text": "a"}', PLAIN).status_code == 200
    unknown = post(client, "/v1/sessions/nope/feed", '{"text": "a"}', PLAIN)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_session"
    after = request_counts(client, "/v1/predict"), request_counts(client, feed)
    assert len(fast_answers) == 2
    assert after[0].get("200", 0) - before[0].get("200", 0) == 1
    assert after[1].get("200", 0) - before[1].get("200", 0) == 1
    assert after[1].get("404", 0) - before[1].get("404", 0) == 1


def test_errors_on_the_direct_path_are_the_routers(
    client: TestClient, fast_answers: list[dict[str, Any]]
) -> None:
    for headers in (PLAIN, FASTAPI_ONLY):
        model = post(client, "/v1/predict", '{"text": "a", "model": "nope"}', headers)
        session = post(client, "/v1/sessions/nope/feed", '{"text": "a"}', headers)
        assert (model.status_code, model.json()["error"]["code"]) == (404, "unknown_model")
        assert (session.status_code, session.json()["error"]["code"]) == (404, "unknown_session")
    # Not the route's path or method: the router answers (a redirect, 405).
    slash = client.post(
        "/v1/predict/", content=b'{"text": "a"}', headers=PLAIN, follow_redirects=False
    )
    wrong_method = client.get("/v1/predict")
    assert slash.status_code == 307 and slash.headers["location"].endswith("/v1/predict")
    assert wrong_method.status_code == 405
    assert not fast_answers  # unknown names raise before an answer is sent


def test_a_streamed_body_over_the_limit_gets_413_on_the_direct_path(
    tiny_artifacts: Path, fast_answers: list[dict[str, Any]]
) -> None:
    settings = api_settings(tiny_artifacts, max_text_chars=10)
    with TestClient(create_app(settings)) as small:
        chunks = [b'{"text": "', b"a" * 5000, b'"}']
        for headers in (PLAIN, FASTAPI_ONLY):
            # No Content-Length: the body limit counts it as it is read, by the fast handler.
            answer = small.post("/v1/predict", content=iter(chunks), headers=headers)
            assert answer.status_code == 413
            assert answer.json()["error"]["code"] == "too_large"
    assert not fast_answers


def test_the_direct_path_follows_the_root_path(
    tiny_artifacts: Path, fast_answers: list[dict[str, Any]]
) -> None:
    with TestClient(create_app(api_settings(tiny_artifacts)), root_path="/api") as proxied:
        # As uvicorn with --root-path gives it: the path with the root in front.
        answer = proxied.post("/api/v1/predict", content=b'{"text": "the"}', headers=PLAIN)
        assert answer.status_code == 200
    assert len(fast_answers) == 1


def test_the_openapi_document_is_the_same_without_the_direct_path(
    client: TestClient, tiny_artifacts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "install_direct_routes", lambda *args: None)
    plain = create_app(api_settings(tiny_artifacts))
    assert client.app.openapi() == plain.openapi()  # type: ignore[attr-defined]
