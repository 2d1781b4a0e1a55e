"""Cross-session micro-batching: one background loop per model gathers steps into runs.

In the style of Ray Serve's `serve/batching.py`: every request is a `Step` with its own
future in a queue; the loop takes up to `max_batch` steps (waiting at most
`max_wait_ms` for the batch to fill), then for the whole batch:

    store.get_many (one round trip) -> model runs -> store.put_many (one round trip,
    compare-and-set) -> resolve the futures

A session has at most one step in a batch, and its steps are applied in the order
they arrived. A step that lost a compare-and-set (another replica wrote the session
meanwhile) is retried, in order, in the next batch. A failed run fails every step of
the batch with `StepFailed` and writes nothing. A step whose future was cancelled
(the client went away) is dropped before the run, and not written after it.

How a step runs. The store keeps, per session, the state after the last token, the
state before it and the last token (see `SessionRecord`). A step of T > 1 new tokens
first runs its first T - 1 tokens (giving the new "previous" state), then the last
token; a step of one token only the second run; a step of no token (a new `prefix`
for the same context) re-runs the last token from the previous state. Rows are
grouped by length: one run per distinct length and phase.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service import metrics
from service.engine.runtime import State, StepOutput, top_words
from service.errors import NextwordError, Overloaded, StepFailed, StoreUnavailable, UnknownSession
from service.store import SessionRecord, SessionStore

log = logging.getLogger(__name__)


class StepRunner(Protocol):
    """What the batcher runs: an `OrtModel`, or a fake in tests."""

    name: str
    start: StepOutput  # the run of the implicit start token from a zero state (batch 1)
    eos_id: int

    def run(self, tokens: np.ndarray, state: State, want_probs: bool = False) -> StepOutput:
        """Run `tokens` (B, T) from `state` (each (L, B, H))."""
        ...


@dataclass(eq=False)
class Step:
    """One request for a model: add `tokens` to a context and answer its top `k` words."""

    tokens: list[int]  # ids of the text's tokens (may be empty)
    session_id: str | None = None  # None: a stateless context (predict)
    fresh: bool = False  # start the session's context afresh (reset)
    create: bool = False  # a new session: it must not exist yet
    k: int = 5
    prefix_ids: np.ndarray | None = None  # sorted ids of the words matching a prefix
    future: asyncio.Future[StepResult] = field(init=False, repr=False)
    attempts: int = field(default=0, repr=False)


@dataclass(frozen=True)
class StepResult:
    """The answer of a step: the best words (ids, best first) and the session written."""

    ids: np.ndarray
    probs: np.ndarray
    tokens: int  # tokens in the context now
    record: SessionRecord | None  # None for a stateless step


@dataclass(eq=False)
class _Row:
    """A step during one batch: where it starts from, what it runs, what comes out."""

    step: Step
    record: SessionRecord | None
    current: State = ()  # (L, H) arrays: the state after the context's last token
    previous: State = ()  # the state before it
    last_token: int = -1
    context_tokens: int = 0
    first: list[int] = field(default_factory=list)  # phase 1: tokens run for the new `previous`
    second: list[int] = field(default_factory=list)  # phase 2: tokens whose output answers
    second_from: State = ()
    output: StepOutput | None = None
    output_row: int = 0
    result: StepResult | None = None


def _stack(states: list[State]) -> State:
    """Per-row states (each (L, H)) -> batch state (each (L, B, H))."""
    return tuple(np.stack([s[i] for s in states], axis=1) for i in range(len(states[0])))


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
        max_retries: int = 8,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.runner = runner
        self.store = store
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_retries = max_retries
        self.clock = clock
        self.name = runner.name
        self._pending: deque[Step] = deque()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._waiter: asyncio.Future[None] | None = None
        self._wake_at = 1
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: list[Step] = []
        self._start_current: State = tuple(a[:, 0, :] for a in runner.start.state)
        self._zeros: State = tuple(np.zeros_like(a) for a in self._start_current)
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
        if self._task is not None:
            if not drain:
                self._task.cancel()
            await asyncio.wait([self._task])  # never cancels the loop if this wait is
            self._task = None
        # Left only when not draining: the batch cut short and the queue.
        self._fail(self._in_flight, StepFailed(f"model {self.name!r} stopped during this step"))
        self._fail(list(self._pending), Overloaded(f"model {self.name!r} is shutting down"))
        self._pending.clear()
        self._queue_depth.set(0)
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, True)  # a cut-short run ends
            self._executor = None

    @property
    def queue_depth(self) -> int:
        """Steps waiting for a batch."""
        return len(self._pending)

    # --- requests ----------------------------------------------------------------

    def submit(self, step: Step) -> asyncio.Future[StepResult]:
        """Queue a step; its future gets a `StepResult` or a `NextwordError`."""
        if self._closing or self._task is None:
            raise Overloaded(f"model {self.name!r} is not taking steps (shutting down)")
        if len(self._pending) >= self.max_queue:
            raise Overloaded(f"too many steps waiting for model {self.name!r}; retry later")
        step.future = asyncio.get_running_loop().create_future()
        self._pending.append(step)  # the depth gauge is sampled once per batch, not per step
        self._wake()
        return step.future

    async def step(self, step: Step) -> StepResult:
        """Queue a step and wait for its result (cancelling the wait cancels the step)."""
        return await self.submit(step)

    # --- the loop ----------------------------------------------------------------

    def _wake(self, force: bool = False) -> None:
        waiter = self._waiter
        if waiter is not None and (force or len(self._pending) >= self._wake_at):
            _resolve(waiter, None)

    async def _wait(self, at_least: int, timeout: float | None) -> None:
        """Until `at_least` steps are queued, `timeout` passed, or the batcher stops."""
        if len(self._pending) >= at_least or self._closing:
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
            if not self._pending:
                if self._closing:
                    return
                await self._wait(1, None)
                continue
            if self.max_wait_s > 0:
                await self._wait(self.max_batch, self.max_wait_s)
            batch = self._take()
            self._queue_depth.set(len(self._pending))
            if batch:
                self._in_flight = batch  # what stop(drain=False) must fail if it cuts in
                try:
                    await self._process(batch)
                except Exception as exc:  # a bug: fail the batch, keep serving
                    log.exception("batch of model %s failed", self.name)
                    self._fail(batch, StepFailed(f"the step failed ({type(exc).__name__})"))
                self._in_flight = []

    def _take(self) -> list[Step]:
        """Up to `max_batch` steps, one per session; later steps of a session wait, in order."""
        batch: list[Step] = []
        held: list[Step] = []
        sessions: set[str] = set()
        while self._pending and len(batch) < self.max_batch and len(held) < self.max_batch:
            step = self._pending.popleft()
            if step.future.done():  # cancelled while queued
                self._steps["cancelled"].inc()
                continue
            if step.session_id is not None:
                if step.session_id in sessions:
                    held.append(step)
                    continue
                sessions.add(step.session_id)
            batch.append(step)
        self._pending.extendleft(reversed(held))
        return batch

    def _fail(self, steps: list[Step], error: NextwordError) -> None:
        failed = sum(_resolve(step.future, error) for step in steps)
        if failed:
            self._steps["failed" if isinstance(error, StepFailed) else "error"].inc(failed)

    # --- one batch ---------------------------------------------------------------

    async def _process(self, batch: list[Step]) -> None:
        reads = [s for s in batch if s.session_id is not None and not s.create]
        try:
            ids = [s.session_id for s in reads if s.session_id is not None]
            records = await self.store.get_many(ids) if ids else []
        except NextwordError as exc:
            # Only the sessions' steps need the store: stateless steps still run.
            self._fail([s for s in batch if s.session_id is not None], exc)
            batch = [s for s in batch if s.session_id is None]
            reads, records = [], []
        if len(records) != len(reads):
            self._fail(batch, StoreUnavailable("the session store answered a different count"))
            return
        found = dict(zip((id(s) for s in reads), records))
        rows: list[_Row] = []
        for step in batch:
            if step.future.done():  # cancelled during the read
                continue
            record = found.get(id(step))
            if id(step) in found:
                problem = self._problem(step, record)
                if problem is not None:
                    self._fail([step], problem)
                    continue
            rows.append(_Row(step, record))
        if not rows:
            return
        self._batch_size.observe(len(rows))
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            await loop.run_in_executor(self._executor, self._compute, rows)
        except Exception as exc:
            log.exception("model %s: run of a batch of %d failed", self.name, len(rows))
            self._fail(
                [r.step for r in rows],
                StepFailed(
                    f"model {self.name!r} failed to run this batch ({type(exc).__name__}); "
                    "no session was changed"
                ),
            )
            return
        self._batch_seconds.observe(time.perf_counter() - started)
        await self._write([r for r in rows if not r.step.future.done()])

    def _problem(self, step: Step, record: SessionRecord | None) -> NextwordError | None:
        """Why a step cannot run on the record read for it, if it cannot."""
        if (
            record is None
            or record.model != self.name
            or len(record.state) != 2 * len(self._start_current)
            or record.last_token >= self._vocab_size
        ):
            return UnknownSession(
                f"no session {step.session_id!r} (never created, deleted or expired)"
            )
        if record.last_token < 0 and not step.tokens and not step.fresh and record.tokens > 0:
            # A store that does not keep `last_token` can serve every step but this one.
            return StepFailed("this session store cannot answer a step without new words")
        return None

    async def _write(self, rows: list[_Row]) -> None:
        """One compare-and-set write of the batch's sessions; answer, or retry conflicts."""
        writes = [r for r in rows if r.step.session_id is not None]
        if writes:
            records: list[SessionRecord] = []
            expected: list[int | None] = []
            for r in writes:
                assert r.result is not None and r.result.record is not None
                records.append(r.result.record)
                expected.append(None if r.record is None else r.record.version)
            try:
                written = await self.store.put_many(records, expected)
            except NextwordError as exc:
                self._fail([r.step for r in writes], exc)
                rows = [r for r in rows if r.step.session_id is None]
                self._steps["ok"].inc(sum(_resolve(r.step.future, r.result) for r in rows))
                return
            if len(written) != len(writes):
                self._fail(
                    [r.step for r in rows],
                    StoreUnavailable("the session store answered a different count"),
                )
                return
            retry = [r.step for r, ok in zip(writes, written) if not ok]
            for step in retry:
                step.attempts += 1
            exhausted = [s for s in retry if s.attempts > self.max_retries]
            self._fail(exhausted, StepFailed("the session kept changing under this step; retry"))
            again = [s for s in retry if s.attempts <= self.max_retries]
            self._pending.extendleft(reversed(again))
            if again:
                self._wake()
            lost = {id(s) for s in retry}
            rows = [r for r in rows if id(r.step) not in lost]
        self._steps["ok"].inc(sum(_resolve(row.step.future, row.result) for row in rows))

    # --- the runs (in the executor thread) -----------------------------------------

    def _compute(self, rows: list[_Row]) -> None:
        """Plan each row, make the runs (grouped by length), then build the results."""
        for row in rows:
            self._plan(row)
        first = [r for r in rows if r.first]
        for group in self._by_length(first, lambda r: len(r.first)):
            output = self._run(group, [r.first for r in group], [r.current for r in group], False)
            for i, row in enumerate(group):
                row.second_from = tuple(a[:, i, :] for a in output.state)
        second = [r for r in rows if r.second]
        for group in self._by_length(second, lambda r: len(r.second)):
            want_probs = any(r.step.prefix_ids is not None for r in group)
            output = self._run(
                group, [r.second for r in group], [r.second_from for r in group], want_probs
            )
            for i, row in enumerate(group):
                row.output, row.output_row = output, i
        for row in rows:
            row.result = self._result(row)

    def _plan(self, row: _Row) -> None:
        step, record = row.step, row.record
        tokens = step.tokens
        if record is None or step.fresh or step.create:
            row.current, row.previous = self._start_current, self._zeros
            row.last_token, row.context_tokens = self.runner.eos_id, 0
        else:
            half = len(self._start_current)
            row.current, row.previous = record.state[:half], record.state[half:]
            row.last_token, row.context_tokens = record.last_token, record.tokens
        if not tokens:
            if row.context_tokens > 0:  # no new word: re-run the last token for its output
                row.second, row.second_from = [row.last_token], row.previous
            return  # an empty context: the cached start output answers
        if step.session_id is None:  # stateless: no previous state to keep
            row.second, row.second_from = tokens, row.current
            return
        row.first = tokens[:-1]
        row.second = tokens[-1:]
        row.second_from = row.current

    @staticmethod
    def _by_length(rows: list[_Row], length: Callable[[_Row], int]) -> list[list[_Row]]:
        groups: dict[int, list[_Row]] = {}
        for row in rows:
            groups.setdefault(length(row), []).append(row)
        return list(groups.values())

    def _run(
        self, group: list[_Row], tokens: list[list[int]], states: list[State], want_probs: bool
    ) -> StepOutput:
        batch = np.array(tokens, dtype=np.int64)  # (B, T)
        output = self.runner.run(batch, _stack(states), want_probs)
        self._tokens_run.inc(batch.size)
        if len(output) != len(group) or any(a.shape[1] != len(group) for a in output.state):
            raise RuntimeError(f"the model answered {len(output)} rows for a batch of {len(group)}")
        return output

    def _result(self, row: _Row) -> StepResult:
        step = row.step
        output, index = (row.output, row.output_row) if row.output else (self.runner.start, 0)
        ids, probs = top_words(output, index, step.k, step.prefix_ids)
        tokens = row.context_tokens + len(step.tokens)
        if step.session_id is None:
            return StepResult(ids, probs, tokens, None)
        if step.tokens:
            current = tuple(a[:, index, :] for a in output.state)
            previous = row.second_from
            last = step.tokens[-1]
        else:
            current, previous, last = row.current, row.previous, row.last_token
        now = self.clock()
        old = row.record
        record = SessionRecord(
            session_id=step.session_id,
            model=self.name,
            state=(*current, *previous),
            tokens=tokens,
            created_at=now if old is None or step.create else old.created_at,
            last_used_at=now,
            version=0 if old is None else old.version,
            last_token=last,
        )
        return StepResult(ids, probs, tokens, record)
