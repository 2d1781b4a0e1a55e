"""The API answers what its OpenAPI document declares (`Allow` on 405, integral `k`, every
status listed), and `/docs` loads nothing from outside the package.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

from service.api import create_app
from tests.api_support import api_settings
from tests.paths import ROOT as REPO_ROOT


def test_allow_lists_every_method_of_the_path(client: TestClient) -> None:
    for method, path, allow in [
        ("OPTIONS", "/v1/sessions/abc", "DELETE, GET"),
        ("PUT", "/v1/sessions/abc", "DELETE, GET"),
        ("GET", "/v1/sessions/abc/feed", "POST"),
        ("OPTIONS", "/v1/predict", "POST"),
        ("POST", "/v1/models", "GET"),
    ]:
        r = client.request(method, path)
        assert r.status_code == 405, (method, path, r.text)
        assert r.headers["allow"] == allow, (method, path)
        assert r.json()["error"]["code"] == "method_not_allowed"


def test_an_integral_k_is_an_integer(client: TestClient) -> None:
    """JSON Schema's `integer` is any number without a fraction: 20.0 is 20."""
    as_int = client.post("/v1/predict", json={"text": "i am", "k": 20})
    as_float = client.post("/v1/predict", json={"text": "i am", "k": 20.0})
    assert as_int.status_code == as_float.status_code == 200, as_float.text
    assert as_float.json() == as_int.json() and len(as_int.json()["predictions"]) == 20
    for k in (20.5, "20", True, 0.0, 51.0, 1e300):
        assert client.post("/v1/predict", json={"text": "i am", "k": k}).status_code == 422, k
    k_schema = client.get("/openapi.json").json()["components"]["schemas"]["PredictRequest"]
    assert k_schema["properties"]["k"]["type"] == "integer"


# Every status each operation can answer (success first); the document lists exactly these.
DECLARED = {
    ("get", "/healthz"): {"200"},
    ("get", "/readyz"): {"200", "503"},
    ("get", "/metrics"): {"200", "401"},
    ("get", "/v1/models"): {"200", "401", "429", "500", "503"},
    ("post", "/v1/predict"): {"200", "400", "401", "404", "413", "422", "429", "500", "503"},
    ("post", "/v1/sessions"): {"201", "400", "401", "404", "413", "422", "429", "500", "503"},
    ("post", "/v1/sessions/{session_id}/feed"): {
        *("200", "400", "401", "404", "413", "422", "429", "500", "503")
    },
    ("get", "/v1/sessions/{session_id}"): {"200", "401", "404", "422", "429", "500", "503"},
    ("delete", "/v1/sessions/{session_id}"): {"204", "401", "404", "422", "429", "500", "503"},
    ("delete", "/v1/sessions/{session_id}/memory"): {
        "204",
        "401",
        "404",
        "422",
        "429",
        "500",
        "503",
    },
}


def test_openapi_declares_every_status(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    operations = {
        (method, path): op for path, item in doc["paths"].items() for method, op in item.items()
    }
    assert set(operations) == set(DECLARED)
    for key, statuses in DECLARED.items():
        responses = operations[key]["responses"]
        assert set(responses) == statuses, key
        for status, response in responses.items():
            if status >= "400":
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (key, status)
            if status == "503":
                assert "Retry-After" in response["headers"], key
    assert "Location" in operations[("post", "/v1/sessions")]["responses"]["201"]["headers"]


def test_statuses_the_document_declares_are_what_the_api_answers(client: TestClient) -> None:
    """The 400, 413 and 422 of a body are answered as declared (the rest: test_contract)."""
    json_type = {"content-type": "application/json"}
    assert client.post("/v1/predict", content=b"\x00", headers=json_type).status_code == 400
    sid = client.post("/v1/sessions").json()["session_id"]
    for path in ("/v1/predict", "/v1/sessions", f"/v1/sessions/{sid}/feed"):
        assert client.post(path, content=b"{nope", headers=json_type).status_code == 400
        big = {"text": "x" * 1_000_000}
        assert client.post(path, json=big).status_code == 413
        assert client.post(path, json={"text": "a", "k": 0}).status_code == 422


def test_docs_load_nothing_from_outside_the_package(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert urls, page.text
    for url in urls:
        assert url.startswith("/static/docs/"), url
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 100, url
    assert "'/openapi.json'" in page.text
    assert "validatorUrl" in page.text  # no badge fetched from swagger.io
    assert not re.search(r"""(?:src|href)=["']https?://""", page.text)
    assert client.get("/redoc").status_code == 404  # ReDoc needs a CDN: disabled
    docs = REPO_ROOT / "service" / "api" / "static" / "docs"
    for name in ("LICENSE", "NOTICE", "swagger-ui-bundle.js.LICENSE.txt"):
        assert (docs / name).is_file(), name  # the licences ship with the files


def test_docs_follow_the_root_path(tiny_artifacts: Path) -> None:
    app = create_app(api_settings(tiny_artifacts))
    with TestClient(app, root_path="/nextword") as client:
        page = client.get("/docs").text
    assert "/nextword/static/docs/swagger-ui-bundle.js" in page
    assert "'/nextword/openapi.json'" in page
