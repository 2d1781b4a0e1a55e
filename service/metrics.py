"""Prometheus metrics of the service, defined once and updated where things happen.

Every metric lives in the default registry and is named `nextword_*`. The API edge
records request latency and WebSocket traffic; the predictor, batcher and session
store record steps, batch sizes and session counts. Add metrics here; never rename
one (dashboards and alerts depend on the names).
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

# Request latency spans a cached start-of-text answer (~0.1 ms) to a long prefill.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

# --- API edge -------------------------------------------------------------------

HTTP_REQUEST_SECONDS = Histogram(
    "nextword_http_request_duration_seconds",
    "Time to answer an HTTP request, by method and route template.",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)
HTTP_REQUESTS = Counter(
    "nextword_http_requests",
    "HTTP requests answered, by method, route template and status code.",
    ["method", "route", "status"],
)
WS_CONNECTIONS = Gauge(
    "nextword_ws_connections",
    "Open WebSocket connections on /v1/stream.",
    multiprocess_mode="livesum",
)
WS_MESSAGES = Counter(
    "nextword_ws_messages",
    "WebSocket messages sent on /v1/stream, by type (ready, predictions, error).",
    ["type"],
)
WS_MESSAGE_SECONDS = Histogram(
    "nextword_ws_message_duration_seconds",
    "Time from receiving a WebSocket message to sending its answer.",
    buckets=LATENCY_BUCKETS,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


def render(multiprocess_dir: str = "") -> bytes:
    """The metrics in the Prometheus text format: of this process, or, with the directory
    that every process of `nextword serve` writes into, of all of them together."""
    if not multiprocess_dir:
        return _generate_latest(REGISTRY)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=multiprocess_dir)
    return _generate_latest(registry)


# --- engine, batcher and session store (core) ---------------------------------------

ENGINE_RESTARTS = Counter(
    "nextword_engine_restarts",
    "Engine processes started by `nextword serve` to replace one that died.",
)

STEPS = Counter(
    "nextword_steps",
    "Steps answered (one per request: a single word or a prefill), by model and outcome.",
    ["model", "outcome"],
)
STEPS_RETRIED = Counter(
    "nextword_steps_retried",
    "Session steps recognised as a retry of the session's last step (by their id): "
    "answered, not applied a second time.",
)
TOKENS = Counter(
    "nextword_tokens",
    "Tokens run through a model (prefill and streaming steps).",
    ["model"],
)
BATCH_SIZE = Histogram(
    "nextword_batch_size",
    "Steps gathered into one batch, by model.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
BATCH_SECONDS = Histogram(
    "nextword_batch_run_duration_seconds",
    "ONNX Runtime time of one batch (all its runs), by model.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_DEPTH = Gauge(
    "nextword_queue_depth",
    "Steps waiting for a batch, by model.",
    ["model"],
    multiprocess_mode="livesum",
)
ACTIVE_SESSIONS = Gauge(
    "nextword_active_sessions",
    "Live sessions in the session store.",
    multiprocess_mode="livesum",
)
SESSION_EVICTIONS = Counter(
    "nextword_session_evictions",
    "Sessions dropped because the store was full (least recently used first).",
)
SESSION_EXPIRATIONS = Counter(
    "nextword_session_expirations",
    "Sessions dropped after their idle TTL.",
)
STORE_CONFLICTS = Counter(
    "nextword_store_conflicts",
    "Sessions written behind whose flush lost the compare-and-set to another engine.",
)
POOL_SPILLS = Counter(
    "nextword_state_pool_spills",
    "Pool rows freed by spilling idle sessions' states to host memory, by model.",
    ["model"],
)
POOL_ROWS = Gauge(
    "nextword_state_pool_rows",
    "Rows of a model's resident state pool, by model and use (used, free).",
    ["model", "use"],
    multiprocess_mode="livesum",
)
