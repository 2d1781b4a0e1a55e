"""Cross-session micro-batching: one background loop per model gathers steps into runs.

In the style of Ray Serve's `serve/batching.py`, without its future per request: every
request is a `Step` in a queue; the loop takes up to `max_batch` steps (waiting at most
`max_wait_ms` for the batch to fill), then for the whole batch:

    store.get_many (one round trip) -> model runs -> store.put_many (one round trip,
    compare-and-set) -> the steps end: answered into their sinks

A step ends exactly once (`Step.done`, set by `StepBatcher._end` only): the scheduler
calls its owner's sink (`StepSink`) synchronously with the steps that ended together and
their outcomes (as vLLM's engine core collects a step's outputs rather than resolving a
future per request). `submit` wraps a future around that for in-process callers and tests.

The model runs are `service.engine.execute`'s (`Execution`, in the engine's thread):
this module takes the batch, reads the sessions and locates their states, hands the
batch over (as the arrays of a `Common` batch in the common case, else one `StepRun`
per step), then writes and answers.

A session has at most one step in a batch, and its steps are applied in the order
they arrived. A step that lost a compare-and-set (another replica wrote the session
meanwhile) is retried, in order, in the next batch; past `max_retries` it fails with
`Contended` (a 503 with Retry-After: nothing was applied, the client retries). A failed
run fails every step of the batch with `StepFailed` and writes nothing. A step
cancelled (`cancel`: the client went away) ends at once; the loop drops it before the
run, and does not write it after it.

Stateless steps never wait for the session store. They queue apart from the sessions'
steps. A batch with sessions' steps (the "session lane": one such batch at a time, so a
session's steps still apply one batch after another) runs as a task of its own, and
while its store round trips are out the loop keeps taking batches of stateless steps. A
stateless step taken into a session batch is answered before the batch's write, and, if
the batch's read takes longer than `store_grace_ms`, run apart at once: a slow or hung
store (Redis not answering until its timeout) delays a prediction by that grace at most.

How a step runs. The store keeps, per session, the state after the last token, the
state before it and the last token (see `SessionRecord`). A step of T > 1 new tokens
first runs its first T - 1 tokens (giving the new "previous" state), then the last
token; a step of one token only the second run; a step of no token (a new `prefix`
for the same context) re-runs the last token from the previous state. Rows are
grouped by length: one run per distinct length and phase.

Long steps run in chunks (chunked prefill). A step with more than `prefill_chunk` tokens
to run takes several batches: each batch runs the next `prefill_chunk` of its first
tokens (one chunk per batch, interleaved with other steps), and the batch that runs the
rest answers it. What it has run so far stays in the step (its `StepRun`: the record read
when it started, the state after the tokens run): a session's store record is read in
the step's first batch and written once, in its last, with the compare-and-set on the
version read at the start, so a step is applied whole or not at all; a conflict retries
the whole step. A step in progress goes back to the front of its lane, so a session's
later steps still wait behind it. Feeding a text in chunks gives the same state, to
float rounding, as running it whole.

With a state pool (`StatePool`) every state a batch runs from or into is a pool row, and
the scheduler asks `residency` (never the store) where a session's state is: the rows
of its entry (held for the batch), or its record's host states, uploaded first. Each
batch's rows are one `Holding`, released when the batch ends, whatever ended it; the
rows answered are committed to entries first (with the memory store, after the
compare-and-set wrote the record `state_on_device`; through any other store the new
states are copied to the host for the write). A long step holds the row it has run up
to between its batches (`StepRun.carried`), handed to its next batch or released when
it is dropped. When a batch needs more rows than are free, `Residency.spill` moves the
least recently written sessions not in flight to host memory.

A batch runs at most `max_batch_tokens` tokens (summed over its rows; a row counts the
tokens it runs in this batch; default max(`max_batch`, 8 x `prefill_chunk`)), of which
chunks of long steps take at most `max_prefill_tokens` (default 4 x `prefill_chunk`: four
long rows) in flight, the session batch and a stateless batch together (a stateless
batch may add one chunk). The rest stays for short steps queued behind long ones: one
long request delays another user's step by about one batch of chunks, and however many
long requests wait, a run holds at most (`max_batch`, `prefill_chunk`) tokens and the
full-vocabulary output only for rows with a prefix, so the engine's memory does not grow
with them (the steps waiting hold only their token ids, those in progress their (L, H)
states).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from itertools import compress, islice, repeat
from operator import attrgetter, eq, is_, or_
from typing import Any

import numpy as np

from service import metrics
from service.engine.adapt_hooks import Adaptation
from service.engine.batching import Bounds, Cost, take
from service.engine.execute import Common, Execution, StepRunner, Work, steps_of, to_upload
from service.engine.fairness import QueueShares
from service.engine.pool import PoolExhausted, StatePool
from service.engine.residency import NO_ROW, Holding, Residency
from service.engine.runtime import State
from service.engine.steps import (
    BatchResults,
    Outcome,
    StateRef,
    Step,
    StepResult,
    StepRun,
    StepSink,
    as_retry,
    pick,
)
from service.engine.threads import name_os_thread
from service.errors import (
    Contended,
    NextwordError,
    Overloaded,
    PartlyWritten,
    StepFailed,
    StoreUnavailable,
    UnknownSession,
)
from service.store import SessionRecord, SessionStore
from service.store.base import SessionRows
from service.store.memory import MemorySessionStore

log = logging.getLogger(__name__)

_DONE = attrgetter("done")
_ROW = attrgetter("row")
_SESSION = attrgetter("session_id")
_TOKENS = attrgetter("tokens")
_PREFIX_IDS = attrgetter("prefix_ids")
_STEP_ID = attrgetter("step_id")
_FRESH = attrgetter("fresh")
_CREATE = attrgetter("create")


def _to_host(
    pool: StatePool, records: list[SessionRecord], rows: np.ndarray | None
) -> list[SessionRecord]:
    """The records a batch writes, with their states copied from the pool rows `rows`
    ((n, 2): current, previous; None: host states already) to host arrays (one copy for
    all), for a store that serializes states."""
    if rows is None:
        return records
    states = pool.download(rows.ravel())
    return [
        dataclasses.replace(record, state=(*states[2 * i], *states[2 * i + 1]))
        for i, record in enumerate(records)
    ]


def _resolve(future: asyncio.Future[Any], outcome: Any) -> bool:
    if future.done():
        return False
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
    return True


def _settle_futures(steps: list[Step], outcomes: Sequence[Outcome]) -> None:
    """The sink of steps queued by `StepBatcher.submit`: each one's future gets its outcome
    (a cancelled step's future is cancelled already, or is cancelled now)."""
    for step, outcome in zip(steps, outcomes):
        future = step.future
        if future is None or future.done():
            continue
        if outcome is None:
            future.cancel()
        elif isinstance(outcome, StepResult):
            future.set_result(outcome)
        else:
            future.set_exception(outcome)


class StepBatcher:
    """One model's queue of steps and the background loop that runs them in batches."""

    def __init__(
        self,
        runner: StepRunner,
        store: SessionStore,
        *,
        max_batch: int = 256,
        max_wait_ms: float = 2.0,
        max_queue: int = 10_000,
        # With Redis a step's first try may read this engine's stale copy of a session
        # another replica stepped (a try lost by design): racing replicas need headroom.
        max_retries: int = 16,
        store_grace_ms: float = 10.0,
        prefill_chunk: int = 16,
        queue_share: float = 1.0,
        max_batch_tokens: int | None = None,
        max_prefill_tokens: int | None = None,
        clock: Callable[[], float] = time.time,
        adaptation: Adaptation | None = None,
        adapt_default: bool = True,
        pool: StatePool | None = None,
        keep_states: bool = False,
        cache_states: bool = False,
    ) -> None:
        self.runner = runner
        self.store = store
        self.adaptation = adaptation
        self.adapt_default = adapt_default  # a new session's `adapt` when its request has none
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.shares = QueueShares(max_queue, queue_share)
        self.max_retries = max_retries
        self.store_grace_s = store_grace_ms / 1000.0
        # prefill_chunk 0: no chunks and no token bound (every step runs whole, as one row).
        unbounded = sys.maxsize // 4
        self.prefill_chunk = prefill_chunk if prefill_chunk > 0 else unbounded
        if max_prefill_tokens is None:  # four long rows' chunks per batch
            max_prefill_tokens = 4 * prefill_chunk if prefill_chunk > 0 else unbounded
        if max_batch_tokens is None:  # at least as much again for short steps
            max_batch_tokens = (
                max(max_batch, 2 * max_prefill_tokens) if prefill_chunk > 0 else unbounded
            )
        # A batch always has room for one chunk: every step can be taken into an empty batch.
        self.max_prefill_tokens = max(max_prefill_tokens, self.prefill_chunk)
        self.max_batch_tokens = max(max_batch_tokens, self.max_prefill_tokens)
        self.clock = clock
        self.name = runner.name
        self.revision = runner.revision
        self._pending: deque[Step] = deque()  # sessions' steps
        self._stateless: deque[Step] = deque()  # steps without a session
        # The batch with sessions' steps in flight (its task), at most one at a time.
        self._session_task: asyncio.Task[None] | None = None
        self._session_batch: list[Step] = []
        self._session_long = 0  # tokens of long steps' chunks in that batch
        self._long_taken = 0  # ... in the batch `_take` made last
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._waiter: asyncio.Future[None] | None = None
        self._wake_at = 1
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: list[Step] = []
        start_current: State = tuple(a[:, 0, :] for a in runner.start.state)
        zeros: State = tuple(np.zeros_like(a) for a in start_current)
        self._halves = len(start_current)  # arrays in a state (h, or h and c)
        # With a state pool every state of a batch is a pool row (`StatePool`), and where
        # sessions' states live is `residency`'s to say. `keep_states` (the wiring knows the
        # store is this process's memory store): sessions stay resident between steps,
        # their records written `state_on_device`. `cache_states` (a shared store written
        # through): records carry host states, and the rows of what was written are kept
        # too. The start and zero states are rows held for the batcher's life.
        self.pool = pool
        if keep_states and not isinstance(store, MemorySessionStore):
            raise TypeError("keep_states is for the in-process MemorySessionStore")
        home = store if keep_states and isinstance(store, MemorySessionStore) else None
        self.residency = None if pool is None else Residency(pool, home, cache_states)
        # With a pool: the store that takes a common batch's records as columns.
        self._home = home if pool is not None else None
        self._start_current: StateRef = start_current
        self._zeros: StateRef = zeros
        if self.pool is not None:
            held = self.pool.upload([start_current, zeros])
            self.pool.pin(held)
            self._start_current, self._zeros = int(held[0]), int(held[1])
        self.execution = Execution(
            runner,
            pool,
            self.residency,
            adaptation,
            adapt_default,
            self.prefill_chunk,
            clock,
            self._start_current,
            self._zeros,
        )
        self._spills = metrics.POOL_SPILLS.labels(self.name)
        self._pool_used = metrics.POOL_ROWS.labels(self.name, "used")
        self._pool_free = metrics.POOL_ROWS.labels(self.name, "free")
        if runner.start.probs is None:
            raise ValueError("the runner's start output must include the full distribution")
        self._vocab_size = int(runner.start.probs.shape[1])
        self._queue_depth = metrics.QUEUE_DEPTH.labels(self.name)
        self._batch_size = metrics.BATCH_SIZE.labels(self.name)
        self._batch_seconds = metrics.BATCH_SECONDS.labels(self.name)
        self._steps = {
            outcome: metrics.STEPS.labels(self.name, outcome)
            for outcome in ("ok", "error", "failed", "cancelled")
        }

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start the background loop (owned by the lifespan)."""
        if self._task is None:
            self._executor = ThreadPoolExecutor(
                1,
                thread_name_prefix=f"nextword-{self.name}",
                initializer=name_os_thread,  # its CPU told apart from the loop's (threads.py)
                initargs=(f"nw-run-{self.name}",),
            )
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name=f"batcher-{self.name}"
            )

    async def stop(self, drain: bool = True) -> None:
        """Stop taking steps; with `drain`, finish every queued step first."""
        self._closing = True
        self._wake(force=True)
        cut_short = self._session_batch
        if self._task is not None:
            if not drain:
                self._task.cancel()
                if self._session_task is not None:
                    self._session_task.cancel()
            await asyncio.wait([self._task])  # never cancels the loop if this wait is
            self._task = None
        if self._session_task is not None:
            await asyncio.wait([self._session_task])
        # Left only when not draining: the batches cut short and the queues.
        stopped = StepFailed(f"model {self.name!r} stopped during this step")
        self._fail(self._in_flight + cut_short, stopped)
        queued = [*self._pending, *self._stateless]
        self._fail(queued, Overloaded(f"model {self.name!r} is shutting down"))
        self._pending.clear()
        self._stateless.clear()
        for step in queued:
            self._let_go(step)
        if self.residency is not None:
            self.residency.close()  # the sessions' states are not kept past the engine
        self._queue_depth.set(0)
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, True)  # a cut-short run ends
            self._executor = None

    @property
    def queue_depth(self) -> int:
        """Steps waiting for a batch."""
        return len(self._pending) + len(self._stateless)

    # --- requests ----------------------------------------------------------------

    def submit_many(self, steps: list[Step], sink: StepSink) -> None:
        """Queue a frame's steps for this model; each ends once, into `sink` (`StepSink`),
        with its result, its error or None (cancelled). A step refused (the batcher stopping,
        the queue full, its client over its share) ends at once, into `sink`, with
        `Overloaded`. The intake's one pass: the clock read and the loop woken once."""
        refused: list[Step] = []
        errors: list[Outcome] = []
        if self._closing or self._task is None:
            error = Overloaded(f"model {self.name!r} is not taking steps (shutting down)")
            refused, errors = steps, [error] * len(steps)
            steps = []
        now = asyncio.get_running_loop().time()
        pending, stateless = self._pending, self._stateless
        room = self.max_queue - self.queue_depth
        shares = self.shares
        for step in steps:
            if room <= 0:
                refused.append(step)
                errors.append(self._full())
                continue
            if step.client:  # a step with no client ("": in-process use) takes no share
                try:
                    shares.admit(step.client, self.name)
                except Overloaded as exc:
                    refused.append(step)
                    errors.append(exc)
                    continue
            room -= 1
            step.sink = sink
            step.queued_at = now
            # The depth gauge is sampled once per batch, not per step.
            (pending if step.session_id is not None else stateless).append(step)
        if refused:
            for step in refused:
                step.done = True  # it never took a share: nothing to give back
            sink(refused, errors)
        self._wake()

    def _full(self) -> Overloaded:
        return Overloaded(
            f"too many steps waiting for model {self.name!r}; retry later",
            retry_after_s=self.shares.rate.retry_after(self.queue_depth),
        )

    def submit(self, step: Step) -> asyncio.Future[StepResult]:
        """Queue one step and return a future for its outcome (the awaitable API, for
        in-process callers and tests); refused, it raises `Overloaded` and queues nothing.
        Cancelling the future cancels the step (`cancel`)."""
        if self._closing or self._task is None:
            raise Overloaded(f"model {self.name!r} is not taking steps (shutting down)")
        if self.queue_depth >= self.max_queue:
            raise self._full()
        future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        step.future = future
        self.submit_many([step], _settle_futures)
        if step.done:  # refused (its client's share): `_settle_futures` set the error
            error = future.exception()  # retrieved: raised here, not reported as lost
            assert error is not None
            raise error
        future.add_done_callback(partial(self._cancelled, step))
        return future

    def _cancelled(self, step: Step, future: asyncio.Future[StepResult]) -> None:
        if future.cancelled():
            self.cancel(step)

    def cancel(self, step: Step) -> None:
        """Cancel a queued or running step (its client went away): it ends now, into its
        sink with None, unless it ended already. The loop drops it where it finds it: before
        its run, or after it, never written (`step.done`)."""
        self._end([step], [None], answered=0)

    def _end(self, steps: list[Step], outcomes: Sequence[Outcome], answered: int) -> int:
        """End the steps not ended yet with their outcomes (`answered`: whether these are
        results; a failure's or a cancel's are not): each leaves its client's share and goes
        to its sink, with the others of its sink in one call (a batch's `BatchResults` stay
        columns). Returns how many ended now.

        The one way a queued step ends: `done` is set here only, so a step ends once."""
        ended, outs = steps, outcomes
        if any(map(_DONE, steps)):
            keep = [not step.done for step in steps]
            ended = [step for step, k in zip(steps, keep) if k]
            outs = pick(outcomes, keep)  # type: ignore[arg-type]
        if not ended:
            return 0
        for step in ended:
            step.done = True
        # A generator: read only where some client holds a share (not in-process use).
        self.shares.release_many((step.client for step in ended), len(ended) if answered else 0)
        sink = ended[0].sink
        if all(step.sink is sink for step in ended):  # the usual case: one frame's steps
            assert sink is not None
            sink(ended, outs)
            return len(ended)
        groups: dict[StepSink, list[int]] = {}
        for i, step in enumerate(ended):
            assert step.sink is not None
            groups.setdefault(step.sink, []).append(i)
        for each, at in groups.items():
            if isinstance(outs, BatchResults):
                each([ended[i] for i in at], outs.take(at))
            else:
                each([ended[i] for i in at], [outs[i] for i in at])
        return len(ended)

    async def step(self, step: Step) -> StepResult:
        """Queue a step and wait for its result (cancelling the wait cancels the step)."""
        return await self.submit(step)

    # --- the loop ----------------------------------------------------------------

    def _available(self) -> int:
        """Steps the loop can take now: stateless ones, and sessions' unless the lane is busy."""
        return len(self._stateless) + (len(self._pending) if self._session_task is None else 0)

    def _oldest(self) -> float:
        """When the oldest step the loop can take now was queued (the lanes' heads: a retried
        or long step put back at the front keeps its first arrival)."""
        times = []
        if self._stateless:
            times.append(self._stateless[0].queued_at)
        if self._pending and self._session_task is None:
            times.append(self._pending[0].queued_at)
        return min(times) if times else asyncio.get_running_loop().time()

    def _idle(self) -> bool:
        return not self._pending and not self._stateless and self._session_task is None

    def _wake(self, force: bool = False) -> None:
        waiter = self._waiter
        if waiter is not None and (force or self._available() >= self._wake_at):
            _resolve(waiter, None)

    async def _wait(self, at_least: int, timeout: float | None) -> None:
        """Until `at_least` steps can be taken, `timeout` passed, or the batcher stops.

        Stopping cuts short the waits for a batch to fill (`timeout` set), not the wait
        for the session lane to be free."""
        if self._available() >= at_least or (self._closing and timeout is not None):
            return
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        self._wake_at = at_least
        timer = None if timeout is None else loop.call_later(timeout, _resolve, waiter, None)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._waiter = None

    async def _loop(self) -> None:
        while True:
            if not self._available():
                if self._closing and self._idle():
                    return
                await self._wait(1, None)  # a step, or the session lane free (forced wake)
                continue
            if self.max_wait_s > 0:
                # The wait for a batch to fill is bounded from the oldest step's arrival, not
                # from now: after a run, the steps that queued during it do not wait again.
                left = self._oldest() + self.max_wait_s - asyncio.get_running_loop().time()
                if left > 0:
                    await self._wait(self.max_batch, left)
            batch = self._take(sessions=self._session_task is None)
            self._queue_depth.set(self.queue_depth)
            if not batch:
                continue
            if any(step.session_id is not None for step in batch):
                # Its store round trips must not hold up stateless steps: a task of its own.
                self._session_batch = batch
                self._session_long = self._long_taken
                self._session_task = asyncio.get_running_loop().create_task(
                    self._guarded(batch), name=f"batch-{self.name}"
                )
                self._session_task.add_done_callback(self._session_batch_done)
            else:
                self._in_flight = batch  # what stop(drain=False) must fail if it cuts in
                await self._guarded(batch)
                self._in_flight = []

    async def _guarded(self, batch: list[Step]) -> None:
        try:
            await self._process(batch)
        except Exception as exc:  # a bug: fail the batch, keep serving
            log.exception("batch of model %s failed", self.name)
            self._fail(batch, StepFailed(f"the step failed ({type(exc).__name__})"))

    def _session_batch_done(self, task: asyncio.Task[None]) -> None:
        self._session_task = None
        self._session_batch = []
        self._session_long = 0
        self._wake(force=True)  # the sessions' queued steps can be taken now

    def _cost(self, step: Step) -> Cost:
        """The tokens `step` runs in its next batch, and whether it is a long (chunked) step."""
        row = step.row
        left = row.left if row is not None else max(1, len(step.tokens))
        return min(left, self.prefill_chunk), row is not None or left > self.prefill_chunk

    def _take(self, sessions: bool) -> list[Step]:
        """The next batch (`batching.take`): sessions' steps first when `sessions` (the lane
        is free), one per session, then stateless ones, within the batch's bounds. Chunks
        of long steps in flight stay within `max_prefill_tokens` (plus one chunk for a
        stateless batch taken while a session batch runs: it runs after that batch, before
        the next)."""
        if sessions:
            quick = self._take_common()
            if quick is not None:
                self._long_taken = 0
                return quick
        long_cap = max(self.prefill_chunk, self.max_prefill_tokens - self._session_long)
        taken = take(
            self._pending,
            self._stateless,
            Bounds(self.max_batch, self.max_batch_tokens, long_cap),
            self._cost,
            self._gone,
            sessions,
        )
        if taken.dropped:
            self._steps["cancelled"].inc(taken.dropped)
        self._long_taken = taken.long_tokens
        return taken.steps

    def _take_common(self) -> list[Step] | None:
        """`_take`'s batch in the common case, checked per batch with C-level passes
        rather than `take`'s per-step calls; None where it is not that case (`take` then
        forms the batch). The common case: the session lane's first min(queue, max_batch)
        steps are all taken by `take`'s rules, because none was cancelled, none is a long
        step (in progress or to chunk), their sessions are distinct and their tokens fit
        `max_batch_tokens`; and the batch is full, or no stateless step waits to fill it.
        `take` would then take exactly these, in order, and nothing else."""
        pending = self._pending
        n = min(len(pending), self.max_batch)
        if not n or (n < self.max_batch and self._stateless):
            return None
        steps = list(pending) if n == len(pending) else list(islice(pending, n))
        if any(map(_DONE, steps)) or any(map(_ROW, steps)):
            return None
        if len(set(map(_SESSION, steps))) != n:
            return None
        sizes = list(map(len, map(_TOKENS, steps)))
        # A step of no token costs one (`_cost`); none is chunked if none exceeds a chunk.
        if max(sizes) > self.prefill_chunk or sum(sizes) + sizes.count(0) > self.max_batch_tokens:
            return None
        if n == len(pending):
            pending.clear()
        else:
            popleft = pending.popleft
            for _ in range(n):
                popleft()
        return steps

    def _gone(self, step: Step) -> bool:
        """Whether a queued step ended already (cancelled: its client went away): it is
        dropped, and lets go of the row it carried, if any."""
        if step.done:
            self._let_go(step)
            return True
        return False

    def _let_go(self, step: Step) -> None:
        """Release the row a long step held between its batches (if it held one)."""
        row = step.row
        if row is not None and row.carried != NO_ROW and self.pool is not None:
            self.pool.release(np.array([row.carried], dtype=np.int64))
            row.carried = NO_ROW

    def _adopt(self, steps: list[Step], holding: Holding | None) -> None:
        """The rows long steps carried into this batch are the batch's to release now."""
        if holding is None:
            return
        carried = []
        for step in steps:
            row = step.row
            if row is not None and row.carried != NO_ROW:
                carried.append(row.carried)
                row.carried = NO_ROW
        if carried:
            holding.add(np.array(carried, dtype=np.int64))

    def _fail(self, steps: list[Step], error: NextwordError) -> None:
        failed = self._end(steps, [error] * len(steps), answered=0)
        if failed:
            # "failed": the run failed; a step that lost to other writers is an "error".
            run_failed = isinstance(error, StepFailed) and not isinstance(error, Contended)
            self._steps["failed" if run_failed else "error"].inc(failed)

    # --- one batch ---------------------------------------------------------------

    async def _process(self, batch: list[Step]) -> None:
        holding = None if self.pool is None else Holding(self.pool)
        try:
            await self._process_held(batch, holding)
        finally:
            if holding is not None:
                holding.close()  # every route a batch ends by: its rows go back

    async def _process_held(self, batch: list[Step], holding: Holding | None) -> None:
        self._adopt(batch, holding)
        # A long step in progress read its record in its first batch.
        reads = [s for s in batch if s.session_id is not None and not s.create and s.row is None]
        records: Sequence[SessionRecord | None] = []
        ids: list[str] = []
        if reads:
            ids = [s.session_id for s in reads if s.session_id is not None]
            read = asyncio.ensure_future(self.store.get_many(ids))
            try:
                stateless = [s for s in batch if s.session_id is None]
                if stateless:
                    await asyncio.wait([read], timeout=self.store_grace_s)
                    if not read.done():  # a slow store: the stateless steps do not wait for it
                        batch = [s for s in batch if s.session_id is not None]
                        await self._answer(stateless, holding)
                records = await read
            except NextwordError as exc:
                # Only the sessions' steps need the store: stateless steps still run.
                self._fail([s for s in batch if s.session_id is not None], exc)
                batch = [s for s in batch if s.session_id is None]
                reads, records, ids = [], [], []
            finally:
                if not read.done():
                    read.cancel()  # this batch was cut short (stop without draining)
                elif not read.cancelled():
                    read.exception()  # retrieved, so that no failure is reported as lost
        if len(records) != len(reads):
            self._fail(batch, StoreUnavailable("the session store answered a different count"))
            return
        # One pass over the batch: each live step with the row read for it (-1: not read),
        # those that cannot run failed; and whether the batch is a common one. The read's
        # columns answer the checks: only a row that may have a problem is looked at.
        got = records if isinstance(records, SessionRows) else SessionRows.of(records, ids)
        suspect = self._suspects(got)
        last_steps = got.last_step
        execution = self.execution
        common = execution.takes_common
        chunk = self.prefill_chunk
        j = -1  # the row of `got` (`reads` is a subsequence of `batch`, in order)
        steps: list[Step] = []
        at: list[int] = []
        # The common case, checked per batch: the loop would keep every step, in order.
        plain = common and len(reads) == len(batch) > 0 and self._plain(batch, got, suspect)
        for step in [] if plain else batch:
            was_read = step.session_id is not None and not step.create and step.row is None
            if was_read:
                j += 1
            if step.done:  # cancelled during the read
                continue
            if was_read:
                if step.step_id and last_steps[j] == step.step_id:
                    as_retry(step)
                if suspect[j]:
                    problem = self._problem(step, got[j])
                    if problem is not None:
                        self._fail([step], problem)
                        continue
            if common and (
                step.row is not None
                or step.session_id is None
                or step.prefix_ids is not None
                or not 0 < len(step.tokens) <= chunk
            ):
                common = False
            steps.append(step)
            at.append(j if was_read else -1)
        if plain:
            steps = batch
        found = got if plain else got.take(at)
        located = None
        if holding is not None:
            steps, found, located, uploads = self._locate(steps, found, holding)
            common = common and not uploads
        if not steps:
            return
        if common and located is not None:
            # The rows the steps start from: their entries', or the start rows.
            current, previous = located[:, 0], located[:, 1]
            anew = current == NO_ROW
            if anew.any():
                current = np.where(anew, self._start_current, current)
                previous = np.where(anew, self._zeros, previous)
            work = Common(steps, found, current, previous)
            if await self._compute_rows(work, holding):
                await self._write_common(work)
            return
        rows: list[StepRun] = []
        for i, (step, record) in enumerate(zip(steps, list(found))):
            if step.row is not None:  # a long step's next chunk
                rows.append(step.row)
                continue
            row = StepRun(step, record)
            if located is not None and located[i, 0] != NO_ROW:
                row.current, row.previous = int(located[i, 0]), int(located[i, 1])
            rows.append(row)
        if await self._compute_rows(rows, holding):
            await self._write(self._carry_on(rows))

    def _plain(self, batch: list[Step], got: SessionRows, suspect: list[bool]) -> bool:
        """Whether every step of `batch` (each one read, `got[i]` its row) is a plain step
        of a common batch, checked with C-level passes: not cancelled, no record to check
        (`_suspects`), not a retry of the session's last step, no prefix, and 1 to
        `prefill_chunk` new tokens. `_process_held`'s loop would then keep every step, in
        order, and the batch stay a common one."""
        if any(suspect) or any(map(_DONE, batch)):
            return False
        if not all(map(is_, map(_PREFIX_IDS, batch), repeat(None))):
            return False
        sizes = list(map(len, map(_TOKENS, batch)))
        if 0 in sizes or max(sizes) > self.prefill_chunk:
            return False
        # A step whose id is the session's last step's is a retry (`as_retry`); an empty id
        # matching an empty last id is none.
        return not any(compress(got.last_step, map(eq, map(_STEP_ID, batch), got.last_step)))

    def _locate(
        self, steps: list[Step], records: SessionRows, holding: Holding
    ) -> tuple[list[Step], SessionRows, np.ndarray, bool]:
        """Where each new step's session state is: the rows of its resident entry (held for
        the batch), or its record's host states (uploaded by the run); a record with its
        state nowhere fails its step (`Residency.lost_session`).

        Returns the steps left and their records, their rows ((n, 2): current, previous;
        NO_ROW where a step starts afresh, goes on, or uploads its record's states) and
        whether any uploads."""
        assert self.residency is not None
        n = len(steps)
        rows = np.full((n, 2), NO_ROW, dtype=np.int64)
        anew = np.fromiter(map(or_, map(_FRESH, steps), map(_CREATE, steps)), bool, n)
        at = np.flatnonzero(records.found & ~anew)
        if not len(at):
            return steps, records, rows, False
        ids = records.ids
        found = self.residency.find_many(
            [ids[i] for i in at.tolist()], records.version[at], records.created_at[at]
        )
        missing = found[:, 0] == NO_ROW
        if not missing.all():
            holding.hold(found[~missing].ravel())
        rows[at] = found
        if not missing.any():
            return steps, records, rows, False
        lost = at[missing & records.on_device[at]].tolist()
        if lost:
            for i in lost:
                self._fail([steps[i]], self.residency.lost_session(records[i]))  # type: ignore[arg-type]
            keep = np.ones(n, dtype=bool)
            keep[lost] = False
            steps = [s for s, k in zip(steps, keep) if k]
            records = records.take(np.flatnonzero(keep).tolist())
            rows = rows[keep]
        return steps, records, rows, len(lost) < int(missing.sum())

    def _suspects(self, read: SessionRows) -> list[bool]:
        """For each row read, whether `_problem` must see its record: every row it could
        refuse (not found, another model's or revision's, a host state of another shape, a last token out
        of range or unknown) is one; the others run."""
        bad = ~read.found | (read.last_token >= self._vocab_size) | (read.last_token < 0)
        name = self.name
        if any(model != name for model in set(read.model)):
            bad |= np.fromiter((model != name for model in read.model), bool, len(read))
        if read.revision is not None and any(
            rev and rev != self.revision for rev in set(read.revision)
        ):
            mine = self.revision
            written = (bool(rev) and rev != mine for rev in read.revision)
            bad |= np.fromiter(written, bool, len(read))
        host = ~bad
        if self.residency is not None and self.residency.on_device:
            host &= ~read.on_device  # a state the engine keeps: none here to check
        if host.any():
            size = 2 * self._halves
            states = read.states
            for i in np.flatnonzero(host).tolist():
                if len(states[i]) != size:
                    bad[i] = True
        return bad.tolist()  # type: ignore[no-any-return]

    async def _answer(self, steps: list[Step], holding: Holding | None = None) -> None:
        """Run and answer stateless steps on their own (their rows held by `holding`, or
        by a holding of their own)."""
        own = holding is None and self.pool is not None
        if own:
            assert self.pool is not None
            holding = Holding(self.pool)
        try:
            self._adopt(steps, holding)
            rows = [step.row or StepRun(step, None) for step in steps if not step.done]
            if rows and await self._compute_rows(rows, holding):
                done = self._carry_on(rows)
                self._answer_with([r.step for r in done], [r.result for r in done])  # type: ignore[misc]
        finally:
            if own and holding is not None:
                holding.close()

    def _carry_on(self, rows: list[StepRun]) -> list[StepRun]:
        """After a batch's runs: the rows answered now; long steps with tokens left go back
        to the front of their lane (in order), carrying what they have run."""
        done: list[StepRun] = []
        going: list[StepRun] = []
        for row in rows:
            if row.step.done:  # cancelled during the run: dropped, never written
                self._steps["cancelled"].inc()  # a long step stops here, chunks left unrun
                continue
            (done if row.final else going).append(row)
        for row in going:
            row.step.row = row
        if going and self.pool is not None:
            # Each long step holds the row it has run up to until its next batch.
            carried = np.array([r.first_from for r in going], dtype=np.int64)
            self.pool.hold(carried)
            for row, at in zip(going, carried.tolist()):
                row.carried = at
        for row in done:
            row.step.row = None  # no cycle left to hold the rows it ran into
        self._pending.extendleft(reversed([r.step for r in going if r.step.session_id is not None]))
        self._stateless.extendleft(reversed([r.step for r in going if r.step.session_id is None]))
        if going:
            self._wake()
        return done

    async def _compute_rows(self, work: Work, holding: Holding | None) -> bool:
        """Make a batch's runs in the executor; False (its steps failed) if a run failed."""
        self._batch_size.observe(len(work))
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        reserved = 0
        try:
            reserved = await self._make_room(work)
            await loop.run_in_executor(self._executor, self._compute, work, holding)
        except Exception as exc:
            log.exception("model %s: run of a batch of %d failed", self.name, len(work))
            self._fail(
                steps_of(work),
                StepFailed(
                    f"model {self.name!r} failed to run this batch ({type(exc).__name__}); "
                    "no session was changed"
                ),
            )
            return False
        finally:
            if self.pool is not None:
                self.pool.reserved -= reserved
                self._pool_used.set(self.pool.used)
                self._pool_free.set(self.pool.free)
        self._batch_seconds.observe(time.perf_counter() - started)
        return True

    async def _make_room(self, work: Work) -> int:
        """Reserve the pool rows a batch takes (two per step for its states brought back
        from host memory, one per run), the residency spilling its least recently used
        sessions to host memory when too few are free; returns the rows reserved (the
        caller gives the reservation back once the batch has run)."""
        pool = self.pool
        if pool is None or self.residency is None:
            return 0
        if isinstance(work, Common):  # nothing to upload, two runs at most
            need = 2 * len(work)
        else:
            need = sum(4 if to_upload(row) else 2 for row in work)
        if pool.free < need:
            # Never the sessions in flight: their rows are held, their records being read.
            # A batch's worth at least: spilling is paid per call.
            keep = {s.session_id for s in self._session_batch}
            keep.update(s.session_id for s in steps_of(work))
            spilled = self.residency.spill(max(need - pool.free, 2 * self.max_batch), keep)
            self._spills.inc(spilled)
            if pool.free < need:
                raise PoolExhausted(
                    f"model {self.name!r}: {pool.free} free state rows for a batch of "
                    f"{len(work)} steps; NEXTWORD_STATE_POOL_ROWS={pool.rows} is too small "
                    "for the sessions in flight"
                )
        pool.reserved += need
        return need

    def _problem(self, step: Step, record: SessionRecord | None) -> NextwordError | None:
        """Why a step cannot run on the record read for it, if it cannot."""
        if (
            record is None
            or record.model != self.name
            or (
                not (record.state_on_device and self.residency and self.residency.on_device)
                and len(record.state) != 2 * self._halves
            )
            or record.last_token >= self._vocab_size
        ):
            return UnknownSession(
                f"no session {step.session_id!r} (never created, deleted or expired)"
            )
        if record.revision and record.revision != self.revision:
            # Same model name, other weights or word ids: the state means nothing to this
            # model. The session is gone for it, as if expired; the client starts afresh.
            return UnknownSession(
                f"no session {step.session_id!r}: it was written by another revision of "
                f"model {self.name!r}, which has been replaced since"
            )
        if record.last_token < 0 and not step.tokens and not step.fresh and record.tokens > 0:
            # A store that does not keep `last_token` can serve every step but this one.
            return StepFailed("this session store cannot answer a step without new words")
        return None

    async def _write(self, rows: list[StepRun]) -> None:
        """One compare-and-set write of the batch's sessions; answer, or retry conflicts.

        Stateless rows are answered first: they never wait for the store."""
        stateless = [r for r in rows if r.step.session_id is None]
        self._answer_with([r.step for r in stateless], [r.result for r in stateless])  # type: ignore[misc]
        writes = [r for r in rows if r.step.session_id is not None]
        if not writes:
            return
        new = None
        if writes[0].new_rows is not None:  # resident runs: every row has its new rows
            new = np.array([r.new_rows for r in writes], dtype=np.int64)
        await self._write_sessions(
            [r.step for r in writes],
            [r.result for r in writes],  # type: ignore[misc]
            [None if r.record is None else r.record.version for r in writes],
            new,
        )

    async def _write_common(self, batch: Common) -> None:
        """A common batch's write: its steps cancelled during the run are dropped (never
        written), the others written (as columns) and answered as `_write_sessions` does."""
        steps, results, rows = batch.steps, batch.results, batch.rows
        records = batch.records
        assert results is not None
        if any(map(_DONE, steps)):
            live = [not step.done for step in steps]
            self._steps["cancelled"].inc(live.count(False))
            at = [i for i, k in enumerate(live) if k]
            if not at:
                return
            steps = [steps[i] for i in at]
            results = results.take(at)
            records = records.take(at)
            rows = rows[at]
        expected: list[int | None] = records.version.tolist()
        if not records.found.all():  # a new session's write expects none
            expected = [v if f else None for v, f in zip(expected, records.found.tolist())]
        await self._write_sessions(steps, results, expected, rows)

    async def _write_sessions(
        self,
        steps: list[Step],
        results: Sequence[StepResult],
        expected: list[int | None],
        rows: np.ndarray | None,
    ) -> None:
        """One compare-and-set write of sessions' steps (`results[i].record` at version
        `expected[i]`; `rows`: their new pool rows, (n, 2), None without a pool); answer
        them, or retry the conflicts. A common batch's `BatchResults` go to this process's
        memory store as columns, to any other store as records."""
        residency = self.residency
        try:
            if isinstance(results, BatchResults) and self._home is not None:
                # The store itself (`self.store`): columns where it would take records.
                written = await self._home.put_many(results.written, expected)
            else:
                records: list[SessionRecord] = (
                    results.written.records()
                    if isinstance(results, BatchResults)
                    else [result.record for result in results]  # type: ignore[misc]
                )
                if residency is not None and not residency.on_device:
                    records = await asyncio.get_running_loop().run_in_executor(
                        self._executor,
                        _to_host,
                        residency.pool,
                        records,
                        rows,
                    )
                written = await self.store.put_many(records, expected)
        except PartlyWritten as exc:
            ok = [w is True for w in exc.written]
            self._commit(steps, results, expected, rows, ok)
            # The steps known to be written are answered; the others get the error.
            self._fail([s for s, w in zip(steps, ok) if not w], exc)
            self._answer_with([s for s, w in zip(steps, ok) if w], pick(results, ok))
            return
        except NextwordError as exc:
            self._fail(steps, exc)
            return
        if len(written) != len(steps):
            self._fail(steps, StoreUnavailable("the session store answered a different count"))
            return
        self._commit(steps, results, expected, rows, written)
        if all(written):  # the common case: no conflict
            self._answer_with(steps, results)
            return
        retry = [s for s, ok in zip(steps, written) if not ok]
        for step in retry:
            step.attempts += 1
            step.row = None  # the whole step again, from the record read then
        exhausted = [s for s in retry if s.attempts > self.max_retries]
        self._fail(
            exhausted,
            Contended(
                f"the session kept changing under this step ({self.max_retries} retries): "
                "it was not applied; retry"
            ),
        )
        again = [s for s in retry if s.attempts <= self.max_retries]
        self._pending.extendleft(reversed(again))
        if again:
            self._wake()
        self._answer_with([s for s, ok in zip(steps, written) if ok], pick(results, written))

    def _answer_with(self, steps: list[Step], results: Sequence[StepResult]) -> None:
        """Answer each step with its result (those not ended already), in one call per sink."""
        answered = self._end(steps, results, answered=1)
        if answered:
            self._steps["ok"].inc(answered)

    def _commit(
        self,
        steps: list[Step],
        results: Sequence[StepResult],
        expected: list[int | None],
        rows: np.ndarray | None,
        written: Sequence[bool],
    ) -> None:
        """The steps written stay resident: their sessions' entries hold their new rows."""
        residency = self.residency
        if residency is None or not residency.keeps or rows is None:
            return
        if not all(written):
            ok = [i for i, w in enumerate(written) if w]
            if not ok:
                return
            steps = [steps[i] for i in ok]
            results = pick(results, written)
            expected = [expected[i] for i in ok]
            rows = rows[ok]
        created = (
            results.written.created_at
            if isinstance(results, BatchResults)
            else [result.record.created_at for result in results]  # type: ignore[union-attr]
        )
        # The versions written: one past those expected (1 for a new session).
        versions: np.ndarray | list[int] = (
            np.array(expected, dtype=np.int64) + 1
            if None not in expected
            else [(e or 0) + 1 for e in expected]
        )
        residency.commit(list(map(_SESSION, steps)), versions, created, rows)

    # --- the runs (in the executor thread) -----------------------------------------

    def _compute(self, work: Work, holding: Holding | None) -> None:
        """Run a batch's work (`Execution.compute`), in the executor thread."""
        self.execution.compute(work, holding)
