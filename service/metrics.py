"""Prometheus metrics of the service, defined once and updated where things happen.

Every metric lives in the default registry and is named `nextword_*`. The API edge
records request latency and WebSocket traffic; the predictor, batcher and session
store record steps, batch sizes and session counts. Add metrics here; never rename
one (dashboards and alerts depend on the names).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram
from prometheus_client import generate_latest as _generate_latest

# Request latency spans a cached start-of-text answer (~0.1 ms) to a long prefill.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
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


def render() -> bytes:
    """The default registry in the Prometheus text format."""
    return _generate_latest(REGISTRY)
