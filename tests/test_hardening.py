"""Hardening (issue 10, items 6-8): store outages, contention, the exact contract, artifacts.

- Stateless `/v1/predict` never depends on the session store; error bodies never name an
  internal address; contention past the retries is a 503 `contended` with Retry-After.
- The API answers what its OpenAPI document declares (`Allow` on 405, integral `k`,
  every status listed), and `/docs` loads nothing from outside the package.
- Every directory of a models folder is a model or a clear error; manifest paths stay in
  their directory; manifest fields that contradict the graph are refused naming the files.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from service.api import create_app
from service.api.errors import close_code
from service.contract.artifact import ArtifactError, ModelArtifact, write_manifest
from service.engine.core import artifact_dirs, load_models
from service.engine.runtime import OrtModel
from service.engine.scheduler import Step, StepBatcher
from service.errors import Contended, Overloaded, StepFailed, StoreUnavailable, error_from_code
from service.store import MemorySessionStore, SessionRecord
from tests.api_support import api_settings
from tests.live_server import LiveServer
from tests.redis_server import RedisServer, free_port, needs_redis, running_redis

CPU = ["CPUExecutionProvider"]
# What an error body must never hold: an address, a port, a URL of an internal service.
ADDRESS = re.compile(r"\d+\.\d+\.\d+\.\d+|localhost|redis://|:\d{2,5}\b|\.sock\b|ipc://")


@pytest.fixture(scope="module")
def client(tiny_artifacts: Path) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings(tiny_artifacts))) as client:
        yield client


def engine_store(client: TestClient) -> Any:
    """The session store of the engine running inside the test app."""
    return client.app.state.predictor.engine.core.store  # type: ignore[attr-defined]


# --- item 6: the session store and contention --------------------------------------


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server binary")
    yield from running_redis()


@needs_redis
@pytest.mark.redis
@pytest.mark.slow
async def test_predict_is_served_while_the_session_store_is_down(
    tiny_artifacts: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    """A real service on Redis; Redis stops; predictions sharing batches with session steps."""
    server = LiveServer(
        tiny_artifacts,
        tmp_path / "server.log",
        NEXTWORD_SESSION_STORE=redis_server.url,
        NEXTWORD_LOG_LEVEL="warning",
    ).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            created = await http.post("/v1/sessions", json={"text": "i am"})
            assert created.status_code == 201, created.text
            sid = created.json()["session_id"]

            # Hung (SIGSTOP: connections open, no answer): predictions are not held up.
            assert redis_server.proc is not None
            redis_server.proc.send_signal(signal.SIGSTOP)
            try:
                feeds = [
                    asyncio.ensure_future(
                        http.post(f"/v1/sessions/{sid}/feed", json={"text": "coming"})
                    )
                    for _ in range(2)
                ]
                await asyncio.sleep(0.1)  # the feeds' batch is waiting on Redis
                predicts = await asyncio.gather(
                    *(http.post("/v1/predict", json={"text": f"the dog {i}"}) for i in range(16))
                )
                assert all(r.status_code == 200 for r in predicts)
                # Answered while the session steps still wait on the hung Redis.
                assert not any(f.done() for f in feeds)
            finally:
                redis_server.proc.send_signal(signal.SIGCONT)
            fed = await asyncio.gather(*feeds)
            assert [r.status_code for r in fed] == [200, 200], [r.text for r in fed]
            assert sorted(r.json()["tokens"] for r in fed) == [3, 4]

            # Stopped (connections refused).
            redis_server.stop()

            def session_calls() -> list[Any]:
                return [
                    http.post(f"/v1/sessions/{sid}/feed", json={"text": "coming"}),
                    http.post("/v1/sessions", json={"text": "hello"}),
                    http.get(f"/v1/sessions/{sid}"),
                    http.delete(f"/v1/sessions/{sid}"),
                ]

            for _ in range(3):  # rounds of concurrent requests: they share the engine's batches
                predicts = [
                    http.post("/v1/predict", json={"text": f"the cat and the dog {i}"})
                    for i in range(16)
                ]
                answers = await asyncio.gather(*predicts, *session_calls(), *session_calls())
                for answer in answers[:16]:
                    assert answer.status_code == 200, answer.text
                    assert answer.json()["predictions"]
                for answer in answers[16:]:
                    assert answer.status_code == 503, answer.text
                    assert answer.headers["retry-after"] == "1"
                    error = answer.json()["error"]
                    assert error["code"] == "store_unavailable", error
                    assert not ADDRESS.search(error["message"]), error
            ready = await http.get("/readyz")
            assert ready.status_code == 503
            assert not ADDRESS.search(ready.text), ready.text
        # The operator finds the address in the log instead.
        assert f"127.0.0.1:{redis_server.port}" in server.log()
    finally:
        server.stop()
        if redis_server.proc is None:
            redis_server.start()


@needs_redis
@pytest.mark.redis
async def test_store_errors_name_no_address_and_log_it_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from service.store.redis import RedisSessionStore

    port = free_port()  # nothing listens there
    store = RedisSessionStore.from_url(f"redis://127.0.0.1:{port}/3", timeout_s=0.5)
    try:
        caplog.set_level(logging.DEBUG, logger="service.store.redis")
        for call in (store.ping(), store.get_many(["a"]), store.get("a"), store.count()):
            with pytest.raises(StoreUnavailable) as raised:
                await call
            assert "Redis" in raised.value.message and "unreachable" in raised.value.message
            assert not ADDRESS.search(raised.value.message), raised.value.message
            assert str(port) not in str(raised.value)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings  # once per outage, then at debug
        assert f"127.0.0.1:{port}/3" in warnings[0].getMessage()
    finally:
        await store.close()


@needs_redis
@pytest.mark.redis
async def test_a_full_store_names_no_address(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    from service.store.redis import RedisSessionStore

    store = RedisSessionStore.from_url(redis_server.url, timeout_s=1.0)
    now = 0.0
    record = SessionRecord(
        "full", "lstm", tuple(np.zeros((1, 8), np.float32) for _ in range(4)), 1, now, now
    )
    try:
        await store._redis.config_set("maxmemory-policy", "noeviction")
        await store._redis.config_set("maxmemory", "1")  # every write is refused: OOM
        with pytest.raises(StoreUnavailable) as raised:
            await store.put_many([record], [None])
        assert "full" in raised.value.message and not ADDRESS.search(raised.value.message)
        assert str(redis_server.port) in caplog.text  # logged for the operator
    finally:
        await store._redis.config_set("maxmemory", "0")
        await store.close()


class ConflictingStore(MemorySessionStore):
    """Another writer always wins: every compare-and-set write of an existing session loses."""

    async def put_many(
        self, records: list[SessionRecord], expected: list[int | None]
    ) -> list[bool]:
        new = [r for r, version in zip(records, expected) if version is None]
        written = iter(await super().put_many(new, [None] * len(new)) if new else [])
        return [next(written) if version is None else False for version in expected]


async def test_contention_past_the_retries_is_contended_not_a_run_failure(
    tiny_artifacts: Path,
) -> None:
    model = OrtModel(ModelArtifact.load(tiny_artifacts / "gru"), CPU)
    batcher = StepBatcher(model, ConflictingStore(), max_retries=3, max_wait_ms=0)
    await batcher.start()
    try:
        await batcher.step(Step([4], session_id="s", create=True))
        with pytest.raises(Contended) as raised:
            await batcher.step(Step([5], session_id="s"))
        error = raised.value
        assert isinstance(error, StepFailed)  # still a failed step: nothing was applied
        assert (error.code, error.status) == ("contended", 503)
        assert (await batcher.step(Step([6]))).tokens == 1  # stateless steps unaffected
    finally:
        await batcher.stop()


def test_contended_crosses_the_engine_boundary_and_maps_to_retry_later() -> None:
    error = error_from_code("contended", "the session kept changing")
    assert isinstance(error, Contended) and isinstance(error, StepFailed)
    assert close_code(error) == 1013  # try again later, as every other 503
    assert close_code(StepFailed("x")) == 1011


def test_contended_feed_is_a_503_with_retry_after(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = client.post("/v1/sessions", json={"text": "i am"}).json()["session_id"]
    store = engine_store(client)

    async def always_lose(records: list[SessionRecord], expected: list[int | None]) -> list[bool]:
        return [False] * len(records)

    monkeypatch.setattr(store, "put_many", always_lose)
    r = client.post(f"/v1/sessions/{sid}/feed", json={"text": "coming"})
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "contended"
    assert client.post("/v1/predict", json={"text": "i am"}).status_code == 200
    monkeypatch.undo()
    info = client.get(f"/v1/sessions/{sid}").json()
    assert info["tokens"] == 2  # the contended step was not applied


def test_contended_message_on_the_websocket_keeps_the_connection(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = engine_store(client)
    with client.websocket_connect("/v1/stream") as ws:
        ready = ws.receive_json()
        assert ready["type"] == "ready"

        async def always_lose(
            records: list[SessionRecord], expected: list[int | None]
        ) -> list[bool]:
            return [False] * len(records)

        monkeypatch.setattr(store, "put_many", always_lose)
        ws.send_json({"text": "i am", "id": 1})
        answer = ws.receive_json()
        assert answer["type"] == "error" and answer["id"] == 1
        assert answer["error"]["code"] == "contended"
        monkeypatch.undo()
        ws.send_json({"text": "i am", "id": 2})
        answer = ws.receive_json()
        assert answer["type"] == "predictions" and answer["tokens"] == 2


def test_contended_on_connect_closes_with_try_again_later(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = client.post("/v1/sessions", json={"text": "i am"}).json()["session_id"]

    async def always_lose(records: list[SessionRecord], expected: list[int | None]) -> list[bool]:
        return [False] * len(records)

    monkeypatch.setattr(engine_store(client), "put_many", always_lose)
    with client.websocket_connect(f"/v1/stream?session_id={sid}") as ws:
        answer = ws.receive_json()
        assert answer["type"] == "error" and answer["error"]["code"] == "contended"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1013


# --- item 7: the contract is exact --------------------------------------------------


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
    docs = Path(__file__).resolve().parents[1] / "service" / "api" / "static" / "docs"
    for name in ("LICENSE", "NOTICE", "swagger-ui-bundle.js.LICENSE.txt"):
        assert (docs / name).is_file(), name  # the licences ship with the files


def test_docs_follow_the_root_path(tiny_artifacts: Path) -> None:
    app = create_app(api_settings(tiny_artifacts))
    with TestClient(app, root_path="/nextword") as client:
        page = client.get("/docs").text
    assert "/nextword/static/docs/swagger-ui-bundle.js" in page
    assert "'/nextword/openapi.json'" in page


# --- item 8: artifacts ------------------------------------------------------------


def copy_model(tiny_artifacts: Path, root: Path, name: str = "lstm") -> Path:
    """A writable copy of a tiny artifact as `root/name`."""
    return Path(shutil.copytree(tiny_artifacts / name, root / name))


def edit_manifest(art: Path, **changes: Any) -> Path:
    path = art / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return path


def test_a_directory_without_a_manifest_is_an_error_naming_it(
    tiny_artifacts: Path, tmp_path: Path
) -> None:
    copy_model(tiny_artifacts, tmp_path, "lstm")
    (tmp_path / "lstm-old").mkdir()
    (tmp_path / "lstm-old" / "model.onnx").write_bytes(b"")
    with pytest.raises(
        ArtifactError, match=r"lstm-old: not a model artifact \(no manifest\.json\)"
    ):
        artifact_dirs(tmp_path)
    settings = api_settings(tmp_path)
    with pytest.raises(ArtifactError, match="lstm-old"):
        load_models(settings)


def test_hidden_directories_pycache_and_files_are_skipped(
    tiny_artifacts: Path, tmp_path: Path
) -> None:
    copy_model(tiny_artifacts, tmp_path, "lstm")
    copy_model(tiny_artifacts, tmp_path, "gru")
    for skipped in (".git", ".cache", "__pycache__"):
        (tmp_path / skipped).mkdir()
    (tmp_path / "README.md").write_text("models\n")
    assert [p.name for p in artifact_dirs(tmp_path)] == ["gru", "lstm"]
    assert sorted(load_models(api_settings(tmp_path))) == ["gru", "lstm"]


def test_an_empty_or_missing_models_directory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    with pytest.raises(ArtifactError, match="no model artifacts"):
        artifact_dirs(tmp_path)
    with pytest.raises(ArtifactError, match="not found"):
        artifact_dirs(tmp_path / "missing")


@pytest.mark.parametrize(
    "entry",
    [
        "../../etc/hostname",
        "../gru/model.onnx",
        "/etc/hostname",
        "sub/../../x",
        "./model.onnx",
        "a//b",
        "C:/Windows/win.ini",
        "..\\..\\etc\\hostname",
        "",
    ],
)
def test_manifest_file_entries_stay_in_their_directory(
    tiny_artifacts: Path, tmp_path: Path, entry: str
) -> None:
    art = copy_model(tiny_artifacts, tmp_path / "models")
    copy_model(tiny_artifacts, tmp_path / "models", "gru")
    manifest = json.loads((art / "manifest.json").read_text())
    files = {**manifest["files"], entry: {"bytes": 1, "sha256": "0" * 64}}
    path = edit_manifest(art, files=files)
    with pytest.raises(ArtifactError, match=re.escape(str(path))) as raised:
        ModelArtifact.load(art)
    assert "file entry" in str(raised.value)


def test_a_file_entry_that_is_not_an_object_is_refused(
    tiny_artifacts: Path, tmp_path: Path
) -> None:
    art = copy_model(tiny_artifacts, tmp_path)
    manifest = json.loads((art / "manifest.json").read_text())
    path = edit_manifest(art, files={**manifest["files"], "vocab.txt": "sha"})
    with pytest.raises(ArtifactError, match=re.escape(str(path))):
        ModelArtifact.load(art)


def test_files_in_subdirectories_are_allowed(tiny_artifacts: Path, tmp_path: Path) -> None:
    art = copy_model(tiny_artifacts, tmp_path)
    (art / "extra").mkdir()
    (art / "extra" / "notes.txt").write_text("notes\n")
    manifest = json.loads((art / "manifest.json").read_text())
    write_manifest(art, {**manifest, "files": {**manifest["files"], "extra/notes.txt": {}}})
    assert ModelArtifact.load(art).name == "lstm"


@pytest.mark.parametrize(
    ("field", "value"),
    [("hidden_size", "32"), ("layers", 0), ("vocab_size", True), ("max_k", 2.5)],
)
def test_sizes_must_be_positive_integers(
    tiny_artifacts: Path, tmp_path: Path, field: str, value: Any
) -> None:
    art = copy_model(tiny_artifacts, tmp_path)
    path = edit_manifest(art, **{field: value})
    with pytest.raises(ArtifactError, match=re.escape(f"{path}: {field}")):
        ModelArtifact.load(art)


@pytest.mark.parametrize(
    ("name", "changes", "complaint"),
    [
        (
            "lstm",
            {"hidden_size": 64},
            r"hidden_size is 64 but input h0 has shape \[2, 'batch', 32\]",
        ),
        ("lstm", {"layers": 3}, r"layers is 3 but input h0"),
        ("gru", {"layers": 2}, r"layers is 2 but input h0"),
        ("lstm", {"cell": "gru"}, r"inputs \['c0'\] that a 'gru' cell does not feed"),
        ("gru", {"cell": "lstm"}, r"the graph lacks \['c0', 'cn'\]"),
        ("gru", {"max_k": 80}, r"max_k is 80 but output topk_probs"),
    ],
)
def test_manifest_fields_that_contradict_the_graph_are_refused(
    tiny_artifacts: Path, tmp_path: Path, name: str, changes: dict[str, Any], complaint: str
) -> None:
    art = copy_model(tiny_artifacts, tmp_path, name)
    manifest = edit_manifest(art, **changes)
    artifact = ModelArtifact.load(art)  # the hashes still match: the manifest is not hashed
    with pytest.raises(ArtifactError) as raised:
        OrtModel(artifact, CPU)
    message = str(raised.value)
    assert str(manifest) in message and str(art / "model.onnx") in message, message
    assert re.search(complaint, message), message


def test_a_vocabulary_size_that_contradicts_the_graph_is_refused(
    tiny_artifacts: Path, tmp_path: Path
) -> None:
    art = copy_model(tiny_artifacts, tmp_path, "gru")
    with (art / "vocab.txt").open("a") as vocab:
        vocab.write("zyzzyva\n")
    manifest = json.loads((art / "manifest.json").read_text())
    write_manifest(art, {**manifest, "vocab_size": manifest["vocab_size"] + 1})  # rehashed
    artifact = ModelArtifact.load(art)
    with pytest.raises(ArtifactError, match=r"vocab_size is \d+ but output probs"):
        OrtModel(artifact, CPU)


def test_the_tiny_and_bundled_models_pass_the_graph_check(tiny_artifacts: Path) -> None:
    bundled = Path(__file__).resolve().parents[1] / "service" / "models"
    for models in (tiny_artifacts, bundled):
        for name in ("lstm", "gru"):
            assert OrtModel(ModelArtifact.load(models / name), CPU).name == name


# --- item 6: a hung store holds up no stateless step --------------------------------


class HungStore(MemorySessionStore):
    """A store whose reads or writes hang (Redis not answering) until released."""

    def __init__(self) -> None:
        super().__init__(ttl_s=3600.0, cap=1000)
        self.hang_reads = False
        self.hang_writes = False
        self.release = asyncio.Event()
        self.hanging = asyncio.Event()

    async def _hang(self) -> None:
        self.hanging.set()
        await self.release.wait()

    async def get_many(self, ids: list[str]) -> list[SessionRecord | None]:
        if self.hang_reads:
            await self._hang()
        return await super().get_many(ids)

    async def put_many(
        self, records: list[SessionRecord], expected: list[int | None]
    ) -> list[bool]:
        if self.hang_writes:
            await self._hang()
        return await super().put_many(records, expected)


@pytest.fixture
async def gru(tiny_artifacts: Path) -> OrtModel:
    return OrtModel(ModelArtifact.load(tiny_artifacts / "gru"), CPU)


async def answered_soon(futures: list[asyncio.Future[Any]], within_s: float = 2.0) -> list[Any]:
    return list(await asyncio.wait_for(asyncio.gather(*futures), within_s))


@pytest.mark.parametrize("hang", ["reads", "writes"])
async def test_a_hung_store_holds_up_no_stateless_step(gru: OrtModel, hang: str) -> None:
    store = HungStore()
    batcher = StepBatcher(gru, store, max_wait_ms=2.0, store_grace_ms=10.0)
    await batcher.start()
    try:
        await batcher.step(Step([4, 5], session_id="s", create=True))
        alone = await batcher.step(Step([7, 8]))
        setattr(store, f"hang_{hang}", True)
        # A session step and stateless steps in one batch, and more stateless steps later.
        fed = batcher.submit(Step([6], session_id="s"))
        created = batcher.submit(Step([6], session_id="t", create=True))
        same_batch = [batcher.submit(Step([7, 8])) for _ in range(3)]
        results = await answered_soon(same_batch)
        await asyncio.wait_for(store.hanging.wait(), 2)
        later = [batcher.submit(Step([7, 8])) for _ in range(3)]
        results += await answered_soon(later)
        for result in results:
            assert result.ids.tolist() == alone.ids.tolist()
        # The sessions' steps wait for the store, in order, and no other session step
        # runs meanwhile (one session batch in flight).
        queued = batcher.submit(Step([9], session_id="s"))
        await asyncio.sleep(0.05)
        assert not fed.done() and not created.done() and not queued.done()
        store.release.set()
        first, second = await answered_soon([fed, queued])
        assert (first.tokens, second.tokens) == (3, 4)
        assert (await created).tokens == 1
    finally:
        store.release.set()
        await batcher.stop()


async def test_stop_cuts_a_hung_session_batch_short(gru: OrtModel) -> None:
    store = HungStore()
    batcher = StepBatcher(gru, store, max_wait_ms=0)
    await batcher.start()
    await batcher.step(Step([4], session_id="s", create=True))
    store.hang_writes = True
    fed = batcher.submit(Step([5], session_id="s"))
    await asyncio.wait_for(store.hanging.wait(), 2)
    queued = batcher.submit(Step([6], session_id="s"))
    await asyncio.wait_for(batcher.stop(drain=False), 2)
    assert isinstance(fed.exception(), StepFailed)
    assert isinstance(queued.exception(), Overloaded)


async def test_stop_with_drain_finishes_the_session_batch(gru: OrtModel) -> None:
    store = HungStore()
    batcher = StepBatcher(gru, store, max_wait_ms=0)
    await batcher.start()
    await batcher.step(Step([4], session_id="s", create=True))
    store.hang_reads = True
    fed = batcher.submit(Step([5], session_id="s"))
    queued = batcher.submit(Step([6], session_id="s"))
    await asyncio.wait_for(store.hanging.wait(), 2)
    stopping = asyncio.ensure_future(batcher.stop(drain=True))
    await asyncio.sleep(0.05)
    assert not stopping.done()
    store.release.set()
    await asyncio.wait_for(stopping, 5)
    assert (fed.result().tokens, queued.result().tokens) == (2, 3)
