"""Executing a batch: plan its rows, run them (grouped by length), build the results.

The scheduler (`service.engine.scheduler`) decides which steps make a batch, reads and
writes their sessions and answers them; this module runs what it hands over, in the
engine's executor thread, and never touches the store or the queues, nor ends a step.

Two shapes of work, with the same answers:

- `Common`: the common batch, as arrays. Every row is a session's step of 1 to
  `prefill_chunk` new tokens, without a prefix, whose state is in pool rows (resident,
  or a new context starting from the pinned start rows). Its plan is the rows'
  (current, previous) as int64 arrays, its runs take the tokens as (B, T) arrays (one
  run of the first T - 1 tokens per distinct T, then one run of every row's last
  token), the adaptation's hooks take the batch's columns, and its results are the
  batch's top-k arrays and the records' columns (`BatchResults`), computed from the
  read's columns (`SessionRows`) with array operations. The runs, their grouping and
  their order are the general path's for the same rows, so the answers and the states
  are the same bit for bit.
- a list of `StepRun`s: everything else (chunked long steps, prefixes, stateless steps,
  steps of no new token, states uploaded from host records, no state pool), one object
  per row, as the steps need.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service import metrics
from service.engine.adapt_hooks import Adaptation
from service.engine.pool import ResidentOutput, StatePool
from service.engine.residency import Holding, Residency
from service.engine.runtime import State, StepOutput, top_words
from service.engine.steps import BatchResults, StateRef, Step, StepResult, StepRun
from service.store import SessionRecord
from service.store.base import SessionColumns, SessionRows, WordMemory

# The top-k width of a run whose words no answer reads (a prefill before the last token):
# ONNX Runtime's TopK has a slower path for K=1 (measured on a (256, 12000) batch of the
# LSTM's probabilities, one thread: 1.9 ms at K=1, 1.2 at K=2, 2.8 at K=50).
UNREAD_TOP = 2


class StepRunner(Protocol):
    """What the batcher runs: an `OrtModel`, or a fake in tests."""

    name: str
    revision: str  # `ModelArtifact.revision`, kept in every record written ("" in fakes)
    start: StepOutput  # the run of the implicit start token from a zero state (batch 1)
    eos_id: int

    def run(self, tokens: np.ndarray, state: State, want_probs: bool = False) -> StepOutput:
        """Run `tokens` (B, T) from `state` (each (L, B, H))."""
        ...


@dataclass(eq=False, slots=True)
class Common:
    """A batch in the common case (see the module's docstring), as columns.

    The scheduler fills the inputs (the records read as columns, row b step b's);
    `Execution.compute` sets `results` (`BatchResults`: the answers and the records to
    write, as columns, row b step b's) and `rows` (the pool rows each step leaves its
    session in)."""

    steps: list[Step]
    records: SessionRows  # as read (not found: a new session)
    current: np.ndarray  # (B,) int64: the row of the state after the context's last token
    previous: np.ndarray  # (B,) int64: the row of the state before it
    results: BatchResults | None = None
    rows: np.ndarray = dataclasses.field(  # (B, 2) int64: new (current, previous)
        default_factory=lambda: np.empty((0, 2), dtype=np.int64)
    )

    def __len__(self) -> int:
        return len(self.steps)


Work = Common | list[StepRun]


def steps_of(work: Work) -> list[Step]:
    """The steps of a batch's work, in order."""
    return work.steps if isinstance(work, Common) else [row.step for row in work]


def to_upload(row: StepRun) -> bool:
    """Whether a batch starts `row` from the host states of its record (a session spilled
    to host memory, or read from a store that serializes states), uploaded first."""
    step = row.step
    return (
        not row.planned
        and row.record is not None
        and not isinstance(row.current, int)
        and not (step.fresh or step.create)
    )


def _stack(states: list[State]) -> State:
    """Per-row states (each (L, H)) -> batch state (each (L, B, H))."""
    return tuple(np.stack([s[i] for s in states], axis=1) for i in range(len(states[0])))


def _new_rows(output: StepOutput) -> np.ndarray | None:
    """A resident run's new states (a pool row per batch row); None from a copied run."""
    return output.rows if isinstance(output, ResidentOutput) else None


class Execution:
    """One model's batch execution: what a batch runs, the runs, and their results."""

    def __init__(
        self,
        runner: StepRunner,
        pool: StatePool | None,
        residency: Residency | None,
        adaptation: Adaptation | None,
        adapt_default: bool,
        prefill_chunk: int,
        clock: Callable[[], float],
        start_current: StateRef,
        zeros: StateRef,
    ) -> None:
        self.runner = runner
        self.name = runner.name
        self.revision = runner.revision
        self.pool = pool
        self.residency = residency
        self.adaptation = adaptation
        self.adapt_default = adapt_default
        self.prefill_chunk = prefill_chunk
        self.clock = clock
        self.start_current = start_current  # a pool row (pinned) with a pool
        self.zeros = zeros
        self.halves = len(runner.start.state)  # arrays in a state (h, or h and c)
        # Records written by a resident run say so only when the store keeps them so.
        self.on_device = residency is not None and residency.on_device
        self._tokens_run = metrics.TOKENS.labels(self.name)
        # Whether `Common` batches run here (with a state pool); a test turns it off to
        # compare with the general path.
        self.takes_common = pool is not None

    def session_adapt(self, step: Step, record: SessionRecord | None) -> bool:
        """A session's default for `adapt`: set when it is created, kept after."""
        if record is None or step.create:
            return self.adapt_default if step.adapt is None else step.adapt
        return record.adapt

    def compute(self, work: Work, holding: Holding | None) -> None:
        """Run a batch's work and set its results (the rows it takes are `holding`'s)."""
        if isinstance(work, Common):
            assert holding is not None
            self.compute_common(work, holding)
        else:
            self.compute_rows(work, holding)

    # --- the common batch, as arrays -----------------------------------------------

    def compute_common(self, batch: Common, holding: Holding) -> None:
        """A common batch's runs and results (see `Common`)."""
        steps = batch.steps
        n = len(steps)
        lengths = [len(step.tokens) for step in steps]
        second_from = batch.current
        if max(lengths) > 1:
            # Phase 1, per distinct length (in order of first appearance, as `by_length`):
            # the tokens but the last, from the current state, for the new previous state.
            second_from = batch.current.copy()
            groups: dict[int, list[int]] = {}
            for i, length in enumerate(lengths):
                if length > 1:
                    groups.setdefault(length, []).append(i)
            for members in groups.values():
                at = np.array(members, dtype=np.int64)
                tokens = np.array([steps[i].tokens[:-1] for i in members], dtype=np.int64)
                second_from[at] = self.run_rows(
                    tokens, batch.current[at], holding, top=UNREAD_TOP
                ).rows
        # Phase 2, every row at once: the last token, whose output answers.
        last = np.fromiter((step.tokens[-1] for step in steps), np.int64, n).reshape(n, 1)
        top = max(step.k for step in steps)  # the words the answers (and the mixing) read
        if self.adaptation is None:
            output = self.run_rows(last, second_from, holding, top=top)
            batch.rows = np.stack([output.rows, second_from], axis=1)
            batch.results = self.results(batch, output, lengths)
            return
        adaptation = self.adaptation
        # The adaptation's hooks over the batch's columns, as `compute_rows` calls them
        # (every step counts all its words now, and answers now).
        # The records' fields they take, from the read's columns (no record made per row):
        # a step that starts a session or its context afresh starts from the end of a
        # sentence and (with `forget` too) an empty memory (`Adaptation.memory_of`).
        read = batch.records
        anew = ~read.found | np.fromiter((s.fresh or s.create for s in steps), bool, n)
        lasts = np.where(anew, self.runner.eos_id, read.last_token).tolist()
        capacity = adaptation.params.capacity
        starts: list[WordMemory | None] = []
        for i, (step, afresh, memory) in enumerate(zip(steps, anew.tolist(), read.memory)):
            if afresh or step.forget or memory is None:
                starts.append(None)
            elif len(memory.keys) != capacity:  # another capacity: the hook resizes it
                starts.append(adaptation.memory_of(step, read[i]))
            else:
                starts.append(memory)
        memories, live, stacked = adaptation.count_columns(
            steps, starts, [0] * n, lengths, lasts, [0] * n
        )
        # Each step's `adapt`, else its session's (`session_adapt`: a new one's default).
        fresh_default = self.adapt_default
        kept = np.where(read.found, read.adapt, fresh_default).tolist()
        mixed = [
            holds
            and (
                step.adapt
                if step.adapt is not None
                else (fresh_default if step.create else session)
            )
            for step, session, holds in zip(steps, kept, live)
        ]
        mixing = adaptation.prepare_columns(mixed, memories, stacked)
        gather = None if mixing is None else adaptation.gather_ids(mixing)
        output = self.run_rows(last, second_from, holding, gather, top)
        answers: Sequence[tuple[np.ndarray, np.ndarray] | None] = ()
        typed: Sequence[bool] = ()
        if mixing is not None:
            answers, typed = adaptation.answer_columns(
                steps, lasts, mixed, memories, output, mixing
            )
        batch.rows = np.stack([output.rows, second_from], axis=1)
        batch.results = self.results(batch, output, lengths, memories, answers, typed)

    def run_rows(
        self,
        tokens: np.ndarray,
        start: np.ndarray,
        holding: Holding,
        gather: np.ndarray | None = None,
        top: int | None = None,
    ) -> ResidentOutput:
        """One resident run of (B, T) `tokens` from rows `start` (its new rows held by
        `holding`; `gather`: the ids whose probabilities come out; `top`: how many of the
        best words, `StatePool.run`), checked to answer one row per row."""
        assert self.pool is not None
        output = self.pool.run(tokens, start, False, gather, top=top)
        holding.add(output.rows)
        self._tokens_run.inc(tokens.size)
        if len(output) != len(start) or len(output.rows) != len(start):
            raise RuntimeError(f"the model answered {len(output)} rows for a batch of {len(start)}")
        return output

    def results(
        self,
        batch: Common,
        output: StepOutput,
        lengths: list[int],
        memories: Sequence[WordMemory | None] = (),
        answers: Sequence[tuple[np.ndarray, np.ndarray] | None] = (),
        typed: Sequence[bool] = (),
    ) -> BatchResults:
        """The steps' answers and the records they write (at one `now` for the batch), as
        columns: the batch's top-k arrays as they are, and one pass over the steps for the
        records' fields. With adaptation, each step's memory after the batch, and the mixed
        answers (None: the model's own) and whether each names a typed word."""
        now = self.clock()
        steps, old = batch.steps, batch.records
        n = len(steps)
        ks = [step.k for step in steps]
        k = max(ks)
        # The same fields as `result` writes, a column each: a new session's (not read, or
        # created) from its step, the others' from the record read.
        lengths_of = np.array(lengths, dtype=np.int64)
        creates = np.fromiter((step.create for step in steps), bool, n)
        anew = ~old.found | creates
        again = anew | np.fromiter((step.fresh for step in steps), bool, n)
        tokens = np.where(again, lengths_of, old.tokens + lengths_of)
        created = np.where(anew, now, old.created_at)
        versions = np.where(anew, 0, old.version)
        owners, adapts = old.owner, old.adapt
        if anew.any():
            default = self.adapt_default
            news = anew.tolist()
            owners = [s.owner if a else o for s, a, o in zip(steps, news, owners)]
            chosen = (default if s.adapt is None else s.adapt for s in steps)
            adapts = np.where(anew, np.fromiter(chosen, bool, n), adapts)
        written = SessionColumns(
            [step.session_id for step in steps],  # type: ignore[misc]
            self.name,
            tokens,
            created,
            now,
            versions,
            [step.tokens[-1] for step in steps],
            owners,
            list(memories) if memories else None,
            adapts,
            [step.step_id for step in steps],
            self.on_device,
            self.revision,
        )
        words = None
        if answers and any(typed):
            # Only a mixed answer can name a typed word (the model's own ids are < V).
            words = [
                memory.words if named and answer is not None and memory is not None else ()
                for named, answer, memory in zip(typed, answers, memories)
            ]
        return BatchResults(
            output.topk_ids[:, :k],
            output.topk_probs[:, :k],
            None if ks.count(k) == n else ks,
            list(answers) if answers else None,
            words,
            written,
        )

    # --- every other batch, row by row ---------------------------------------------

    def compute_rows(self, rows: list[StepRun], holding: Holding | None) -> None:
        """Plan each row, make the runs (grouped by length), then build the results.

        A row runs the next chunk of its first tokens, or (its last batch) the rest of
        them and then its second tokens, whose output answers."""
        chunk = self.prefill_chunk
        if self.pool is not None and holding is not None:
            self.upload(rows, self.pool, holding)
        for row in rows:
            if not row.planned:
                self.plan(row)
            row.final = row.left <= chunk
            row.piece = len(row.first) - row.done if row.final else chunk
        if self.adaptation is not None:
            live = self.adaptation.count(rows)
            for row, holds in zip(rows, live):
                use = (
                    self.session_adapt(row.step, row.record)
                    if row.step.adapt is None
                    else row.step.adapt
                )
                row.mixed = row.final and use and holds and bool(row.second)
        first = [r for r in rows if r.piece]
        for group in self.by_length(first, lambda r: r.piece):
            output = self.run(
                group,
                [r.first[r.done : r.done + r.piece] for r in group],
                [r.first_from for r in group],
                False,
                holding,
                top=UNREAD_TOP,
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
        for group in self.by_length(second, lambda r: len(r.second)):
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
                top = max(r.step.k for r in group)
                output = self.run(group, tokens, states, False, holding, gather, prefixed, top)
            else:
                output = self.run(
                    group, tokens, states, bool(prefixed) or mixing is not None, holding
                )
            for i, row in enumerate(group):
                row.output, row.output_row = output, i
            if mixing is not None:
                assert self.adaptation is not None
                self.adaptation.answer(group, output, mixing)
        now = self.clock()
        for row in final:
            row.result = self.result(row, now)

    @staticmethod
    def upload(rows: list[StepRun], pool: StatePool, holding: Holding) -> None:
        """Bring the host states of the records a batch starts from (sessions spilled to host
        memory, or read from a store that serializes states) into pool rows, at once (the
        batch holds them)."""
        up = [row for row in rows if to_upload(row)]
        if not up:
            return
        half = len(up[0].record.state) // 2  # type: ignore[union-attr]
        states = [s for r in up for s in (r.record.state[:half], r.record.state[half:])]  # type: ignore[union-attr]
        uploaded = pool.upload(states)
        holding.add(uploaded)
        for i, row in enumerate(up):
            row.current, row.previous = int(uploaded[2 * i]), int(uploaded[2 * i + 1])

    def plan(self, row: StepRun) -> None:
        """What a row runs: its start states, then `first` (for the new previous state)
        and `second` (whose output answers)."""
        step, record = row.step, row.record
        tokens = step.tokens
        row.planned = True
        if record is None or step.fresh or step.create:
            row.current, row.previous = self.start_current, self.zeros
            row.last_token, row.context_tokens = self.runner.eos_id, 0
        else:
            if not isinstance(row.current, int):  # a pool row already: located or uploaded
                half = self.halves
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
    def by_length(rows: list[StepRun], length: Callable[[StepRun], int]) -> list[list[StepRun]]:
        """The rows grouped by `length`, groups in order of first appearance, rows in order."""
        groups: dict[int, list[StepRun]] = {}
        for row in rows:
            groups.setdefault(length(row), []).append(row)
        return list(groups.values())

    def run(
        self,
        group: list[StepRun],
        tokens: Sequence[Sequence[int]],
        states: list[StateRef],
        want_probs: bool,
        holding: Holding | None,
        gather: np.ndarray | None = None,
        probs_rows: list[int] | None = None,
        top: int | None = None,
    ) -> StepOutput:
        """One run of a group (`gather`, `probs_rows` and `top`: resident runs only,
        `StatePool.run`, whose new rows `holding` holds); checks that it answered one row
        per row of the group."""
        batch = np.array(tokens, dtype=np.int64)  # (B, T)
        output: StepOutput
        if self.pool is not None:
            output = self.pool.run(batch, states, want_probs, gather, probs_rows, top)  # type: ignore[arg-type]
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

    def result(self, row: StepRun, now: float) -> StepResult:
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
            # last_used_at, version, last_token, owner, memory, adapt, last_step,
            # state_on_device, revision
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
            self.session_adapt(step, old),
            step.step_id,
            self.on_device and bool(row.new_rows),
            self.revision,
        )
        return StepResult(ids, probs, tokens, record, words, last_token)
