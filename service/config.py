"""Settings of the service: one pydantic-settings class, read from `NEXTWORD_*` variables.

This is the only module that reads the environment; everything else gets its
configuration as arguments.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_MODELS = Path(__file__).resolve().parent / "models"


CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")  # a Redis Cluster's store URLs


def parse_cluster_url(url: str) -> dict[str, Any]:
    """Seeds, credentials, TLS and the WAIT options of a `redis+cluster://` URL."""
    parts = urlsplit(url)
    if not url.startswith(CLUSTER_SCHEMES) or not parts.netloc:
        raise ValueError("expected redis+cluster://host:port[,host:port...]")
    credentials, _, hosts = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":")
    seeds = []
    for seed in hosts.split(","):
        host, _, port = seed.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"cluster seed {seed!r}: expected host:port")
        seeds.append((host.strip("[]"), int(port)))
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(query) - {"wait_replicas", "wait_timeout_ms"}
    if unknown:
        raise ValueError(f"unknown option(s) in the cluster URL: {', '.join(sorted(unknown))}")
    return {
        "seeds": seeds,
        "username": unquote(username) or None,
        "password": unquote(password) or None,
        "ssl": url.startswith("rediss+"),
        "wait_replicas": int(query.get("wait_replicas", 0)),
        "wait_timeout_ms": int(query.get("wait_timeout_ms", 100)),
    }


class Settings(BaseSettings):
    """Everything configurable, with defaults for a keyboard-style workload."""

    model_config = SettingsConfigDict(env_prefix="NEXTWORD_", extra="ignore")

    # Models and ONNX Runtime.
    models_dir: Path = Field(default=BUNDLED_MODELS, description="directory of model artifacts")
    default_model: str = Field(default="lstm", description="model of requests that name none")
    providers: str = Field(
        default="auto",
        description='"auto": CUDA where a GPU and the CUDA libraries are usable, else CPU '
        '(each model logs which, and why not CUDA); or a comma list such as "cpu" or '
        '"cuda,cpu": one naming CUDA where it is not usable stops the start with the reason',
    )
    intra_op_threads: int = Field(
        default=0, ge=0, description="ORT threads per run; 0 = one per core"
    )
    cuda_tf32: bool = Field(
        default=False,
        description="let ORT's CUDA provider use TF32 (faster; breaks the 1e-4 invariant)",
    )
    state_pool: bool = Field(
        default=True,
        description="keep the states of active sessions resident in a pool of rows on the "
        "model's device (GPU memory on CUDA, host memory on CPU): a batch sends token ids "
        "and gets the top-k; false: states are copied in and out with every batch",
    )
    state_pool_rows: int = Field(
        default=0,
        ge=0,
        description="rows of each model's state pool (a session takes two); 0 = enough for "
        "session_cap sessions, on CUDA at most state_pool_memory of the free GPU memory. "
        "Sessions past the pool spill to host memory and come back on their next step",
    )
    state_pool_memory: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="share of the free GPU memory (at start, over all models) the state "
        "pools may take when state_pool_rows is 0",
    )

    # HTTP server.
    host: str = Field(
        default="127.0.0.1",
        description="address to listen on (the images set 0.0.0.0); beyond loopback without "
        "API keys `nextword serve` warns",
    )
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on")
    workers: int = Field(
        default=0, ge=0, description="API processes; 0 = one per two cores, 1 to 8"
    )
    engine_address: str = Field(
        default="",
        description="ZeroMQ address prefix of the engine process (set by `nextword serve` "
        'for its API processes); "" = run the engine inside this process',
    )
    metrics_dir: str = Field(
        default="",
        validation_alias="PROMETHEUS_MULTIPROC_DIR",
        description="prometheus_client's multiprocess directory (set by `nextword serve`)",
    )
    engine_restarts: int = Field(
        default=5,
        ge=0,
        description="engine process deaths within engine_restart_window_s that `nextword "
        "serve` restarts (with back-off, API processes keeping their connections); the next "
        "death stops the service with exit status 1. 0 = the first death stops it",
    )
    engine_restart_window_s: float = Field(
        default=300.0, gt=0, description="the window over which engine deaths are counted"
    )
    engine_restart_wait_s: float = Field(
        default=5.0,
        ge=0,
        description="while the engine restarts, how long a request waits for it before it "
        "is answered `engine_restarting` (503, retry later). 0 = answered at once",
    )
    ws_per_message_deflate: bool = Field(
        default=False,
        description="offer WebSocket per-message compression (costs CPU on small messages)",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        default="info", description="the service's and uvicorn's log level"
    )

    # Connection limits (enforced by each API process of `nextword serve`).
    header_timeout_s: float = Field(
        default=10.0,
        ge=0,
        description="seconds from a connection's (or a request's) first byte to the end of "
        "its headers, WebSocket upgrades included; then 408 and closed. 0 = no limit",
    )
    max_header_bytes: int = Field(
        default=32_768,
        ge=0,
        description="most bytes of a request's line and headers together (WebSocket upgrades "
        "included); over it 431 and the connection closed. 0 = no cap",
    )
    keep_alive_timeout_s: int = Field(
        default=5, ge=1, description="idle seconds before an HTTP keep-alive connection is closed"
    )
    max_connections: int = Field(
        default=4_096,
        ge=0,
        description="open connections (HTTP and WebSocket) per API process; over it a new "
        "connection gets 503 and is closed. 0 = no cap",
    )
    max_connections_per_client: int = Field(
        default=512,
        ge=0,
        description="open connections per client address per API process (the peer address: "
        "behind a proxy, every client shares the proxy's); over it 429 and closed. 0 = no cap",
    )
    api_keys: str = Field(
        default="",
        description='API keys: "name:key" pairs, comma-separated, or "@FILE" (one a line). '
        "When set, every /v1 route needs `Authorization: Bearer KEY` (a WebSocket may pass "
        '?access_token=KEY) and a session belongs to the key that created it. "" = open',
    )
    protect_metrics: bool = Field(
        default=False, description="with API keys, /metrics needs a key too"
    )
    rate_limit: float = Field(
        default=0.0,
        ge=0,
        description="requests per second per API key (per client address without keys); "
        "WebSocket messages count. Over it: 429 with Retry-After. 0 = no limit",
    )
    rate_burst: int = Field(
        default=0, ge=0, description="requests allowed at once above the rate; 0 = 2 x rate"
    )
    allowed_origins: str = Field(
        default="",
        description="WebSocket `Origin`s allowed (comma list, e.g. https://app.example; * = "
        'any); "" = same origin only: no Origin (non-browser clients) or one whose host is '
        "the Host header. Others are refused with HTTP 403 before the upgrade",
    )
    ws_idle_timeout_s: float = Field(
        default=300.0,
        ge=0,
        description="a WebSocket stream with no client message for this long is closed "
        '(1000, reason "idle timeout"). 0 = never',
    )
    ws_send_timeout_s: float = Field(
        default=20.0,
        gt=0,
        description="a WebSocket whose client does not read is dropped once its send buffer "
        "has been full this long",
    )
    ws_ping_interval_s: float = Field(
        default=20.0, ge=0, description="seconds between WebSocket pings; 0 = no pings"
    )
    ws_ping_timeout_s: float = Field(
        default=20.0,
        gt=0,
        description="a WebSocket whose pong does not come within this long is closed (1011)",
    )

    # Sessions.
    session_ttl_s: float = Field(
        default=1800.0,
        gt=0,
        description="idle seconds before a session expires (with Redis: key expiry, refreshed by "
        "every step)",
    )
    session_cap: int = Field(
        default=100_000,
        ge=1,
        description="most sessions the engine holds; past it the least recently used are "
        "evicted (with Redis it bounds the engine's copy in front of Redis)",
    )
    max_sessions_per_key: int = Field(
        default=0,
        ge=0,
        description="most sessions per API key (per client address without keys); a new one "
        "past it evicts that key's least recently used session, never another key's. 0 = no cap",
    )
    session_store: str = Field(
        default="memory",
        description='"memory", "redis://host:port/db" (one Redis), or '
        '"redis+cluster://host:port[,host:port...]" (a Redis Cluster, seed nodes; '
        "`?wait_replicas=N` makes each write wait for N replicas)",
    )
    session_store_write: Literal["through", "behind"] = Field(
        default="through",
        description='with Redis: "through" writes each batch before answering (loses '
        'nothing answered); "behind" answers first and flushes every 50 ms',
    )
    session_store_behind_window_s: float = Field(
        default=1.0,
        gt=0,
        description='with "behind": once the oldest step not yet flushed to Redis is this '
        "old, session steps are refused (503 store_unavailable, nothing applied) until Redis "
        "catches up: what a crash can lose is bounded by it",
    )
    session_store_timeout_s: float = Field(
        default=1.0,
        gt=0,
        description="a Redis command (read or write) not answered within this long fails "
        "the steps that need it (503 store_unavailable): a hung Redis is treated as a dead one",
    )

    # Adaptation (service/engine/adapt.py).
    adapt: bool = Field(
        default=True,
        description="answers mix in the writer's own recent words (a per-session recency "
        "cache, typed words outside the vocabulary included) unless a request or session "
        "says `adapt: false`; the words are remembered either way, until "
        "DELETE /v1/sessions/{id}/memory",
    )
    adapt_memory: bool = Field(
        default=True,
        description="keep a memory of each session's words at all; false: none is kept (a "
        "session is 2 KB smaller) and answers come from the model alone, whatever `adapt` says",
    )

    # Batching.
    max_batch: int = Field(default=256, ge=1, description="most steps in one model run")
    max_wait_ms: float = Field(
        default=2.0,
        ge=0,
        description="longest a step waits for its batch to fill, from its arrival (steps queued during a run go at once after it)",
    )
    max_queue: int = Field(
        default=10_000,
        ge=1,
        description="steps waiting per model before requests get 503 `overloaded`",
    )
    queue_share: float = Field(
        default=0.25,
        gt=0,
        le=1,
        description="most of a model's queue (max_queue) one API key, or one client address "
        "without keys, may hold (its steps waiting or running); past it that client's steps "
        "get 503 overloaded while others' still queue. Retry-After comes from the measured "
        "drain rate",
    )
    prefill_chunk: int = Field(
        default=16,
        ge=0,
        description="most tokens one step runs in one batch: a longer text runs in chunks, "
        "one per batch, interleaved with other steps (a batch runs at most max(max_batch, "
        "8 x this) tokens, at most 4 x this of them chunks of long steps). 0 = every step "
        "whole, no token bound",
    )

    # Limits on requests.
    max_text_chars: int = Field(
        default=10_000, ge=1, description="longest `text` of a request or stream message"
    )
    max_tokens_per_request: int = Field(
        default=2_048, ge=1, description="most tokens one request or stream message adds"
    )
    max_ws_message_bytes: int = Field(
        default=65_536,
        ge=1,
        description="largest WebSocket frame; a larger one closes the stream with 1009",
    )

    def api_processes(self) -> int:
        """How many API processes `nextword serve` starts."""
        return self.workers or max(1, min(8, (os.cpu_count() or 1) // 2))

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("session_store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        if value.startswith(CLUSTER_SCHEMES):
            parse_cluster_url(value)  # a clear error at start, not at the first request
            return value
        if value != "memory" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError('session_store must be "memory", a redis:// or redis+cluster:// URL')
        return value
