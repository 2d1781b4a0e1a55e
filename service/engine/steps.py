"""The per-batch work's data: a `Step` (one request, made once from its wire request), what
it carries between its batches (`StepRun`), and its answer (`StepResult`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from service import metrics
from service.contract.protocol import StepRequest
from service.engine.runtime import State, StepOutput
from service.errors import BadInput
from service.store import SessionRecord
from service.store.base import WordMemory


@dataclass(eq=False, slots=True)
class Step:
    """One request for a model: add `tokens` to a context and answer its top `k` words."""

    tokens: list[int]  # ids of the text's tokens (may be empty)
    session_id: str | None = None  # None: a stateless context (predict)
    fresh: bool = False  # start the session's context afresh (reset)
    create: bool = False  # a new session: it must not exist yet
    k: int = 5
    prefix_ids: np.ndarray | None = None  # sorted ids of the words matching a prefix
    owner: str = ""  # a new session's quota owner (`SessionRecord.owner`)
    adapt: bool | None = None  # use the writer's words (None: the session's default)
    typed: list[str] = field(default_factory=list)  # typed forms of the `<unk>` tokens
    prefix: str = ""  # the prefix as typed (normalized where it is matched to typed words)
    forget: bool = False  # forget the writer's words first
    client: str = ""  # whose share of the queue it takes (service.engine.fairness)
    step_id: str = ""  # its id: the session's last step's id again means a retry
    prefix_slips: np.ndarray | None = None  # per prefix id: its slip likelihood (ranks by p x it)
    future: asyncio.Future[StepResult] = field(init=False, repr=False)
    attempts: int = field(default=0, repr=False)
    queued_at: float = field(default=0.0, init=False, repr=False)  # the loop's clock at submit
    # A long step between its batches: what it has run so far (None: not started).
    row: StepRun | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_request(cls, request: StepRequest) -> Step:
        """The step a wire request asks for (the one place its fields are read)."""
        ids = None if request.prefix_ids is None else np.frombuffer(request.prefix_ids, np.int64)
        slips = None
        if request.prefix_slips is not None:
            slips = np.frombuffer(request.prefix_slips, dtype=np.float32)
            if ids is None or len(slips) != len(ids):
                raise BadInput("prefix_slips must give one likelihood per prefix id")
        return cls(
            request.tokens,
            session_id=request.session_id,
            fresh=request.fresh,
            create=request.create,
            k=request.k,
            prefix_ids=ids,
            owner=request.owner,
            adapt=request.adapt,
            typed=request.typed,
            prefix=request.prefix,
            forget=request.forget,
            client=request.client,
            step_id=request.step_id,
            prefix_slips=slips,
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
