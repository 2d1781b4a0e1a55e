"""The Python client (`service.client`): REST and the stream, sync and async, against a real
`nextword serve`; the stream's resume after a lost answer against a scripted WebSocket server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from websockets.asyncio.server import ServerConnection, serve

from service.client import (
    APIError,
    AsyncClient,
    Client,
    ModelList,
    PredictResult,
    SessionNotFound,
    SessionResult,
    StreamLost,
)
from tests.api_support import assert_same_predictions
from tests.live_server import ROOT, LiveServer
from tests.redis_server import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Two API processes over the tiny models: a reconnect may land on either."""
    live = LiveServer(tiny_artifacts, tmp_path_factory.mktemp("client") / "serve.log", workers=2)
    live.start()
    try:
        yield live
    finally:
        live.stop()


def same(got: SessionResult | PredictResult, want: PredictResult) -> None:
    as_json = [{"word": p.word, "probability": p.probability} for p in got.predictions]
    want_json = [{"word": p.word, "probability": p.probability} for p in want.predictions]
    assert_same_predictions(as_json, want_json)


def test_the_client_imports_neither_onnxruntime_nor_torch() -> None:
    code = (
        "import sys, service.client; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'onnxruntime', 'torch', 'numpy'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- REST ------------------------------------------------------------------------------------


def test_sync_rest(server: LiveServer) -> None:
    with Client(server.url) as client:
        assert client.ready()
        models = client.models()
        assert isinstance(models, ModelList) and models.default == "lstm"
        assert set(models.names) == {"lstm", "gru"}
        assert models.models[0].hidden_size > 0 and "providers" in models.models[0].extra

        whole = client.predict("i am coming home", k=3)
        assert whole.model == "lstm" and whole.tokens == 4 and len(whole.words) == 3
        assert all(0 < p.probability < 1 for p in whole.predictions)
        narrowed = client.predict("i am coming home", prefix="t", k=3)
        assert narrowed.words and all(w.lower().startswith("t") for w in narrowed.words)

        session = client.create_session("i am", model="gru")
        assert session.model == "gru" and session.tokens == 2
        fed = client.feed(session.session_id, "coming home", k=3)
        assert fed.tokens == 4
        same(fed, client.predict("i am coming home", model="gru", k=3))
        info = client.session(session.session_id)
        assert (info.session_id, info.model, info.tokens) == (session.session_id, "gru", 4)
        assert info.created_at <= info.last_used_at
        client.delete_session(session.session_id)
        with pytest.raises(SessionNotFound) as missing:
            client.session(session.session_id)
        assert missing.value.status == 404 and missing.value.code == "unknown_session"

        with pytest.raises(APIError) as bad:
            client.predict("i am", k=99)
        assert bad.value.status == 422 and bad.value.code == "bad_input"
        with pytest.raises(APIError) as unknown:
            client.predict("i am", model="nope")
        assert unknown.value.status == 404 and unknown.value.code == "unknown_model"


async def test_async_rest(server: LiveServer) -> None:
    async with AsyncClient(server.url) as client:
        assert await client.ready()
        assert (await client.models()).default == "lstm"
        answers = await asyncio.gather(*(client.predict("i am", k=2) for _ in range(8)))
        assert len({tuple(a.words) for a in answers}) == 1  # batching changes no result
        session = await client.create_session()
        assert session.tokens == 0
        fed = await client.feed(session.session_id, "i am coming", k=4)
        assert fed.tokens == 3
        same(fed, await client.predict("i am coming", k=4))
        assert (await client.session(session.session_id)).tokens == 3
        await client.delete_session(session.session_id)
        with pytest.raises(SessionNotFound):
            await client.feed(session.session_id, "home")


# A writer's text long enough for the memory to mix at full weight, its last "Zorblax"
# more than the few words back that are never raised (no echo).
WRITER = (
    "hello Zorblax , i am here . Zorblax went home . then Zorblax came to see the house and "
    "the garden , and Zorblax said that it was a good day for Zorblax and for me . then said"
)


def test_the_writers_words_through_both_clients(server: LiveServer) -> None:
    text = WRITER
    with Client(server.url) as client:
        assert "Zorblax" in client.predict(text, k=10).words
        assert "Zorblax" not in client.predict(text, k=10, adapt=False).words
        session = client.create_session(text, k=10, adapt=False)
        assert "Zorblax" not in session.words
        assert "Zorblax" in client.feed(session.session_id, "", k=10, adapt=True).words
        info = client.session(session.session_id)
        assert info.adapt is False and info.memory_words > 0 and info.memory_bytes > 0
        client.forget_words(session.session_id)
        assert client.session(session.session_id).memory_words == 0
        with client.stream(k=10, adapt=False) as stream:
            assert "Zorblax" not in stream.send(text).words
            assert "Zorblax" in stream.send("", adapt=True).words


def test_corrections_and_casing_through_both_clients(server: LiveServer) -> None:
    with Client(server.url) as client:
        answer = client.predict("we saw", k=50, prefix="teh", adapt=False)
        assert any(p.word == "the" and p.corrected for p in answer.predictions)
        assert all(p.corrected for p in answer.predictions)
        assert not any(p.corrected for p in client.predict("we saw", prefix="th").predictions)
        assert all(w[0].isupper() for w in client.predict("", k=5).words)
        with client.stream(k=50, adapt=False) as stream:
            streamed = stream.send("we saw", prefix="teh").predictions
            assert [(p.word, p.corrected) for p in streamed] == [
                (p.word, p.corrected) for p in answer.predictions
            ]


async def test_the_async_client_forgets_words(server: LiveServer) -> None:
    async with AsyncClient(server.url) as client:
        session = await client.create_session("hello Zorblax , Zorblax")
        assert (await client.session(session.session_id)).memory_words > 0
        await client.forget_words(session.session_id)
        assert (await client.session(session.session_id)).memory_words == 0
        async with client.stream(adapt=True, k=10) as stream:
            answer = await stream.send(WRITER)
            assert "Zorblax" in answer.words


# --- the stream ----------------------------------------------------------------------------


def test_sync_stream(server: LiveServer) -> None:
    with Client(server.url) as client:
        with client.stream(k=3) as stream:
            assert stream.session_id and stream.model == "lstm" and stream.tokens == 0
            assert stream.last is not None and len(stream.last.words) == 3
            answer = stream.send("i am")
            assert answer.session_id == stream.session_id and answer.tokens == 2
            answer = stream.send("coming", prefix="h")
            assert answer.tokens == 3
            same(answer, client.predict("i am coming", prefix="h", k=3))
            assert stream.send("", prefix="h", k=5).tokens == 3  # a prefix is not consumed
            with pytest.raises(APIError) as bad:
                stream.send("home", k=99)
            assert bad.value.code == "bad_input"
            assert stream.send("home").tokens == 4  # the connection stayed open
            reset = stream.reset()
            assert reset.tokens == 0 and reset.session_id == stream.session_id
            session_id = stream.session_id
            stream.send("i am")
        # Another connection continues the same session.
        with client.stream(session_id=session_id) as again:
            assert again.session_id == session_id and again.tokens == 2
            same(again.send("coming"), client.predict("i am coming"))
        with pytest.raises(SessionNotFound), client.stream(session_id="no-such-session"):
            pass


async def test_async_stream(server: LiveServer) -> None:
    async with AsyncClient(server.url) as client, client.stream(model="gru") as stream:
        assert stream.model == "gru" and stream.tokens == 0
        words = ["the", "cat", "and", "the", "dog", "went", "home"]
        # Concurrent sends on one stream are answered one at a time, in order.
        answers = await asyncio.gather(*(stream.send(word) for word in words))
        assert [a.tokens for a in answers] == list(range(1, len(words) + 1))
        same(answers[-1], await client.predict(" ".join(words), model="gru"))
        with pytest.raises(APIError) as too_big:
            await stream.send("x" * 100_000)  # over the frame limit: the server closes
        assert too_big.value.code == "too_large"
        answer = await stream.send("and")  # reconnects; the message was not applied
        assert answer.session_id == stream.session_id and answer.tokens == len(words) + 1
        assert (await stream.reset(k=2)).tokens == 0


def test_stream_continues_its_session_when_its_api_process_dies(server: LiveServer) -> None:
    with Client(server.url) as client, client.stream(k=4) as stream:
        stream.send("i am")
        session_id = stream.session_id
        serving = [
            process
            for process in psutil.Process(server.proc.pid).children()  # type: ignore[union-attr]
            if any(
                c.status == psutil.CONN_ESTABLISHED and c.laddr.port == server.port
                for c in process.net_connections()
            )
        ]
        assert len(serving) == 1, serving  # the API process holding the stream's connection
        serving[0].kill()
        serving[0].wait(10)
        answer = stream.send("coming")  # the connection is gone: reconnect, then send
        assert stream.reconnects == 1
        assert answer.session_id == session_id and answer.tokens == 3
        same(answer, client.predict("i am coming", k=4))


def test_stream_gives_up_when_the_server_stays_away() -> None:
    client = Client(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StreamLost, match="no connection within"):
        client.stream(reconnect_timeout=0.5).open()
    client.close()


# --- resuming after a lost answer (a scripted server) ---------------------------------------


class ScriptedServer:
    """Opens a session of 2 tokens; drops the first text message unanswered, then answers."""

    def __init__(self, applied_tokens: int) -> None:
        self.applied_tokens = applied_tokens  # what the session holds after the drop
        self.received: list[dict[str, Any]] = []
        self.connections = 0

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        first = self.connections == 1
        tokens = 2 if first else self.applied_tokens
        await ws.send(json.dumps(self.answer("ready", tokens, None)))
        async for raw in ws:
            message = json.loads(raw)
            self.received.append(message)
            if first:
                ws.transport.abort()  # the answer is lost with the connection
                return
            tokens += len(message["text"].split())
            await ws.send(json.dumps(self.answer("predictions", tokens, message["id"])))

    @staticmethod
    def answer(kind: str, tokens: int, message_id: Any) -> dict[str, Any]:
        predictions = [{"word": "home", "probability": 0.5}]
        return {
            "type": kind,
            "session_id": "s1",
            "model": "lstm",
            "tokens": tokens,
            "predictions": predictions,
            "id": message_id,
        }


@pytest.mark.parametrize(
    ("applied_tokens", "resent_text"),
    [(2, "coming home"), (4, "")],
    ids=["not applied: sent again", "applied: only its predictions asked for"],
)
async def test_a_lost_answer_is_resumed_by_token_count(
    applied_tokens: int, resent_text: str
) -> None:
    scripted = ScriptedServer(applied_tokens)
    async with serve(scripted.handler, "127.0.0.1", 0) as ws_server:
        port = ws_server.sockets[0].getsockname()[1]
        client = AsyncClient(f"http://127.0.0.1:{port}")
        async with client, client.stream(reconnect_timeout=5) as stream:
            answer = await stream.send("coming home", prefix="t")
    assert [m["text"] for m in scripted.received] == ["coming home", resent_text]
    assert scripted.received[1]["prefix"] == "t"
    assert answer.tokens == 4 and answer.session_id == "s1" and stream.reconnects == 1


async def test_a_session_that_moved_on_is_not_fed_twice() -> None:
    scripted = ScriptedServer(applied_tokens=7)  # neither 2 (not applied) nor 4 (applied)
    async with serve(scripted.handler, "127.0.0.1", 0) as ws_server:
        port = ws_server.sockets[0].getsockname()[1]
        client = AsyncClient(f"http://127.0.0.1:{port}")
        async with client, client.stream(reconnect_timeout=5) as stream:
            with pytest.raises(StreamLost, match="holds 7 tokens"):
                await stream.send("coming home")
    assert [m["text"] for m in scripted.received] == ["coming home"]


# --- an engine restart (a scripted server) ---------------------------------------------------


class RestartingServer:
    """A session of 2 tokens; the first text message is answered `engine_restarting`
    (`maybe_applied` as given), having been applied or not; then answers normally."""

    def __init__(self, maybe_applied: bool, applied: bool) -> None:
        self.maybe_applied = maybe_applied
        self.applied = applied
        self.received: list[dict[str, Any]] = []

    async def handler(self, ws: ServerConnection) -> None:
        tokens = 2
        await ws.send(json.dumps(ScriptedServer.answer("ready", tokens, None)))
        async for raw in ws:
            message = json.loads(raw)
            self.received.append(message)
            added = len(message["text"].split())
            if len(self.received) == 1:
                tokens += added if self.applied else 0
                error = {
                    "code": "engine_restarting",
                    "message": "the engine process died",
                    "retry_after_ms": 10,
                    "maybe_applied": self.maybe_applied,
                }
                await ws.send(json.dumps({"type": "error", "error": error, "id": message["id"]}))
                continue
            tokens += added
            await ws.send(json.dumps(ScriptedServer.answer("predictions", tokens, message["id"])))


@pytest.mark.parametrize(
    ("maybe_applied", "applied", "texts"),
    [
        (False, False, ["coming home", "coming home"]),
        (True, False, ["coming home", "", "coming home"]),
        (True, True, ["coming home", ""]),
    ],
    ids=["not applied: sent again", "maybe, was not: probed, sent again", "maybe, was: probed"],
)
async def test_engine_restarting_is_retried_on_the_same_connection_without_feeding_twice(
    maybe_applied: bool, applied: bool, texts: list[str]
) -> None:
    scripted = RestartingServer(maybe_applied, applied)
    async with serve(scripted.handler, "127.0.0.1", 0) as ws_server:
        port = ws_server.sockets[0].getsockname()[1]
        client = AsyncClient(f"http://127.0.0.1:{port}")
        async with client, client.stream(reconnect_timeout=5) as stream:
            answer = await stream.send("coming home", prefix="t")
    assert [m["text"] for m in scripted.received] == texts
    assert all(m["prefix"] == "t" for m in scripted.received)
    assert answer.tokens == 4 and stream.reconnects == 0


@pytest.mark.parametrize("maybe_applied", [False, True])
def test_rest_retries_engine_restarting_only_when_not_applied(maybe_applied: bool) -> None:
    calls: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) == 1:
            error = {
                "code": "engine_restarting",
                "message": "the engine process died",
                "retry_after_ms": 10,
                "maybe_applied": maybe_applied,
            }
            return httpx.Response(503, json={"error": error}, headers={"Retry-After": "1"})
        body = ScriptedServer.answer("predictions", 4, None)
        return httpx.Response(200, json=body)

    base = "http://nextword.test"
    http = httpx.Client(base_url=base, transport=httpx.MockTransport(answer))
    with Client(base, http=http) as client:
        if maybe_applied:  # the caller compares the session's tokens before any retry
            with pytest.raises(APIError) as refused:
                client.feed("s1", "coming home")
            assert refused.value.code == "engine_restarting"
            assert refused.value.details["maybe_applied"] is True
        else:
            assert client.feed("s1", "coming home").tokens == 4
    assert len(calls) == (1 if maybe_applied else 2)
