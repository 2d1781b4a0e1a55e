"""The per-batch work's data: a `Step` (one request, made once from its wire request), what
it carries between its batches (`StepRun`), and its answer (`StepResult`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np

from service import metrics
from service.contract.protocol import StepRequest
from service.engine.runtime import State, StepOutput
from service.errors import BadInput, NextwordError
from service.store import SessionRecord
from service.store.base import SessionColumns, WordMemory


class Step:
    """One request for a model: add `tokens` to a context and answer its top `k` words.

    A step ends exactly once (`done`): answered, failed or cancelled, whichever comes first;
    its scheduler then hands it and its outcome to its `sink` (`StepSink`), with the other
    steps of the batch that ended with it. A plain class with slots: one is made per request,
    and a dataclass's `__init__` with defaults costs about twice as much.
    """

    __slots__ = (
        "tokens",
        "session_id",
        "fresh",
        "create",
        "k",
        "prefix_ids",
        "owner",
        "adapt",
        "typed",
        "prefix",
        "forget",
        "client",
        "step_id",
        "prefix_slips",
        "tag",
        "sink",
        "done",
        "future",
        "attempts",
        "queued_at",
        "row",
    )

    def __init__(
        self,
        tokens: list[int],  # ids of the text's tokens (may be empty)
        session_id: str | None = None,  # None: a stateless context (predict)
        fresh: bool = False,  # start the session's context afresh (reset)
        create: bool = False,  # a new session: it must not exist yet
        k: int = 5,
        prefix_ids: np.ndarray | None = None,  # sorted ids of the words matching a prefix
        owner: str = "",  # a new session's quota owner (`SessionRecord.owner`)
        adapt: bool | None = None,  # use the writer's words (None: the session's default)
        typed: list[str] | None = None,  # typed forms of the `<unk>` tokens (None: none)
        prefix: str = "",  # the prefix as typed (normalized where it is matched to typed words)
        forget: bool = False,  # forget the writer's words first
        client: str = "",  # whose share of the queue it takes (service.engine.fairness)
        step_id: str = "",  # its id: the session's last step's id again means a retry
        prefix_slips: np.ndarray | None = None,  # per prefix id: its slip likelihood
        tag: int = 0,  # its owner's name for it (the core: the request id)
    ) -> None:
        self.tokens = tokens
        self.session_id = session_id
        self.fresh = fresh
        self.create = create
        self.k = k
        self.prefix_ids = prefix_ids
        self.owner = owner
        self.adapt = adapt
        self.typed: list[str] = [] if typed is None else typed
        self.prefix = prefix
        self.forget = forget
        self.client = client
        self.step_id = step_id
        self.prefix_slips = prefix_slips  # ranks by p x it
        self.tag = tag
        # Set when it is queued (`StepBatcher.submit_many` / `submit`):
        self.sink: StepSink | None = None  # where it goes once it ends
        self.done = False  # it ended (answered, failed or cancelled): never ends again
        # Only for a step queued by `StepBatcher.submit` (the awaitable API): its future.
        self.future: asyncio.Future[StepResult] | None = None
        self.attempts = 0  # compare-and-set conflicts lost so far
        self.queued_at = 0.0  # the loop's clock at submit
        # A long step between its batches: what it has run so far (None: not started).
        self.row: StepRun | None = None

    def __repr__(self) -> str:
        return (
            f"Step(tokens={self.tokens!r}, session_id={self.session_id!r}, k={self.k}, "
            f"tag={self.tag}, done={self.done})"
        )

    @classmethod
    def from_request(cls, request: StepRequest) -> Step:
        """The step a wire request asks for (the one place its fields are read); its `tag`
        is the request id."""
        ids = None if request.prefix_ids is None else np.frombuffer(request.prefix_ids, np.int64)
        slips = None
        if request.prefix_slips is not None:
            slips = np.frombuffer(request.prefix_slips, dtype=np.float32)
            if ids is None or len(slips) != len(ids):
                raise BadInput("prefix_slips must give one likelihood per prefix id")
        # Positional: a call with keywords costs about twice as much, once per request.
        return cls(
            request.tokens,
            request.session_id,
            request.fresh,
            request.create,
            request.k,
            ids,
            request.owner,
            request.adapt,
            request.typed,
            request.prefix,
            request.forget,
            request.client,
            request.step_id,
            slips,
            request.request_id,
        )


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~2x per row
class StepResult:
    """The answer of a step: the best words (ids, best first) and the session written."""

    ids: np.ndarray
    probs: np.ndarray
    tokens: int  # tokens in the context now
    record: SessionRecord | None  # None for a stateless step
    words: tuple[str, ...] = ()  # the typed words an id >= V refers to (V + j: words[j])
    last_token: int = -1  # the context's last token (the end-of-sentence id at its start)


class BatchResults(Sequence[StepResult]):
    """A common batch's results as columns (`Execution.results`): its answers' top-k as
    (B, k) arrays and the records it writes as `SessionColumns`, without an object per
    step. Indexing it makes that step's `StepResult` (its ids and probabilities views of
    the arrays, its record from the columns), for a caller that holds one (an in-process
    future); the engine core's sink takes the answers as lists instead (`answer_lists`:
    one `tolist()` per array for the whole batch)."""

    __slots__ = ("ids", "probs", "ks", "mixed", "words", "written", "_lists")

    def __init__(
        self,
        ids: np.ndarray,
        probs: np.ndarray,
        ks: list[int] | None,
        mixed: Sequence[tuple[np.ndarray, np.ndarray] | None] | None,
        words: list[tuple[str, ...]] | None,
        written: SessionColumns,
    ) -> None:
        self.ids = ids  # (B, k) the model's best ids, best first
        self.probs = probs  # (B, k) their probabilities
        self.ks = ks  # each row's k (None: every row's is the arrays' k)
        self.mixed = mixed  # per row, an answer mixing the writer's words (None: the model's)
        self.words = words  # per row, the typed words its answer names (None: none)
        self.written = written  # the records the batch writes; its tokens, last tokens
        self._lists: tuple[list[list[int]], list[list[float]]] | None = None

    def __len__(self) -> int:
        return len(self.written)

    @overload
    def __getitem__(self, i: int) -> StepResult: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[StepResult]: ...

    def __getitem__(self, i: int | slice) -> StepResult | Sequence[StepResult]:
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        if i < 0:
            i += len(self)
        mixed = None if self.mixed is None else self.mixed[i]
        if mixed is not None:
            ids, probs = mixed
        else:
            k = self.ids.shape[1] if self.ks is None else self.ks[i]
            ids, probs = self.ids[i, :k], self.probs[i, :k]
        written = self.written
        words = () if self.words is None else self.words[i]
        record = written.record(i)
        return StepResult(ids, probs, record.tokens, record, words, record.last_token)

    def answer_lists(self) -> tuple[list[list[int]], list[list[float]]]:
        """Each row's answer ids and probabilities as Python lists (made once)."""
        if self._lists is None:
            ids, probs = self.ids.tolist(), self.probs.tolist()
            if self.ks is not None:
                ks = self.ks
                ids = [row[:k] for row, k in zip(ids, ks)]
                probs = [row[:k] for row, k in zip(probs, ks)]
            if self.mixed is not None:
                for i, mixed in enumerate(self.mixed):
                    if mixed is not None:
                        ids[i], probs[i] = mixed[0].tolist(), mixed[1].tolist()
            self._lists = ids, probs
        return self._lists

    def take(self, at: Sequence[int]) -> BatchResults:
        """The results of rows `at`, in that order."""
        index = np.asarray(at, dtype=np.int64)
        return BatchResults(
            self.ids[index],
            self.probs[index],
            None if self.ks is None else [self.ks[i] for i in at],
            None if self.mixed is None else [self.mixed[i] for i in at],
            None if self.words is None else [self.words[i] for i in at],
            self.written.take(at),
        )


def pick(results: Sequence[StepResult], keep: Sequence[bool]) -> Sequence[StepResult]:
    """The results where `keep` is true, in order (a `BatchResults` stays columns)."""
    if isinstance(results, BatchResults):
        return results.take([i for i, k in enumerate(keep) if k])
    return [r for r, k in zip(results, keep) if k]


# How a step ended: its result, the error it failed with, or None: cancelled (its client
# went away; nothing is owed to it).
Outcome = StepResult | NextwordError | None

# Where ended steps go: called by the scheduler, on its event loop, synchronously, with
# the steps that ended together (a batch's answers, its failures) and their outcomes, each
# step once in its life. It must not raise.
# `outcomes` may be a `BatchResults` (every step answered, from one batch's columns).
StepSink = Callable[[list[Step], Sequence[Outcome]], None]


# A state during a batch: host arrays (each (L, H)), or a pool row (an int) with a state
# pool (`service.engine.residency` says who holds it).
StateRef = State | int


@dataclass(eq=False, slots=True)
class StepRun:
    """A step in its batches (a long step's carries over from one to the next): where it
    starts from, what it runs, what came out."""

    step: Step
    record: SessionRecord | None
    current: StateRef = ()  # the state after the context's last token
    previous: StateRef = ()  # the state before it
    last_token: int = -1
    context_tokens: int = 0
    # Set by `StepBatcher._plan` (empty tuples until then: no two lists made per row and batch).
    first: Sequence[int] = ()  # phase 1: tokens run for the new `previous`
    second: Sequence[int] = ()  # phase 2: tokens whose output answers
    planned: bool = False
    done: int = 0  # tokens of `first` run in earlier batches (a chunked step)
    first_from: StateRef = ()  # the state after first[:done]
    piece: int = 0  # tokens of `first` this batch runs
    final: bool = False  # this batch runs the rest of the step and answers it
    second_from: StateRef = ()
    output: StepOutput | None = None
    output_row: int = 0
    result: StepResult | None = None
    # Adaptation: the writer's words as counted so far (all of the step's after its last
    # batch), and whether the answer mixes them in.
    memory: WordMemory | None = None
    counted: int = 0  # the step's tokens counted into `memory` so far
    typed_used: int = 0  # ... and of its typed words
    mixed: bool = False
    answer: tuple[np.ndarray, np.ndarray] | None = None  # (ids, probs), best first
    typed_answer: bool = False  # the answer names a typed word (an id >= V)
    # With a state pool: the row of `first_from` this step holds between its batches (-1:
    # none), and the rows (current, previous) its answered step leaves the session in.
    carried: int = -1
    new_rows: tuple[int, int] | None = None

    @property
    def left(self) -> int:
        """Tokens still to run (once planned)."""
        return len(self.first) - self.done + len(self.second)


def as_retry(step: Step) -> None:
    """A step whose id is its session's last step's: it was applied (its answer was lost, or
    its outcome unknown to its client). It runs as a step of no new words (the answer the
    first one had, for the same `k` and prefix), so the session's context is unchanged."""
    step.tokens, step.typed = [], []
    step.fresh = step.forget = False
    metrics.STEPS_RETRIED.inc()
