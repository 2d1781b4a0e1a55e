"""API keys and request rates, checked once at the edge for every `/v1` route and the stream.

`NEXTWORD_API_KEYS` holds `name:key` pairs (comma-separated, or `@FILE` with one per line;
`#` starts a comment). Keys are kept only as SHA-256 digests and compared in constant time.
A request names its key as `Authorization: Bearer KEY`; a browser's WebSocket, which cannot
set headers, may use `?access_token=KEY`. The key's name is the request's owner: sessions
live in the owner's namespace (`service.api.predictor.owned_id`), so another key's request
for the same id finds nothing (404). Without keys the service is open and every request is
its client address's, for rate limiting only.

`NEXTWORD_RATE_LIMIT` is requests per second per owner (WebSocket messages count), with
bursts up to `NEXTWORD_RATE_BURST`: a token bucket per owner. With a Redis session store the
bucket is in Redis, one for every process and replica (`service.api.rate_limit`); without
one (or while Redis is unreachable) each API process keeps its own, filled at the rate
divided by the number of API processes (the kernel spreads connections evenly).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

OWNER = "nextword.owner"  # scope key: the name of the request's API key
CLOSE_UNAUTHORIZED = 4401
NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_KEY_CHARS = 16
BUCKETS_KEPT = 100_000  # owners tracked per API process (least recently seen dropped)


class ApiKeyError(ValueError):
    """`NEXTWORD_API_KEYS` cannot be read."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class ApiKeys:
    """The accepted keys, as digests, and their names."""

    names: tuple[tuple[bytes, str], ...]

    @classmethod
    def parse(cls, spec: str) -> ApiKeys | None:
        """The keys of a `NEXTWORD_API_KEYS` value (None when empty: the service is open)."""
        spec = spec.strip()
        if not spec:
            return None
        if spec.startswith("@"):
            path = Path(spec[1:])
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ApiKeyError(f"NEXTWORD_API_KEYS: cannot read {path}: {exc.strerror}") from exc
        else:
            lines = spec.split(",")
        names: dict[bytes, str] = {}
        for number, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, sep, key = line.partition(":")
            if not sep or not NAME.fullmatch(name.strip()):
                raise ApiKeyError(f"NEXTWORD_API_KEYS entry {number}: expected name:key")
            if len(key.strip()) < MIN_KEY_CHARS:
                raise ApiKeyError(
                    f"NEXTWORD_API_KEYS entry {number} ({name.strip()}): a key needs at "
                    f"least {MIN_KEY_CHARS} characters"
                )
            names[_digest(key.strip())] = name.strip()
        if not names:
            raise ApiKeyError("NEXTWORD_API_KEYS names no key")
        return cls(tuple(names.items()))

    def owner(self, presented: str | None) -> str | None:
        """The name of a presented key, or None; the time taken does not depend on it."""
        if not presented:
            return None
        digest = _digest(presented)
        found = None
        for known, name in self.names:
            if hmac.compare_digest(known, digest):
                found = name
        return found


def presented_key(scope: Scope) -> str | None:
    """The key a request presents: a Bearer token, or (WebSocket) `?access_token=`."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    if scope["type"] == "websocket":
        from urllib.parse import parse_qs

        tokens = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("access_token")
        return tokens[0] if tokens else None
    return None


class Limiter(Protocol):
    """Whether an owner's request may go now: this process's buckets or Redis's."""

    async def admit(self, owner: str) -> float:
        """0.0 when a request may go now, else the seconds until it may."""
        ...


@dataclass
class RateLimiter:
    """A token bucket per owner in this process: `rate` per second, up to `burst` at once."""

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    _buckets: OrderedDict[str, tuple[float, float]] = field(default_factory=OrderedDict)

    def take(self, owner: str) -> float:
        """0.0 when a request may go now, else the seconds until it may."""
        now = self.clock()
        tokens, last = self._buckets.pop(owner, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[owner] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[owner] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
        while len(self._buckets) > BUCKETS_KEPT:
            self._buckets.popitem(last=False)
        return wait

    async def admit(self, owner: str) -> float:
        """`take`, as the `Limiter` protocol asks."""
        return self.take(owner)


def client_address(scope: Scope) -> str:
    """The peer address of a connection (the bucket of an open service's requests)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class AccessControl:
    """ASGI middleware: the key of every `/v1` request (and of `/metrics` when protected),
    then its owner's request rate. The owner's name is left in the scope (`OWNER`)."""

    def __init__(
        self,
        app: ASGIApp,
        keys: ApiKeys | None,
        limiter: Limiter | None,
        protect_metrics: bool = False,
    ) -> None:
        self.app = app
        self.keys = keys
        self.limiter = limiter
        self.protected = ("/v1", "/metrics") if protect_metrics else ("/v1",)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] not in ("http", "websocket") or not path.startswith(self.protected):
            await self.app(scope, receive, send)
            return
        owner = None
        if self.keys is not None:
            owner = self.keys.owner(presented_key(scope))
            if owner is None:
                await self.refuse(scope, receive, send)
                return
            scope[OWNER] = owner
        # The stream's messages are limited one by one (in-band); its connect is not.
        if self.limiter is not None and scope["type"] == "http" and path.startswith("/v1"):
            wait = await self.limiter.admit(owner or client_address(scope))
            if wait > 0:
                await self.too_fast(wait)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def too_fast(wait: float) -> JSONResponse:
        return JSONResponse(
            {
                "error": {
                    "code": "rate_limited",
                    "message": "over this key's request rate; retry later",
                    "retry_after_ms": math.ceil(wait * 1000),
                }
            },
            status_code=429,
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )

    @staticmethod
    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        message = "a valid API key is needed: Authorization: Bearer KEY"
        if scope["type"] == "http":
            response = JSONResponse(
                {"error": {"code": "unauthorized", "message": message}},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="nextword"'},
            )
            await response(scope, receive, send)
            return
        # A WebSocket: accepted only to say why, then closed with 4401.
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        error = {"type": "error", "error": {"code": "unauthorized", "message": message}, "id": None}
        await send({"type": "websocket.send", "text": json.dumps(error)})
        await send(
            {"type": "websocket.close", "code": CLOSE_UNAUTHORIZED, "reason": "unauthorized"}
        )
