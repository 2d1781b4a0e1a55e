"""Cross-session micro-batching: one background loop per model gathers steps into runs.

In the style of Ray Serve's `serve/batching.py`: every request is a `Step` with its own
future in a queue; the loop takes up to `max_batch` steps (waiting at most
`max_wait_ms` for the batch to fill), then for the whole batch:

    store.get_many (one round trip) -> model runs -> store.put_many (one round trip,
    compare-and-set) -> resolve the futures

A session has at most one step in a batch, and its steps are applied in the order
they arrived. A step that lost a compare-and-set (another replica wrote the session
meanwhile) is retried, in order, in the next batch; past `max_retries` it fails with
`Contended` (a 503 with Retry-After: nothing was applied, the client retries). A failed
run fails every step of the batch with `StepFailed` and writes nothing. A step whose
future was cancelled (the client went away) is dropped before the run, and not written
after it.

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
from typing import Any, Protocol

import numpy as np

from service import metrics
from service.engine.adapt_hooks import Adaptation
from service.engine.batching import Bounds, Cost, take
from service.engine.fairness import QueueShares
from service.engine.pool import PoolExhausted, ResidentOutput, StatePool
from service.engine.residency import NO_ROW, Holding, Residency
from service.engine.runtime import State, StepOutput, top_words
from service.engine.steps import StateRef, Step, StepResult, StepRun, as_retry
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
from service.store.memory import MemorySessionStore

log = logging.getLogger(__name__)


class StepRunner(Protocol):
    """What the batcher runs: an `OrtModel`, or a fake in tests."""

    name: str
    start: StepOutput  # the run of the implicit start token from a zero state (batch 1)
    eos_id: int

    def run(self, tokens: np.ndarray, state: State, want_probs: bool = False) -> StepOutput:
        """Run `tokens` (B, T) from `state` (each (L, B, H))."""
        ...


def _stack(states: list[State]) -> State:
    """Per-row states (each (L, H)) -> batch state (each (L, B, H))."""
    return tuple(np.stack([s[i] for s in states], axis=1) for i in range(len(states[0])))


def _to_host(pool: StatePool, rows: list[StepRun]) -> list[SessionRecord]:
    """The records the rows write, with their states copied from the pool to host arrays
    (one copy for all), for a store that serializes states."""
    states = iter(pool.download([i for r in rows for i in r.new_rows or ()]))
    out = []
    for row in rows:
        record = row.result.record  # type: ignore[union-attr]
        assert record is not None
        if row.new_rows is not None:
            current, previous = next(states), next(states)
            record = dataclasses.replace(record, state=(*current, *previous))
        out.append(record)
    return out


def _to_upload(row: StepRun) -> bool:
    """Whether a batch starts `row` from the host states of its record (a session spilled
    to host memory, or read from a store that serializes states), uploaded first."""
    step = row.step
    return (
        not row.planned
        and row.record is not None
        and not isinstance(row.current, int)
        and not (step.fresh or step.create)
    )


def _new_rows(output: StepOutput) -> np.ndarray | None:
    """A resident run's new states (a pool row per batch row); None from a copied run."""
    return output.rows if isinstance(output, ResidentOutput) else None


def _resolve(future: asyncio.Future[Any], outcome: Any) -> bool:
    if future.done():
        return False
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
    return True


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
        self._start_current: StateRef = start_current
        self._zeros: StateRef = zeros
        if self.pool is not None:
            held = self.pool.upload([start_current, zeros])
            self.pool.pin(held)
            self._start_current, self._zeros = int(held[0]), int(held[1])
        self._spills = metrics.POOL_SPILLS.labels(self.name)
        self._pool_used = metrics.POOL_ROWS.labels(self.name, "used")
        self._pool_free = metrics.POOL_ROWS.labels(self.name, "free")
        if runner.start.probs is None:
            raise ValueError("the runner's start output must include the full distribution")
        self._vocab_size = int(runner.start.probs.shape[1])
        self._queue_depth = metrics.QUEUE_DEPTH.labels(self.name)
        self._batch_size = metrics.BATCH_SIZE.labels(self.name)
        self._batch_seconds = metrics.BATCH_SECONDS.labels(self.name)
        self._tokens_run = metrics.TOKENS.labels(self.name)
        self._steps = {
            outcome: metrics.STEPS.labels(self.name, outcome)
            for outcome in ("ok", "error", "failed", "cancelled")
        }

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start the background loop (owned by the lifespan)."""
        if self._task is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"nextword-{self.name}")
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

    def submit(
        self, step: Step, done: Callable[[asyncio.Future[StepResult]], None] | None = None
    ) -> asyncio.Future[StepResult]:
        """Queue a step; its future gets a `StepResult` or a `NextwordError`, and `done` (if
        given) is called with it once it is done (after the step left its client's share:
        one callback per step, not two)."""
        if self._closing or self._task is None:
            raise Overloaded(f"model {self.name!r} is not taking steps (shutting down)")
        if self.queue_depth >= self.max_queue:
            raise Overloaded(
                f"too many steps waiting for model {self.name!r}; retry later",
                retry_after_s=self.shares.rate.retry_after(self.queue_depth),
            )
        client = step.client
        self.shares.admit(client, self.name)
        loop = asyncio.get_running_loop()
        future = step.future = loop.create_future()
        step.queued_at = loop.time()
        future.add_done_callback(partial(self._left, client, done))
        # The depth gauge is sampled once per batch, not per step.
        (self._pending if step.session_id is not None else self._stateless).append(step)
        self._wake()
        return step.future

    def _left(
        self,
        client: str,
        then: Callable[[asyncio.Future[StepResult]], None] | None,
        future: asyncio.Future[StepResult],
    ) -> None:
        """A step's future is done: it leaves its client's share; then the caller's callback."""
        self.shares.release(client, not future.cancelled() and future.exception() is None)
        if then is not None:
            then(future)

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

    def _gone(self, step: Step) -> bool:
        """Whether a queued step's future is done already (its client went away): it is
        dropped, and lets go of the row it carried, if any."""
        if step.future.done():
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
        failed = sum(_resolve(step.future, error) for step in steps)
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
        records: list[SessionRecord | None] = []
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
                reads, records = [], []
            finally:
                if not read.done():
                    read.cancel()  # this batch was cut short (stop without draining)
                elif not read.cancelled():
                    read.exception()  # retrieved, so that no failure is reported as lost
        if len(records) != len(reads):
            self._fail(batch, StoreUnavailable("the session store answered a different count"))
            return
        found = dict(zip((id(s) for s in reads), records))
        rows: list[StepRun] = []
        for step in batch:
            if step.future.done():  # cancelled during the read
                continue
            if step.row is not None:  # a long step's next chunk
                rows.append(step.row)
                continue
            record = found.get(id(step))
            if id(step) in found:
                if step.step_id and record is not None and record.last_step == step.step_id:
                    as_retry(step)
                problem = self._problem(step, record)
                if problem is not None:
                    self._fail([step], problem)
                    continue
            rows.append(StepRun(step, record))
        if holding is not None:
            rows = self._locate(rows, holding)
        if rows and await self._compute_rows(rows, holding):
            await self._write(self._carry_on(rows))

    def _locate(self, rows: list[StepRun], holding: Holding) -> list[StepRun]:
        """Where each new row's session state is: the rows of its resident entry (held for
        the batch), or its record's host states (uploaded by the run); a record with its
        state nowhere fails its step (`Residency.lost_session`)."""
        assert self.residency is not None
        new = [r for r in rows if _to_upload(r)]
        if not new:
            return rows
        found = self.residency.find([r.record for r in new])  # type: ignore[misc]
        held = found[found[:, 0] != NO_ROW]
        if len(held):
            holding.hold(held.ravel())
        lost: set[int] = set()
        for row, (current, previous) in zip(new, found.tolist()):
            if current != NO_ROW:
                row.current, row.previous = current, previous
            elif row.record.state_on_device:  # type: ignore[union-attr]
                self._fail([row.step], self.residency.lost_session(row.record))  # type: ignore[arg-type]
                lost.add(id(row))
        return [r for r in rows if id(r) not in lost] if lost else rows

    async def _answer(self, steps: list[Step], holding: Holding | None = None) -> None:
        """Run and answer stateless steps on their own (their rows held by `holding`, or
        by a holding of their own)."""
        own = holding is None and self.pool is not None
        if own:
            assert self.pool is not None
            holding = Holding(self.pool)
        try:
            self._adopt(steps, holding)
            rows = [step.row or StepRun(step, None) for step in steps if not step.future.done()]
            if rows and await self._compute_rows(rows, holding):
                done = self._carry_on(rows)
                self._steps["ok"].inc(sum(_resolve(r.step.future, r.result) for r in done))
        finally:
            if own and holding is not None:
                holding.close()

    def _carry_on(self, rows: list[StepRun]) -> list[StepRun]:
        """After a batch's runs: the rows answered now; long steps with tokens left go back
        to the front of their lane (in order), carrying what they have run."""
        done: list[StepRun] = []
        going: list[StepRun] = []
        for row in rows:
            if row.step.future.done():  # cancelled during the run: dropped, never written
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

    async def _compute_rows(self, rows: list[StepRun], holding: Holding | None) -> bool:
        """Make the rows' runs in the executor; False (the rows failed) if a run failed."""
        self._batch_size.observe(len(rows))
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        reserved = 0
        try:
            reserved = await self._make_room(rows)
            await loop.run_in_executor(self._executor, self._compute, rows, holding)
        except Exception as exc:
            log.exception("model %s: run of a batch of %d failed", self.name, len(rows))
            self._fail(
                [r.step for r in rows],
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

    async def _make_room(self, rows: list[StepRun]) -> int:
        """Reserve the pool rows a batch takes (two per step for its states brought back
        from host memory, one per run), the residency spilling its least recently used
        sessions to host memory when too few are free; returns the rows reserved (the
        caller gives the reservation back once the batch has run)."""
        pool = self.pool
        if pool is None or self.residency is None:
            return 0
        need = sum(4 if _to_upload(row) else 2 for row in rows)
        if pool.free < need:
            # Never the sessions in flight: their rows are held, their records being read.
            # A batch's worth at least: spilling is paid per call.
            keep = {s.session_id for s in self._session_batch}
            keep.update(r.step.session_id for r in rows)
            spilled = self.residency.spill(max(need - pool.free, 2 * self.max_batch), keep)
            self._spills.inc(spilled)
            if pool.free < need:
                raise PoolExhausted(
                    f"model {self.name!r}: {pool.free} free state rows for a batch of "
                    f"{len(rows)} steps; NEXTWORD_STATE_POOL_ROWS={pool.rows} is too small "
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
        if record.last_token < 0 and not step.tokens and not step.fresh and record.tokens > 0:
            # A store that does not keep `last_token` can serve every step but this one.
            return StepFailed("this session store cannot answer a step without new words")
        return None

    async def _write(self, rows: list[StepRun]) -> None:
        """One compare-and-set write of the batch's sessions; answer, or retry conflicts.

        Stateless rows are answered first: they never wait for the store."""
        stateless = [r for r in rows if r.step.session_id is None]
        self._steps["ok"].inc(sum(_resolve(r.step.future, r.result) for r in stateless))
        rows = writes = [r for r in rows if r.step.session_id is not None]
        if writes:
            records: list[SessionRecord] = []
            expected: list[int | None] = []
            for r in writes:
                assert r.result is not None and r.result.record is not None
                records.append(r.result.record)
                expected.append(None if r.record is None else r.record.version)
            residency = self.residency
            try:
                if residency is not None and not residency.on_device:
                    records = await asyncio.get_running_loop().run_in_executor(
                        self._executor, _to_host, residency.pool, writes
                    )
                written = await self.store.put_many(records, expected)
            except PartlyWritten as exc:
                self._commit(writes, [ok is True for ok in exc.written], expected)
                # The steps known to be written are answered; the others get the error.
                self._fail([r.step for r, ok in zip(writes, exc.written) if not ok], exc)
                rows = [r for r, ok in zip(writes, exc.written) if ok]
                self._steps["ok"].inc(sum(_resolve(row.step.future, row.result) for row in rows))
                return
            except NextwordError as exc:
                self._fail([r.step for r in writes], exc)
                return
            if len(written) != len(writes):
                self._fail(
                    [r.step for r in rows],
                    StoreUnavailable("the session store answered a different count"),
                )
                return
            self._commit(writes, written, expected)
            retry = [r.step for r, ok in zip(writes, written) if not ok]
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
            lost = {id(s) for s in retry}
            rows = [r for r in rows if id(r.step) not in lost]
        self._steps["ok"].inc(sum(_resolve(row.step.future, row.result) for row in rows))

    def _commit(
        self, rows: list[StepRun], written: Sequence[bool], expected: list[int | None]
    ) -> None:
        """The rows written stay resident: their sessions' entries hold their new rows."""
        residency = self.residency
        if residency is None or not residency.keeps:
            return
        ok = [i for i, w in enumerate(written) if w]
        if not ok:
            return
        residency.commit(
            [rows[i].step.session_id for i in ok],  # type: ignore[misc]
            [(expected[i] or 0) + 1 for i in ok],
            [rows[i].result.record.created_at for i in ok],  # type: ignore[union-attr]
            np.array([rows[i].new_rows for i in ok], dtype=np.int64),
        )

    # --- the runs (in the executor thread) -----------------------------------------

    def _compute(self, rows: list[StepRun], holding: Holding | None) -> None:
        """Plan each row, make the runs (grouped by length), then build the results.

        A row runs the next chunk of its first tokens, or (its last batch) the rest of
        them and then its second tokens, whose output answers."""
        chunk = self.prefill_chunk
        if self.pool is not None and holding is not None:
            self._upload(rows, self.pool, holding)
        for row in rows:
            if not row.planned:
                self._plan(row)
            row.final = row.left <= chunk
            row.piece = len(row.first) - row.done if row.final else chunk
        if self.adaptation is not None:
            live = self.adaptation.count(rows)
            for row, holds in zip(rows, live):
                use = (
                    self._session_adapt(row.step, row.record)
                    if row.step.adapt is None
                    else row.step.adapt
                )
                row.mixed = row.final and use and holds and bool(row.second)
        first = [r for r in rows if r.piece]
        for group in self._by_length(first, lambda r: r.piece):
            output = self._run(
                group,
                [r.first[r.done : r.done + r.piece] for r in group],
                [r.first_from for r in group],
                False,
                holding,
            )
            new = _new_rows(output)
            if new is not None:
                for row, at in zip(group, new.tolist()):
                    row.first_from = at
                    row.done += row.piece
            else:
                for i, row in enumerate(group):
                    row.first_from = tuple(a[:, i, :] for a in output.state)
                    row.done += row.piece
        final = [r for r in rows if r.final]
        for row in final:
            row.second_from = row.first_from
        second = [r for r in final if r.second]
        for group in self._by_length(second, lambda r: len(r.second)):
            prefixed = [i for i, r in enumerate(group) if r.step.prefix_ids is not None]
            mixing = None if self.adaptation is None else self.adaptation.prepare(group)
            tokens, states = [r.second for r in group], [r.second_from for r in group]
            if self.pool is not None:
                # Only what the answers need comes out of the device: the model's
                # probabilities at the memories' words, and the distributions of the rows
                # completing a prefix.
                gather = None
                if mixing is not None:
                    assert self.adaptation is not None
                    gather = self.adaptation.gather_ids(mixing)
                output = self._run(group, tokens, states, False, holding, gather, prefixed)
            else:
                output = self._run(
                    group, tokens, states, bool(prefixed) or mixing is not None, holding
                )
            for i, row in enumerate(group):
                row.output, row.output_row = output, i
            if mixing is not None:
                assert self.adaptation is not None
                self.adaptation.answer(group, output, mixing)
        now = self.clock()
        for row in final:
            row.result = self._result(row, now)

    @staticmethod
    def _upload(rows: list[StepRun], pool: StatePool, holding: Holding) -> None:
        """Bring the host states of the records a batch starts from (sessions spilled to host
        memory, or read from a store that serializes states) into pool rows, at once (the
        batch holds them)."""
        up = [row for row in rows if _to_upload(row)]
        if not up:
            return
        half = len(up[0].record.state) // 2  # type: ignore[union-attr]
        states = [s for r in up for s in (r.record.state[:half], r.record.state[half:])]  # type: ignore[union-attr]
        uploaded = pool.upload(states)
        holding.add(uploaded)
        for i, row in enumerate(up):
            row.current, row.previous = int(uploaded[2 * i]), int(uploaded[2 * i + 1])

    def _session_adapt(self, step: Step, record: SessionRecord | None) -> bool:
        """A session's default for `adapt`: set when it is created, kept after."""
        if record is None or step.create:
            return self.adapt_default if step.adapt is None else step.adapt
        return record.adapt

    def _plan(self, row: StepRun) -> None:
        step, record = row.step, row.record
        tokens = step.tokens
        row.planned = True
        if record is None or step.fresh or step.create:
            row.current, row.previous = self._start_current, self._zeros
            row.last_token, row.context_tokens = self.runner.eos_id, 0
        else:
            if not isinstance(row.current, int):  # a pool row already: located or uploaded
                half = self._halves
                row.current, row.previous = record.state[:half], record.state[half:]
            row.last_token, row.context_tokens = record.last_token, record.tokens
        row.first_from = row.current
        if not tokens:
            if row.context_tokens > 0:  # no new word: re-run the last token for its output
                row.second, row.first_from = [row.last_token], row.previous
            return  # an empty context: the cached start output answers
        if step.session_id is None:  # stateless: no previous state to keep
            # Whole chunks first, then the rest (1 to `prefill_chunk` tokens) for the output.
            last = (len(tokens) - 1) % self.prefill_chunk + 1
            row.first, row.second = tokens[:-last], tokens[-last:]
            return
        row.first = tokens[:-1]
        row.second = tokens[-1:]

    @staticmethod
    def _by_length(rows: list[StepRun], length: Callable[[StepRun], int]) -> list[list[StepRun]]:
        groups: dict[int, list[StepRun]] = {}
        for row in rows:
            groups.setdefault(length(row), []).append(row)
        return list(groups.values())

    def _run(
        self,
        group: list[StepRun],
        tokens: Sequence[Sequence[int]],
        states: list[StateRef],
        want_probs: bool,
        holding: Holding | None,
        gather: np.ndarray | None = None,
        probs_rows: list[int] | None = None,
    ) -> StepOutput:
        """One run of a group (`gather` and `probs_rows`: resident runs only, `StatePool.run`,
        whose new rows `holding` holds); checks that it answered one row per row of the
        group."""
        batch = np.array(tokens, dtype=np.int64)  # (B, T)
        output: StepOutput
        if self.pool is not None:
            output = self.pool.run(batch, states, want_probs, gather, probs_rows)  # type: ignore[arg-type]
            assert holding is not None and isinstance(output, ResidentOutput)
            holding.add(output.rows)
        else:
            output = self.runner.run(batch, _stack(states), want_probs)  # type: ignore[arg-type]
        self._tokens_run.inc(batch.size)
        if (
            len(output) != len(group)
            or any(a.shape[1] != len(group) for a in output.state)
            or len(output.rows if isinstance(output, ResidentOutput) else group) != len(group)
        ):
            raise RuntimeError(f"the model answered {len(output)} rows for a batch of {len(group)}")
        return output

    def _result(self, row: StepRun, now: float) -> StepResult:
        """A final row's answer, and the record it writes (at `now`, once per batch)."""
        step = row.step
        output, index = (row.output, row.output_row) if row.output else (self.runner.start, 0)
        if row.answer is not None:
            ids, probs = row.answer
        elif step.prefix_ids is None:  # the common case, as `top_words` answers it
            ids, probs = output.topk_ids[index, : step.k], output.topk_probs[index, : step.k]
        else:
            ids, probs = top_words(output, index, step.k, step.prefix_ids, step.prefix_slips)
        tokens = row.context_tokens + len(step.tokens)
        # Only a mixed answer can name a typed word (the model's own ids are < V): the
        # adaptation's `answer` says which do, for the whole run at once.
        words: tuple[str, ...] = ()
        if row.typed_answer and row.memory is not None:
            words = row.memory.words
        last_token = step.tokens[-1] if step.tokens else row.last_token
        if step.session_id is None:
            return StepResult(ids, probs, tokens, None, words, last_token)
        current: StateRef
        if step.tokens:
            new = _new_rows(output)
            if new is not None:
                current = int(new[index])
            else:
                current = tuple(a[:, index, :] for a in output.state)
            previous = row.second_from
            last = step.tokens[-1]
        else:
            current, previous, last = row.current, row.previous, row.last_token
        old = row.record
        state: State = ()
        if isinstance(current, int):
            # On the device: kept resident, or copied to the host just before the write.
            assert isinstance(previous, int)
            row.new_rows = (current, previous)
        else:
            assert not isinstance(previous, int)
            state = (*current, *previous)
        anew = old is None or step.create
        record = SessionRecord(  # by position: session_id, model, state, tokens, created_at,
            # last_used_at, version, last_token, owner, memory, adapt, last_step
            step.session_id,
            self.name,
            state,
            tokens,
            now if anew else old.created_at,  # type: ignore[union-attr]
            now,
            0 if old is None else old.version,
            last,
            step.owner if anew else old.owner,  # type: ignore[union-attr]
            row.memory,
            self._session_adapt(step, old),
            step.step_id,
            self.residency is not None and self.residency.on_device and bool(row.new_rows),
        )
        return StepResult(ids, probs, tokens, record, words, last_token)
