"""Prometheus metrics of the service, defined once and updated where things happen.

Every metric lives in the default registry and is named `nextword_*`. The API edge
records request latency and WebSocket traffic; the predictor, batcher and session
store record steps, batch sizes and session counts. Add metrics here; never rename
one (dashboards and alerts depend on the names).
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from typing import Any

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


# --- counted in process, published once per tick ---------------------------------------


class Tally:
    """Counts and observations of the API's hot path, kept in plain Python and published to
    the Prometheus metrics once per event loop tick (and before every render).

    A multiprocess metric's every `inc` takes a lock, calls `getpid()` (a system call) and
    writes its mmap'ed file: three to five of those per WebSocket message were several
    per cent of an API process's CPU. Here a message costs a dict update; the tick that
    publishes does one write per series however many messages it carried. Another
    process's `/metrics` sees them one tick later at most.
    """

    def __init__(self) -> None:
        self._counts: dict[Any, float] = {}  # a counter's child -> to add
        self._observed: dict[Any, list[float]] = {}  # a histogram's child -> values
        self._scheduled_at: float | None = None  # when a publish was last scheduled

    def inc(self, child: Any, amount: float = 1.0) -> None:
        """Add `amount` to a counter (a child of a labelled one, or one without labels)."""
        self._counts[child] = self._counts.get(child, 0.0) + amount
        self._schedule()

    def observe(self, child: Any, value: float) -> None:
        """Observe `value` in a histogram (a child, or one without labels)."""
        values = self._observed.get(child)
        if values is None:
            self._observed[child] = [value]
        else:
            values.append(value)
        self._schedule()

    def _schedule(self) -> None:
        # Once per tick; again if the publish scheduled a second ago never ran (its loop
        # stopped: tests run apps on several loops), so nothing is held for good.
        now = time.monotonic()
        if self._scheduled_at is not None and now - self._scheduled_at < STALE_S:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside a loop (a script, a test): at once
            self.publish()
            return
        self._scheduled_at = now
        loop.call_soon(self.publish)

    def publish(self) -> None:
        """Write what was counted since the last call into the metrics."""
        self._scheduled_at = None
        counts, self._counts = self._counts, {}
        observed, self._observed = self._observed, {}
        for counter, amount in counts.items():
            counter.inc(amount)
        for histogram, values in observed.items():
            observe_all(histogram, values)


def observe_all(histogram: Any, values: list[float]) -> None:
    """`histogram.observe(v)` for each value, with one write per bucket touched.

    prometheus_client has no bulk observe: this adds to the histogram's own per-bucket
    values and sum (`_upper_bounds`, `_buckets`, `_sum`: what `observe` updates; the tests
    compare the result with `observe`'s). Should a release rename them, it observes one
    by one.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:
        for value in values:
            histogram.observe(value)
        return
    per_bucket: dict[int, int] = {}
    for value in values:
        i = bisect_left(bounds, value)  # the first bound >= value, as `observe` picks it
        per_bucket[i] = per_bucket.get(i, 0) + 1
    total.inc(sum(values))
    for i, count in per_bucket.items():
        buckets[i].inc(count)


STALE_S = 1.0
TALLY = Tally()  # this process's


def render(multiprocess_dir: str = "") -> bytes:
    """The metrics in the Prometheus text format: of this process, or, with the directory
    that every process of `nextword serve` writes into, of all of them together (this
    process's tally published first)."""
    TALLY.publish()
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

ENGINE_FRAMES = Counter(
    "nextword_engine_frames",
    "Frames of requests the engine process received from the API processes.",
)
ENGINE_REQUESTS = Counter(
    "nextword_engine_requests",
    "Requests the engine process received in those frames.",
)
ENGINE_HANDOFFS = Counter(
    "nextword_engine_handoffs",
    "Hand-offs of received frames from the engine's input thread to its event loop "
    "(each carries the frames that queued meanwhile).",
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
LOST_SESSIONS = Counter(
    "nextword_lost_sessions",
    "Steps failed as unknown sessions because their records say their states are on this "
    "engine's device and no residency entry has them (a bug: should stay 0), by model.",
    ["model"],
)
POOL_ROWS = Gauge(
    "nextword_state_pool_rows",
    "Rows of a model's resident state pool, by model and use (used, free).",
    ["model", "use"],
    multiprocess_mode="livesum",
)
