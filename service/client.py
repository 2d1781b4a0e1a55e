"""A Python client of the nextword API: REST calls and the streaming WebSocket, sync and async.

    from service.client import Client

    with Client("http://127.0.0.1:8000") as client:
        client.predict("I am coming").words             # ['to', 'on', 'in', 'for', 'at']
        with client.stream(k=3) as stream:              # one session over /v1/stream
            stream.send("I am").words                   # ['not', 'sure', 'a']
            stream.send("", prefix="co").words          # ['confident', 'convinced', 'concerned']
            stream.send("coming home").tokens           # 4

`AsyncClient` has the same methods, to be awaited (`async with client.stream() as stream`).
Results are frozen dataclasses (`PredictResult`, `SessionResult`, `SessionInfo`, `ModelList`).

A stream reconnects by itself when its connection drops (a server restart, an API process
replaced, a network blip) and continues the same session. A message whose answer was lost
is sent again only if the session's token count shows it was not applied, so no text is
fed twice or lost. While the server's engine process restarts after a crash, a message
answered `engine_restarting` is retried with back-off on the same connection (after an
empty text whose `tokens` shows whether it was applied, when the answer says it may have
been); REST calls retry it when it was not applied. A stream whose session the server lost
(a restart with the memory store) starts a new one and feeds it the text it had fed, when
it knows that text (it created the session, or reset it); `renewals` counts these. Errors,
all `ClientError`:

    ClientError
     ├─ APIError             the server refused a request: `status`, `code`, `message`
     │   └─ SessionNotFound   the session expired, was deleted or never existed (404, close 4404)
     └─ StreamLost           the stream could not resume its session within `reconnect_timeout`

This module needs httpx and websockets, never onnxruntime.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx
from websockets.asyncio.client import ClientConnection as AsyncConnection
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection as SyncConnection
from websockets.sync.client import connect as sync_connect

from service.contract.limits import DEFAULT_K
from service.contract.tokenizer import tokenize

__all__ = [
    "APIError",
    "AsyncClient",
    "AsyncStream",
    "Client",
    "ClientError",
    "ModelInfo",
    "ModelList",
    "PredictResult",
    "Prediction",
    "SessionInfo",
    "SessionNotFound",
    "SessionResult",
    "Stream",
    "StreamLost",
]

DEFAULT_URL = "http://127.0.0.1:8000"
# Errors after which a connect is worth retrying: the server is starting, draining or busy.
RETRY_CODES = frozenset(
    {
        "not_ready",
        "engine_restarting",
        "overloaded",
        "store_unavailable",
        "outcome_unknown",
        "contended",
        "step_failed",
        "internal",
    }
)
# Errors a request is retried after, with back-off, on the same connection.
RESTARTING = "engine_restarting"
# A lost session is fed its text again in chunks of at most this many tokens and characters
# (under the server's default limits of 2,048 tokens and 10,000 characters a request).
REFEED_TOKENS = 1_000
REFEED_CHARS = 8_000
MAX_BACKOFF_S = 2.0
# Reconnects while one message waits for its answer; past this the message itself may be
# what ends the connection (StreamLost), and sending it again would loop.
MAX_DROPS_PER_MESSAGE = 3
CLOSE_TOO_BIG = 1009
# The HTTP status of each error code, for errors that come in-band on the WebSocket.
STATUS_OF_CODE = {
    "bad_input": 422,
    "unauthorized": 401,
    "unknown_model": 404,
    "unknown_session": 404,
    "rate_limited": 429,
    "step_failed": 500,
    "internal": 500,
    "overloaded": 503,
    "store_unavailable": 503,
    "outcome_unknown": 503,
    "contended": 503,
    "not_ready": 503,
    "engine_restarting": 503,
}


# --- errors ---------------------------------------------------------------------------


class ClientError(Exception):
    """Base class of every error this module raises."""


class APIError(ClientError):
    """The server refused a request; `details` holds any further fields of its error."""

    def __init__(
        self, status: int, code: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}


class SessionNotFound(APIError):
    """The session expired, was deleted or never existed."""


class StreamLost(ClientError):
    """A stream could not resume its session (the server stayed away, or the session moved on)."""


def _api_error(status: int | None, error: Any) -> APIError:
    """The typed error of an `{"code", "message", ...}` object (`status` None: in-band)."""
    if not isinstance(error, dict):
        error = {}
    code = str(error.get("code", "error"))
    status = status or STATUS_OF_CODE.get(code, 400)
    message = str(error.get("message", ""))
    details = {key: value for key, value in error.items() if key not in ("code", "message")}
    cls = SessionNotFound if code == "unknown_session" else APIError
    return cls(status, code, message, details)


def _raise_for_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = {"code": "http_error", "message": response.text[:200]}
    raise _api_error(response.status_code, error)


# --- results ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prediction:
    """A candidate next word, as it would be typed there, and the model's probability of it
    (not renormalised); `corrected`: the prefix does not start it (a typing slip away)."""

    word: str
    probability: float
    corrected: bool = False


def _predictions(items: list[dict[str, Any]]) -> tuple[Prediction, ...]:
    return tuple(
        Prediction(p["word"], float(p["probability"]), bool(p.get("corrected", False)))
        for p in items
    )


@dataclass(frozen=True, slots=True)
class PredictResult:
    """Answer of a stateless prediction."""

    model: str
    tokens: int
    predictions: tuple[Prediction, ...]

    @property
    def words(self) -> list[str]:
        """The predicted words, most probable first."""
        return [p.word for p in self.predictions]

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> PredictResult:
        return cls(body["model"], body["tokens"], _predictions(body["predictions"]))


@dataclass(frozen=True, slots=True)
class SessionResult:
    """Answer of a session step: its id, model, token count and the next-word predictions."""

    session_id: str
    model: str
    tokens: int
    predictions: tuple[Prediction, ...]

    @property
    def words(self) -> list[str]:
        """The predicted words, most probable first."""
        return [p.word for p in self.predictions]

    @classmethod
    def from_json(cls, body: dict[str, Any], model: str | None = None) -> SessionResult:
        """From a REST answer, or a stream message (which names no model: pass it)."""
        return cls(
            body["session_id"],
            body.get("model") or model or "",
            body["tokens"],
            _predictions(body["predictions"]),
        )


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A session's model, token count, timestamps (ISO 8601, UTC), its default for `adapt`
    and what its memory of the writer holds (distinct words, bytes)."""

    session_id: str
    model: str
    tokens: int
    created_at: str
    last_used_at: str
    adapt: bool = True
    memory_words: int = 0
    memory_bytes: int = 0

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SessionInfo:
        memory = body.get("memory") or {}
        return cls(
            body["session_id"],
            body["model"],
            body["tokens"],
            body["created_at"],
            body["last_used_at"],
            body.get("adapt", True),
            memory.get("words", 0),
            memory.get("bytes", 0),
        )


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A loaded model; `extra` holds the further fields the server lists."""

    name: str
    cell: str
    vocab_size: int
    layers: int
    hidden_size: int
    extra: dict[str, Any]

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ModelInfo:
        fixed = ("name", "cell", "vocab_size", "layers", "hidden_size")
        extra = {key: value for key, value in body.items() if key not in fixed}
        return cls(
            body["name"],
            body["cell"],
            body["vocab_size"],
            body["layers"],
            body["hidden_size"],
            extra,
        )


@dataclass(frozen=True, slots=True)
class ModelList:
    """The loaded models and the default one."""

    default: str
    models: tuple[ModelInfo, ...]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]


# --- requests shared by both clients -----------------------------------------------------


def _body(**fields: Any) -> dict[str, Any]:
    """A request body without the fields left at None (the server's defaults apply)."""
    return {key: value for key, value in fields.items() if value is not None}


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _stream_url(
    base_url: str, model: str | None, k: int, session_id: str | None, adapt: bool | None = None
) -> str:
    """`ws(s)://host/v1/stream?...` for an `http(s)://host` base URL."""
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    flag = None if adapt is None else str(adapt).lower()
    query = urlencode(_body(model=model, k=k, session_id=session_id, adapt=flag))
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/v1/stream", query, ""))


def _backoff(reconnect_timeout: float) -> Iterator[float]:
    """Delays before each reconnect attempt, until `reconnect_timeout` seconds have passed."""
    deadline = time.monotonic() + reconnect_timeout
    for attempt in itertools.count():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        yield min(0.05 * 2**attempt, MAX_BACKOFF_S, left)


def _token_count(text: str) -> int:
    return len(tokenize(text))


def _restart_delay(error: APIError, attempt: int, deadline: float) -> float | None:
    """Seconds to wait before retrying after `error`, or None: not an error to retry (or the
    retries ran out of time)."""
    if error.code != RESTARTING:
        return None
    advised = float(error.details.get("retry_after_ms", 1000)) / 1000
    delay = min(max(advised, 0.05 * 2**attempt), max(advised, MAX_BACKOFF_S))
    if time.monotonic() + delay > deadline:
        return None
    return delay


def _maybe_applied(error: APIError) -> bool:
    return bool(error.details.get("maybe_applied"))


def _chunks(texts: list[str]) -> list[str]:
    """Texts joined at word boundaries into requests under the refeed limits."""
    chunks: list[str] = []
    current: list[str] = []
    tokens = chars = 0
    for text in texts:
        count = _token_count(text)
        if current and (tokens + count > REFEED_TOKENS or chars + len(text) > REFEED_CHARS):
            chunks.append(" ".join(current))
            current, tokens, chars = [], 0, 0
        current.append(text)
        tokens += count
        chars += len(text) + 1
    if current:
        chunks.append(" ".join(current))
    return chunks


def _resume(message: dict[str, Any], before: int, now: int) -> dict[str, Any]:
    """What to send, after a reconnect, for a message whose answer was lost.

    The session held `before` tokens when the message was sent and holds `now` after
    the reconnect: unchanged, the message was not applied (send it again); grown by the
    message's tokens, it was (ask for the predictions only, with an empty text).
    """
    if message.get("type") == "reset":
        return message  # resetting twice is resetting once
    added = _token_count(message.get("text") or "")
    if now == before:
        return message
    if now == before + added:
        return {**message, "text": ""}
    raise StreamLost(
        f"the session holds {now} tokens, neither {before} (message not applied) "
        f"nor {before + added} (applied): another client fed it meanwhile"
    )


@dataclass(frozen=True, slots=True)
class _Opened:
    """How a connect attempt ended: the ready answer, or an error (retry or give up)."""

    ready: dict[str, Any] | None
    error: ClientError | None
    retry: bool


def _first_message(raw: str | bytes) -> _Opened:
    """Judge the first message of a connection: `ready`, or an error before the close."""
    message = json.loads(raw)
    if message.get("type") == "ready":
        return _Opened(message, None, False)
    error = _api_error(None, message.get("error"))
    if isinstance(error, SessionNotFound) or error.code not in RETRY_CODES:
        return _Opened(None, error, False)
    return _Opened(None, error, True)


def _closed_error(exc: ConnectionClosed) -> ClientError | None:
    """The error of a close that a reconnect would not mend (None: reconnect)."""
    code = exc.rcvd.code if exc.rcvd is not None else None
    if code == CLOSE_TOO_BIG:
        return APIError(413, "too_large", "the message is over the server's size limit")
    if code is not None and 4000 <= code < 5000:
        return _api_error(code - 4000, {"code": exc.rcvd.reason if exc.rcvd else "", "message": ""})
    return None


def _refused(exc: Exception) -> _Opened:
    """Judge a connect that failed before `ready`: retry unless the server refused us."""
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        if status < 500:
            return _Opened(None, APIError(status, "http_error", str(exc)), False)
    return _Opened(None, StreamLost(f"cannot connect: {exc}"), True)


# --- the sync client ------------------------------------------------------------------------


class Client:
    """Sync client of the REST API; `stream()` opens a WebSocket session."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        http: httpx.Client | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._http = http or httpx.Client(
            base_url=self.base_url, headers=_headers(api_key), timeout=timeout
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        deadline = time.monotonic() + self.timeout
        for attempt in itertools.count():
            response = self._http.request(method, path, json=body)
            try:
                _raise_for_status(response)
            except APIError as exc:
                # Retried only when not applied: otherwise the caller compares tokens.
                delay = None if _maybe_applied(exc) else _restart_delay(exc, attempt, deadline)
                if delay is None:
                    raise
                time.sleep(delay)
                continue
            break
        return None if response.status_code == 204 else response.json()

    def ready(self) -> bool:
        """Whether the service answers `/readyz` with 200."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def models(self) -> ModelList:
        """The loaded models and the default one."""
        body = self._call("GET", "/v1/models")
        return ModelList(body["default"], tuple(ModelInfo.from_json(m) for m in body["models"]))

    def predict(
        self,
        text: str,
        *,
        k: int = DEFAULT_K,
        model: str | None = None,
        prefix: str | None = None,
        adapt: bool | None = None,
    ) -> PredictResult:
        """The next-word predictions for a whole text (stateless); `adapt`: mix in the
        text's own words (None: the service's default)."""
        body = _body(text=text, k=k, model=model, prefix=prefix, adapt=adapt)
        return PredictResult.from_json(self._call("POST", "/v1/predict", body))

    def create_session(
        self,
        text: str = "",
        *,
        k: int = DEFAULT_K,
        model: str | None = None,
        prefix: str | None = None,
        adapt: bool | None = None,
    ) -> SessionResult:
        """Start a session, optionally with a first text; `adapt` is its default for mixing
        in the writer's own words (None: the service's)."""
        body = _body(text=text, k=k, model=model, prefix=prefix, adapt=adapt)
        return SessionResult.from_json(self._call("POST", "/v1/sessions", body))

    def feed(
        self,
        session_id: str,
        text: str,
        *,
        k: int = DEFAULT_K,
        prefix: str | None = None,
        adapt: bool | None = None,
    ) -> SessionResult:
        """Append whole words to a session; `prefix` is the partly typed next word."""
        body = _body(text=text, k=k, prefix=prefix, adapt=adapt)
        return SessionResult.from_json(self._call("POST", f"/v1/sessions/{session_id}/feed", body))

    def session(self, session_id: str) -> SessionInfo:
        """A session's model, token count and timestamps."""
        return SessionInfo.from_json(self._call("GET", f"/v1/sessions/{session_id}"))

    def delete_session(self, session_id: str) -> None:
        """Forget a session."""
        self._call("DELETE", f"/v1/sessions/{session_id}")

    def forget_words(self, session_id: str) -> None:
        """Forget the words a session remembers of its writer (its context stays)."""
        self._call("DELETE", f"/v1/sessions/{session_id}/memory")

    def stream(
        self,
        *,
        model: str | None = None,
        k: int = DEFAULT_K,
        session_id: str | None = None,
        reconnect_timeout: float = 30.0,
        adapt: bool | None = None,
    ) -> Stream:
        """A streaming session over `/v1/stream` (a new one, or `session_id`'s); use `with`."""
        return Stream(
            self.base_url,
            api_key=self.api_key,
            model=model,
            k=k,
            session_id=session_id,
            timeout=self.timeout,
            reconnect_timeout=reconnect_timeout,
            adapt=adapt,
        )


class _StreamState:
    """What a stream knows of its session; shared by `Stream` and `AsyncStream`."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        model: str | None,
        k: int,
        session_id: str | None,
        timeout: float,
        reconnect_timeout: float,
        adapt: bool | None = None,
    ) -> None:
        self.base_url = base_url
        self.adapt = adapt
        self.headers = _headers(api_key)
        self.model = model
        self.k = k
        self.session_id = session_id
        self.timeout = timeout
        self.reconnect_timeout = reconnect_timeout
        self.tokens = 0
        self.last: SessionResult | None = None
        self.reconnects = 0
        self.renewals = 0
        # The texts fed to the session since it began (or was reset), to feed a new one if
        # the server loses it; None when unknown (the stream joined an existing session).
        self.history: list[str] | None = None
        self._ids = itertools.count(1)

    @property
    def url(self) -> str:
        return _stream_url(self.base_url, self.model, self.k, self.session_id, self.adapt)

    def message(self, **fields: Any) -> dict[str, Any]:
        return {**_body(**fields), "id": next(self._ids)}

    def opened(self, ready: dict[str, Any]) -> SessionResult:
        if ready["session_id"] != self.session_id:
            # A new session: its text is what this stream feeds it from now on.
            self.history = [] if ready["tokens"] == 0 else None
        self.session_id = ready["session_id"]
        self.model = ready["model"]
        return self.answered(ready)

    def answered(
        self, answer: dict[str, Any], message: dict[str, Any] | None = None
    ) -> SessionResult:
        """Record an answer (to `message`, when it was one)."""
        result = SessionResult.from_json(answer, self.model)
        self.tokens = result.tokens
        self.last = result
        if message is not None and self.history is not None:
            if message.get("type") == "reset":
                self.history = []
            elif message.get("text"):
                self.history.append(message["text"])
        return result

    def renewable(self) -> bool:
        """Whether a lost session can be replaced by a new one fed the same text."""
        return self.history is not None

    def renew(self) -> list[dict[str, Any]]:
        """Forget the lost session; the messages that feed its text to the next one."""
        assert self.history is not None
        texts, self.history = self.history, None
        self.session_id = None
        self.renewals += 1
        return [self.message(text=chunk) for chunk in _chunks(texts)]

    def settle(self, message: dict[str, Any], before: int, now: int) -> dict[str, Any]:
        """`message` after a lost answer, the session holding `now` tokens (`before` when
        it was sent): itself (not applied: send it again), or, applied, an empty text that
        asks only for its predictions (see `_resume`)."""
        resumed = _resume(message, before, now)
        if resumed is not message and self.history is not None and message.get("text"):
            self.history.append(message["text"])
        return resumed

    def probe(self, message: dict[str, Any]) -> dict[str, Any]:
        """An empty text with `message`'s options: its `tokens` tells if `message` applied."""
        return {**message, "text": "", "id": next(self._ids)}

    @staticmethod
    def answer_of(raw: str | bytes, message_id: int) -> dict[str, Any] | None:
        """The answer to `message_id` (None: a message for an earlier id, skipped)."""
        answer: dict[str, Any] = json.loads(raw)
        if answer.get("type") == "error" and answer.get("id") in (message_id, None):
            # No id: the server could not read the message (too big, not JSON). One
            # message is in flight at a time, so the error is this one's.
            raise _api_error(None, answer.get("error"))
        if answer.get("id") != message_id:
            return None
        return answer

    def dropped(self, drops: int) -> None:
        """Count a reconnect while a message waits; give up when it keeps happening."""
        if drops > MAX_DROPS_PER_MESSAGE:
            raise StreamLost(f"the connection dropped {drops} times while one message waited")
        self.reconnects += 1


class Stream:
    """One session over `/v1/stream` (sync): `send` words, get predictions; reconnects itself."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        k: int = DEFAULT_K,
        session_id: str | None = None,
        timeout: float = 30.0,
        reconnect_timeout: float = 30.0,
        adapt: bool | None = None,
    ) -> None:
        self._state = _StreamState(
            base_url, api_key, model, k, session_id, timeout, reconnect_timeout, adapt
        )
        self._ws: SyncConnection | None = None

    @property
    def session_id(self) -> str | None:
        return self._state.session_id

    @property
    def model(self) -> str | None:
        return self._state.model

    @property
    def tokens(self) -> int:
        """Tokens the session held at its last answer."""
        return self._state.tokens

    @property
    def last(self) -> SessionResult | None:
        """The last answer (the `ready` one right after opening)."""
        return self._state.last

    @property
    def reconnects(self) -> int:
        """How many times the stream has reconnected to its session."""
        return self._state.reconnects

    @property
    def renewals(self) -> int:
        """How many times the server lost the session and the stream started a new one."""
        return self._state.renewals

    def __enter__(self) -> Stream:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self) -> SessionResult:
        """Connect (retrying while the server is away) and answer the session's `ready`."""
        return self._connect()

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    def send(
        self,
        text: str,
        *,
        prefix: str | None = None,
        k: int | None = None,
        adapt: bool | None = None,
    ) -> SessionResult:
        """Feed whole words (may be empty); `prefix` is the partly typed next word."""
        return self._exchange(self._state.message(text=text, prefix=prefix, k=k, adapt=adapt))

    def reset(self, *, prefix: str | None = None, k: int | None = None) -> SessionResult:
        """Start the session's text afresh."""
        return self._exchange(self._state.message(type="reset", prefix=prefix, k=k))

    def _connect(self) -> SessionResult:
        last_error: ClientError | None = None
        for delay in _backoff(self._state.reconnect_timeout):
            opened = self._attempt()
            if opened.ready is not None:
                return self._state.opened(opened.ready)
            assert opened.error is not None
            if not opened.retry:
                raise opened.error
            last_error = opened.error
            time.sleep(delay)
        raise StreamLost(f"no connection within {self._state.reconnect_timeout} s: {last_error}")

    def _attempt(self) -> _Opened:
        self.close()
        try:
            ws = sync_connect(
                self._state.url,
                additional_headers=self._state.headers,
                compression=None,
                open_timeout=self._state.timeout,
            )
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            return _refused(exc)
        try:
            opened = _first_message(ws.recv(timeout=self._state.timeout))
        except (ConnectionClosed, OSError, TimeoutError) as exc:
            opened = _refused(exc)
        if opened.ready is None:
            ws.close()
        else:
            self._ws = ws
        return opened

    def _exchange(self, message: dict[str, Any]) -> SessionResult:
        state = self._state
        before, drops = state.tokens, 0
        probe: dict[str, Any] | None = None  # asks whether `message` was applied
        deadline = time.monotonic() + state.reconnect_timeout
        for attempt in itertools.count():
            try:
                if probe is None:
                    return state.answered(self._roundtrip(message), message)
                answer = self._roundtrip(probe)
                probe = None
                settled = state.settle(message, before, answer["tokens"])
                if settled is not message:
                    return state.answered(answer)  # applied: the probe's answer is its answer
                continue  # not applied: send it again
            except SessionNotFound:
                if not state.renewable():
                    raise
                self._renew()
                before, probe = state.tokens, None
                continue
            except APIError as exc:
                delay = _restart_delay(exc, attempt, deadline)
                if delay is None:
                    raise
                time.sleep(delay)
                if _maybe_applied(exc) and message.get("type") != "reset" and message.get("text"):
                    probe = state.probe(message)
                continue
            except ConnectionClosed as exc:
                if (error := _closed_error(exc)) is not None:
                    self._ws = None  # the next message reconnects
                    if not (isinstance(error, SessionNotFound) and state.renewable()):
                        raise error from exc
                    self._renew()
                    before, probe = state.tokens, None
                    continue
                drops += 1
            except (OSError, TimeoutError):
                drops += 1  # dropped: resume the session below
            state.dropped(drops)
            try:
                self._connect()
            except SessionNotFound:  # the server restarted without the session
                if not state.renewable():
                    raise
                self._renew()
                before, probe = state.tokens, None
                continue
            message, probe = state.settle(message, before, state.tokens), None
            before = state.tokens
        raise AssertionError("unreachable")

    def _renew(self) -> None:
        """The server lost the session: open a new one and feed it the text fed so far."""
        refeed = self._state.renew()
        self._connect()
        for chunk in refeed:
            self._state.answered(self._roundtrip(chunk), chunk)

    def _roundtrip(self, message: dict[str, Any]) -> dict[str, Any]:
        if self._ws is None:
            raise ConnectionError("not connected")
        self._ws.send(json.dumps(message))
        while True:
            answer = _StreamState.answer_of(
                self._ws.recv(timeout=self._state.timeout), message["id"]
            )
            if answer is not None:
                return answer


# --- the async client ----------------------------------------------------------------------


class AsyncClient:
    """Async client of the REST API; `stream()` opens a WebSocket session."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._http = http or httpx.AsyncClient(
            base_url=self.base_url, headers=_headers(api_key), timeout=timeout
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        deadline = time.monotonic() + self.timeout
        for attempt in itertools.count():
            response = await self._http.request(method, path, json=body)
            try:
                _raise_for_status(response)
            except APIError as exc:
                # Retried only when not applied: otherwise the caller compares tokens.
                delay = None if _maybe_applied(exc) else _restart_delay(exc, attempt, deadline)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
                continue
            break
        return None if response.status_code == 204 else response.json()

    async def ready(self) -> bool:
        """Whether the service answers `/readyz` with 200."""
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def models(self) -> ModelList:
        """The loaded models and the default one."""
        body = await self._call("GET", "/v1/models")
        return ModelList(body["default"], tuple(ModelInfo.from_json(m) for m in body["models"]))

    async def predict(
        self,
        text: str,
        *,
        k: int = DEFAULT_K,
        model: str | None = None,
        prefix: str | None = None,
        adapt: bool | None = None,
    ) -> PredictResult:
        """The next-word predictions for a whole text (stateless); `adapt`: mix in the
        text's own words (None: the service's default)."""
        body = _body(text=text, k=k, model=model, prefix=prefix, adapt=adapt)
        return PredictResult.from_json(await self._call("POST", "/v1/predict", body))

    async def create_session(
        self,
        text: str = "",
        *,
        k: int = DEFAULT_K,
        model: str | None = None,
        prefix: str | None = None,
        adapt: bool | None = None,
    ) -> SessionResult:
        """Start a session, optionally with a first text; `adapt` is its default for mixing
        in the writer's own words (None: the service's)."""
        body = _body(text=text, k=k, model=model, prefix=prefix, adapt=adapt)
        return SessionResult.from_json(await self._call("POST", "/v1/sessions", body))

    async def feed(
        self,
        session_id: str,
        text: str,
        *,
        k: int = DEFAULT_K,
        prefix: str | None = None,
        adapt: bool | None = None,
    ) -> SessionResult:
        """Append whole words to a session; `prefix` is the partly typed next word."""
        body = _body(text=text, k=k, prefix=prefix, adapt=adapt)
        answer = await self._call("POST", f"/v1/sessions/{session_id}/feed", body)
        return SessionResult.from_json(answer)

    async def session(self, session_id: str) -> SessionInfo:
        """A session's model, token count and timestamps."""
        return SessionInfo.from_json(await self._call("GET", f"/v1/sessions/{session_id}"))

    async def delete_session(self, session_id: str) -> None:
        """Forget a session."""
        await self._call("DELETE", f"/v1/sessions/{session_id}")

    async def forget_words(self, session_id: str) -> None:
        """Forget the words a session remembers of its writer (its context stays)."""
        await self._call("DELETE", f"/v1/sessions/{session_id}/memory")

    def stream(
        self,
        *,
        model: str | None = None,
        k: int = DEFAULT_K,
        session_id: str | None = None,
        reconnect_timeout: float = 30.0,
        adapt: bool | None = None,
    ) -> AsyncStream:
        """A streaming session over `/v1/stream`; use `async with`."""
        return AsyncStream(
            self.base_url,
            api_key=self.api_key,
            model=model,
            k=k,
            session_id=session_id,
            timeout=self.timeout,
            reconnect_timeout=reconnect_timeout,
            adapt=adapt,
        )


class AsyncStream:
    """One session over `/v1/stream` (async), with `Stream`'s messages, reconnection and
    errors. Unlike `Stream` it may be shared by several tasks: a lock keeps one message in
    flight, so each answer maps to its send."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        k: int = DEFAULT_K,
        session_id: str | None = None,
        timeout: float = 30.0,
        reconnect_timeout: float = 30.0,
        adapt: bool | None = None,
    ) -> None:
        self._state = _StreamState(
            base_url, api_key, model, k, session_id, timeout, reconnect_timeout, adapt
        )
        self._ws: AsyncConnection | None = None
        self._lock = asyncio.Lock()  # one message in flight: answers map to their sends

    @property
    def session_id(self) -> str | None:
        return self._state.session_id

    @property
    def model(self) -> str | None:
        return self._state.model

    @property
    def tokens(self) -> int:
        """Tokens the session held at its last answer."""
        return self._state.tokens

    @property
    def last(self) -> SessionResult | None:
        """The last answer (the `ready` one right after opening)."""
        return self._state.last

    @property
    def reconnects(self) -> int:
        """How many times the stream has reconnected to its session."""
        return self._state.reconnects

    @property
    def renewals(self) -> int:
        """How many times the server lost the session and the stream started a new one."""
        return self._state.renewals

    async def __aenter__(self) -> AsyncStream:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> SessionResult:
        """Connect (retrying while the server is away) and answer the session's `ready`."""
        return await self._connect()

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
            self._ws = None

    async def send(
        self,
        text: str,
        *,
        prefix: str | None = None,
        k: int | None = None,
        adapt: bool | None = None,
    ) -> SessionResult:
        """Feed whole words (may be empty); `prefix` is the partly typed next word."""
        message = self._state.message(text=text, prefix=prefix, k=k, adapt=adapt)
        return await self._exchange(message)

    async def reset(self, *, prefix: str | None = None, k: int | None = None) -> SessionResult:
        """Start the session's text afresh."""
        return await self._exchange(self._state.message(type="reset", prefix=prefix, k=k))

    async def _connect(self) -> SessionResult:
        last_error: ClientError | None = None
        for delay in _backoff(self._state.reconnect_timeout):
            opened = await self._attempt()
            if opened.ready is not None:
                return self._state.opened(opened.ready)
            assert opened.error is not None
            if not opened.retry:
                raise opened.error
            last_error = opened.error
            await asyncio.sleep(delay)
        raise StreamLost(f"no connection within {self._state.reconnect_timeout} s: {last_error}")

    async def _attempt(self) -> _Opened:
        await self.close()
        try:
            ws = await async_connect(
                self._state.url,
                additional_headers=self._state.headers,
                compression=None,
                open_timeout=self._state.timeout,
            )
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            return _refused(exc)
        try:
            raw = await asyncio.wait_for(ws.recv(), self._state.timeout)
            opened = _first_message(raw)
        except (ConnectionClosed, OSError, TimeoutError) as exc:
            opened = _refused(exc)
        if opened.ready is None:
            await ws.close()
        else:
            self._ws = ws
        return opened

    async def _exchange(self, message: dict[str, Any]) -> SessionResult:
        async with self._lock:
            state = self._state
            before, drops = state.tokens, 0
            probe: dict[str, Any] | None = None  # asks whether `message` was applied
            deadline = time.monotonic() + state.reconnect_timeout
            for attempt in itertools.count():
                try:
                    if probe is None:
                        return state.answered(await self._roundtrip(message), message)
                    answer = await self._roundtrip(probe)
                    probe = None
                    settled = state.settle(message, before, answer["tokens"])
                    if settled is not message:
                        return state.answered(answer)  # applied: the probe's answer is its answer
                    continue  # not applied: send it again
                except SessionNotFound:
                    if not state.renewable():
                        raise
                    await self._renew()
                    before, probe = state.tokens, None
                    continue
                except APIError as exc:
                    delay = _restart_delay(exc, attempt, deadline)
                    if delay is None:
                        raise
                    await asyncio.sleep(delay)
                    if (
                        _maybe_applied(exc)
                        and message.get("type") != "reset"
                        and message.get("text")
                    ):
                        probe = state.probe(message)
                    continue
                except ConnectionClosed as exc:
                    if (error := _closed_error(exc)) is not None:
                        self._ws = None  # the next message reconnects
                        if not (isinstance(error, SessionNotFound) and state.renewable()):
                            raise error from exc
                        await self._renew()
                        before, probe = state.tokens, None
                        continue
                    drops += 1
                except (OSError, TimeoutError):
                    drops += 1  # dropped: resume the session below
                state.dropped(drops)
                try:
                    await self._connect()
                except SessionNotFound:  # the server restarted without the session
                    if not state.renewable():
                        raise
                    await self._renew()
                    before, probe = state.tokens, None
                    continue
                message, probe = state.settle(message, before, state.tokens), None
                before = state.tokens
            raise AssertionError("unreachable")

    async def _renew(self) -> None:
        """The server lost the session: open a new one and feed it the text fed so far."""
        refeed = self._state.renew()
        await self._connect()
        for chunk in refeed:
            self._state.answered(await self._roundtrip(chunk), chunk)

    async def _roundtrip(self, message: dict[str, Any]) -> dict[str, Any]:
        if self._ws is None:
            raise ConnectionError("not connected")
        await self._ws.send(json.dumps(message))
        while True:
            raw = await asyncio.wait_for(self._ws.recv(), self._state.timeout)
            answer = _StreamState.answer_of(raw, message["id"])
            if answer is not None:
                return answer
