"""API keys, session ownership, rate limits and what the logs never show (service/api/auth.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from service.api import create_app
from service.api.auth import ApiKeyError, ApiKeys, RateLimiter
from service.logs import RedactIds
from tests.api_support import api_settings

ALICE = "alice-key-0123456789"
BOB = "bob-key-0123456789ab"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def client(tiny_artifacts: Path) -> Any:
    settings = api_settings(
        tiny_artifacts, api_keys=f"alice:{ALICE},bob:{BOB}", protect_metrics=True
    )
    with TestClient(create_app(settings)) as client:
        yield client


def assert_unauthorized(response: Any) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_keys_parse_from_a_list_or_a_file(tmp_path: Path) -> None:
    keys = ApiKeys.parse(f"alice:{ALICE}, bob:{BOB}")
    assert keys is not None
    assert keys.owner(ALICE) == "alice" and keys.owner(BOB) == "bob"
    assert keys.owner("alice") is None and keys.owner("") is None and keys.owner(None) is None
    assert all(ALICE not in repr(entry) for entry in keys.names)  # digests only
    path = tmp_path / "keys"
    path.write_text(f"# who may call\nalice:{ALICE}\n\nbob:{BOB}  # the second\n")
    from_file = ApiKeys.parse(f"@{path}")
    assert from_file is not None and from_file.owner(BOB) == "bob"
    assert ApiKeys.parse("") is None
    for bad in ("alice", "alice:short", f"no spaces allowed:{ALICE}", f"@{tmp_path / 'none'}"):
        with pytest.raises(ApiKeyError):
            ApiKeys.parse(bad)


def test_every_v1_route_needs_a_key(client: TestClient) -> None:
    assert_unauthorized(client.post("/v1/predict", json={"text": "i am"}))
    assert_unauthorized(client.post("/v1/predict", json={"text": "i am"}, headers=bearer("x" * 20)))
    assert_unauthorized(client.get("/v1/models", headers={"Authorization": f"Basic {ALICE}"}))
    assert_unauthorized(client.get("/metrics"))
    ok = client.post("/v1/predict", json={"text": "i am"}, headers=bearer(ALICE))
    assert ok.status_code == 200 and ok.json()["tokens"] == 2
    assert client.get("/metrics", headers=bearer(BOB)).status_code == 200
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_a_session_belongs_to_the_key_that_made_it(client: TestClient) -> None:
    made = client.post("/v1/sessions", json={"text": "i am"}, headers=bearer(ALICE))
    assert made.status_code == 201
    sid = made.json()["session_id"]
    path = f"/v1/sessions/{sid}"
    for method, url, body in (
        ("POST", f"{path}/feed", {"text": "coming"}),
        ("GET", path, None),
        ("DELETE", path, None),
    ):
        r = client.request(method, url, json=body, headers=bearer(BOB))
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_session", r.text
    fed = client.post(f"{path}/feed", json={"text": "coming"}, headers=bearer(ALICE))
    assert fed.status_code == 200 and fed.json()["tokens"] == 3 and fed.json()["session_id"] == sid
    assert client.get(path, headers=bearer(ALICE)).json()["session_id"] == sid


def test_a_key_past_its_session_quota_loses_its_own_oldest_session(tiny_artifacts: Path) -> None:
    settings = api_settings(
        tiny_artifacts, api_keys=f"alice:{ALICE},bob:{BOB}", max_sessions_per_key=2
    )
    with TestClient(create_app(settings)) as client:

        def create(key: str) -> str:
            made = client.post("/v1/sessions", json={"text": "i am"}, headers=bearer(key))
            assert made.status_code == 201, made.text
            return str(made.json()["session_id"])

        bobs = create(BOB)
        alices = [create(ALICE) for _ in range(5)]
        status = [
            client.get(f"/v1/sessions/{sid}", headers=bearer(ALICE)).status_code for sid in alices
        ]
        assert status == [404, 404, 404, 200, 200]  # only alice's newest two are left
        assert client.get(f"/v1/sessions/{bobs}", headers=bearer(BOB)).status_code == 200


def test_an_open_service_caps_sessions_per_client_address(tiny_artifacts: Path) -> None:
    with TestClient(create_app(api_settings(tiny_artifacts, max_sessions_per_key=1))) as client:
        first = client.post("/v1/sessions", json={"text": "i"}).json()["session_id"]
        second = client.post("/v1/sessions", json={"text": "i"}).json()["session_id"]
        assert client.get(f"/v1/sessions/{first}").status_code == 404
        assert client.get(f"/v1/sessions/{second}").status_code == 200


def test_the_stream_takes_the_header_or_an_access_token(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream") as ws:
        assert ws.receive_json()["error"]["code"] == "unauthorized"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 4401
    with client.websocket_connect(f"/v1/stream?access_token={ALICE}") as ws:
        sid = ws.receive_json()["session_id"]
        ws.send_json({"text": "i am"})
        assert ws.receive_json()["tokens"] == 2
    with client.websocket_connect(f"/v1/stream?session_id={sid}", headers=bearer(BOB)) as ws:
        assert ws.receive_json()["error"]["code"] == "unknown_session"  # not Bob's
    with client.websocket_connect(f"/v1/stream?session_id={sid}", headers=bearer(ALICE)) as ws:
        assert ws.receive_json()["tokens"] == 2


def test_over_the_rate_a_key_gets_429_then_recovers(tiny_artifacts: Path) -> None:
    settings = api_settings(tiny_artifacts, api_keys=f"alice:{ALICE}", rate_limit=2.0, rate_burst=3)
    with TestClient(create_app(settings)) as client:
        answers = [
            client.post("/v1/predict", json={"text": "i"}, headers=bearer(ALICE)).status_code
            for _ in range(6)
        ]
        assert answers[:3] == [200, 200, 200] and 429 in answers[3:]
        limited = client.post("/v1/predict", json={"text": "i"}, headers=bearer(ALICE))
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "rate_limited"
        assert int(limited.headers["retry-after"]) >= 1
        with client.websocket_connect("/v1/stream", headers=bearer(ALICE)) as ws:
            first = ws.receive_json()
            if first["type"] == "error":  # the connect itself was over the rate
                assert first["error"]["code"] == "rate_limited"
                return
            ws.send_json({"text": "i", "id": 1})
            answer = ws.receive_json()
            assert answer["type"] == "error" and answer["error"]["code"] == "rate_limited"
            assert answer["error"]["retry_after_ms"] > 0 and answer["id"] == 1


def test_the_token_bucket() -> None:
    now = [0.0]
    bucket = RateLimiter(rate=2.0, burst=2.0, clock=lambda: now[0])
    assert [bucket.take("a") for _ in range(2)] == [0.0, 0.0]
    assert bucket.take("a") == pytest.approx(0.5)
    assert bucket.take("b") == 0.0  # owners are apart
    now[0] += 0.5
    assert bucket.take("a") == 0.0


def test_logs_never_show_session_ids_or_tokens() -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "POST", "/v1/sessions/AbC-123_x/feed?k=3", "1.1", 200),
        None,
    )
    RedactIds().filter(record)
    assert "AbC-123_x" not in record.getMessage() and "/v1/sessions/***/feed" in record.getMessage()
    record = logging.LogRecord(
        "uvicorn.error",
        logging.INFO,
        __file__,
        1,
        '%s - "WebSocket %s" [accepted]',
        ("127.0.0.1:5", f"/v1/stream?session_id=s3cret&access_token={ALICE}"),
        None,
    )
    RedactIds().filter(record)
    assert "s3cret" not in record.getMessage() and ALICE not in record.getMessage()


def test_serve_refuses_bad_keys_and_warns_when_open(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service import cli
    from service.config import Settings

    with pytest.raises(SystemExit, match="name:key"):
        cli.check_exposure(Settings(api_keys="nonsense"))
    cli.check_exposure(Settings(host="0.0.0.0"))
    assert "without API keys" in capsys.readouterr().err
    cli.check_exposure(Settings(host="0.0.0.0", api_keys=f"alice:{ALICE}"))
    cli.check_exposure(Settings(host="127.0.0.1"))
    assert capsys.readouterr().err == ""


def test_the_access_log_is_redacted() -> None:
    import logging.config

    from service.cli import uvicorn_log_config

    logging.config.dictConfig(uvicorn_log_config("info"))
    handler = logging.getLogger("uvicorn.access").handlers[0]
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, "%s", ("GET /v1/sessions/s3cret",), None
    )
    assert all(f.filter(record) for f in handler.filters)
    assert "s3cret" not in record.getMessage()


@pytest.mark.parametrize("keys", [True, False])
def test_every_step_names_whose_queue_share_it_takes(tiny_artifacts: Path, keys: bool) -> None:
    settings = api_settings(tiny_artifacts, api_keys=f"alice:{ALICE}" if keys else "")
    headers = {"Authorization": f"Bearer {ALICE}"} if keys else {}
    with TestClient(create_app(settings)) as client:
        engine = client.app.state.predictor.engine  # type: ignore[attr-defined]
        clients: list[str] = []
        call = engine.call

        async def recording(request: Any) -> Any:
            clients.append(getattr(request, "client", None))
            return await call(request)

        engine.call = recording
        assert client.post("/v1/predict", json={"text": "the"}, headers=headers).status_code == 200
        made = client.post("/v1/sessions", json={"text": "the"}, headers=headers)
        sid = made.json()["session_id"]
        fed = client.post(f"/v1/sessions/{sid}/feed", json={"text": "cat"}, headers=headers)
        assert fed.status_code == 200
        with client.websocket_connect("/v1/stream", headers=headers) as ws:
            ws.receive_json()
            ws.send_json({"text": "the"})
            assert ws.receive_json()["type"] == "predictions"
    expected = "alice" if keys else "addr:testclient"
    assert clients and set(clients) == {expected}
