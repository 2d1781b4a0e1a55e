"""Adaptation in a batch: one object, three vectorised hooks the scheduler calls.

The maths of the writer's-words memory (counting, decay, mixing) is `service.engine.adapt`;
this module is where a batch meets it, once per batch or run, never once per row:

    count(runs)                   before the runs: every row's new words into its memory
                                  (one `adapt.update` for the batch); which memories hold
                                  anything to mix
    prepare(group)                before a run answering rows: the (B, C) memories it mixes
                                  in (`Mixing`), and for a resident run the vocabulary ids
                                  whose probabilities must come out of the device
    answer(group, output, mixing) after it: the mixed answers of the rows that mix

A batch's memories travel as (B, C) columns: the in-process store reads them in one gather
per arena chunk and hands each record a view of one row (`WordMemory.rows`); `count`
takes the rows back as the columns (`columns_of`, one copy: the read's are the records'),
counts into them, and gives each row a view of the result, which the store writes back in
one scatter. Memories that are not one read's rows in order (a store that serializes, a
long step's across batches) are stacked row by row, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.arrays import stack_rows
from service.contract.tokenizer import normalize
from service.engine import adapt
from service.engine.runtime import StepOutput
from service.engine.steps import Step, StepRun
from service.store.base import SessionRecord, WordMemory, columns_of


@dataclass(frozen=True)
class Mixing:
    """What one run's answers mix in: each row's memory, (B, C) each (an empty one for the
    rows that do not mix), and how many of its first columns hold them all (`width`: past
    it every row's slots are empty, `adapt.active_width`)."""

    keys: np.ndarray  # (B, C) int32
    weights: np.ndarray  # (B, C) float32
    width: int = -1  # -1: all C

    @property
    def used(self) -> tuple[np.ndarray, np.ndarray]:
        """The keys and weights in the first `width` columns (views): the gather and
        every pass of the mixing read these only (the slots past them mix nothing in)."""
        if 0 <= self.width < self.keys.shape[1]:
            return self.keys[:, : self.width], self.weights[:, : self.width]
        return self.keys, self.weights


@dataclass(frozen=True)
class Adaptation:
    """A model's adaptation to the writer (`adapt`): its parameters and vocabulary, and the
    three hooks a batch calls."""

    params: adapt.AdaptParams
    suggestible: np.ndarray  # (V,) bool: the words the cache may remember and suggest
    unk_id: int
    vocab_size: int  # V: a memory key >= V is a typed word outside the vocabulary

    def __post_init__(self) -> None:
        if len(self.suggestible) != self.vocab_size:
            raise ValueError(f"{len(self.suggestible)} suggestible flags for {self.vocab_size} ids")

    @classmethod
    def of(cls, runner: Any) -> Adaptation | None:
        """A model's adaptation (its vocabulary and its tuned parameters), None without a
        vocabulary (a fake runner)."""
        vocab = getattr(runner, "vocab", None)
        artifact = getattr(runner, "artifact", None)
        if vocab is None:
            return None
        manifest = artifact.manifest if artifact is not None else {}
        vocab_size = int(runner.start.probs.shape[1])
        return cls(adapt.params_of(manifest), vocab.suggestible, vocab.unk_id, vocab_size)

    def memory_of(self, step: Step, record: SessionRecord | None) -> WordMemory | None:
        """The memory a step starts from (its first batch): its record's, unless the step
        starts a session or a context afresh or forgets; one of another capacity as
        `resized` gives it (None where it cannot be kept)."""
        if record is None or step.create or step.fresh or step.forget:
            return None
        memory = record.memory
        if memory is not None and len(memory.keys) != self.params.capacity:
            return self.resized(memory, record.last_token)
        return memory

    def resized(self, memory: WordMemory, last_token: int) -> WordMemory | None:
        """A memory stored under another capacity (the 256 slots before 512), kept in this
        one's: its entries moved past the recency marks' slots, the rest empty, and the
        context's last token marked as recent (the tokens before it are not known: they
        may be raised until the next `recent` tokens are typed). Kept only where it is a
        plain memory of words that fits (as the 256-slot memories were: no marks, no
        pairs); None otherwise, and the session starts an empty memory.

        Entries keep their weights and the typed words their slots, so the memory mixes as
        before from the next step; a pair count starts with the words typed after it."""
        params = self.params
        layout = adapt.Layout.of(self.vocab_size, params)
        keys = np.asarray(memory.keys)
        held = keys != adapt.EMPTY
        marks = params.recent
        if (
            keys.ndim != 1
            or np.shape(memory.weights) != keys.shape
            or not bool(layout.word_keys(keys[held]).all())
            or int(held.sum()) > params.capacity - marks
            or len(memory.words) > params.max_oov
            or bool((keys[held] >= self.vocab_size + len(memory.words)).any())
        ):
            return None
        new_keys, new_weights = adapt.empty_cache(1, params.capacity)
        new_keys[0, marks : marks + int(held.sum())] = keys[held]
        new_weights[0, marks : marks + int(held.sum())] = np.asarray(memory.weights)[held]
        if layout.recent and 0 <= last_token < self.vocab_size and self.suggestible[last_token]:
            new_keys[0, 0] = layout.words + last_token
        return WordMemory(new_keys[0], new_weights[0], tuple(memory.words))

    def count(self, rows: list[StepRun]) -> list[bool]:
        """Count the words each row runs in this batch into its memory (one vectorised
        update for the batch); per row, whether its memory now holds anything to mix.

        A long step counts its words chunk by chunk, as its tokens run: the update goes
        token by token, so counting in pieces gives the same memory as counting at once,
        and no batch counts more than a chunk of anyone's words beyond its own short ones.

        Every row's memory after it (`StepRun.memory`) is a view of one row of the batch's
        (B, C) arrays: the store copies what it keeps."""
        memories: list[WordMemory | None] = []
        starts: list[int] = []
        ends: list[int] = []
        used: list[int] = []
        for row in rows:
            step = row.step
            memory = row.memory
            if memory is None:  # the step's first batch: the memory it starts from
                memory = self.memory_of(step, row.record)
            memories.append(memory)
            starts.append(row.counted)
            ends.append(len(step.tokens) if row.final else row.done + row.piece)
            used.append(row.typed_used)
        steps = [row.step for row in rows]
        lasts = [row.last_token for row in rows]
        after, live, _ = self.count_columns(steps, memories, starts, ends, lasts, used)
        for row, end, memory, typed_used in zip(rows, ends, after, used):
            if end > row.counted:
                row.counted = end
            row.memory = memory
            row.typed_used = typed_used
        return live

    def count_columns(
        self,
        steps: Sequence[Step],
        memories: Sequence[WordMemory | None],
        starts: Sequence[int],
        ends: Sequence[int],
        lasts: Sequence[int],
        typed_used: list[int],
    ) -> tuple[list[WordMemory], list[bool], tuple[np.ndarray, np.ndarray]]:
        """`count` over columns: each step's `tokens[starts[i]:ends[i]]` into its memory
        (None: an empty one), `lasts[i]` the token before its first (the context's last);
        `typed_used[i]` (its typed words counted so far) is updated in place. Returns the
        memories after (views of rows of the batch's (B, C) arrays), whether each holds
        anything to mix, and those (B, C) keys and weights (for `prepare_columns`)."""
        params = self.params
        # The batch's memories as (B, C) columns, written in place below: one copy of the
        # columns a store read gave (its rows, in order: the usual batch), else a stack
        # of the rows (an empty memory where a row has none).
        columns = columns_of(memories)
        words: list[tuple[str, ...]]
        if columns is not None:
            keys, weights = columns.keys.copy(), columns.weights.copy()
            words = [memory.words for memory in memories]  # type: ignore[union-attr]
        else:
            keys, weights, words = self._stack(memories)
        # One pass over the rows for what only a row knows; the rest is array work.
        lengths_of: list[int] = []
        flat: list[int] = []
        before_of: list[int] = []
        for step, start, end, last in zip(steps, starts, ends, lasts):
            tokens = step.tokens
            if end > start:
                lengths_of.append(end - start)
                if end - start == 1:  # the common step: one word
                    flat.append(tokens[start])
                else:
                    flat.extend(tokens[start:end])
                # The token before the row's first new one (its bigram's first word).
                before_of.append(tokens[start - 1] if start else last)
            else:
                lengths_of.append(0)
                before_of.append(adapt.EMPTY)  # unused: the row counts nothing
        if flat:
            lengths = np.array(lengths_of, dtype=np.int64)
            ids = np.array(flat, dtype=np.int64)
            remembered = None
            if self.unk_id in flat:  # typed words outside the vocabulary
                remembered = np.where(self.suggestible[ids], ids, adapt.EMPTY)
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                for i, step in enumerate(steps):
                    piece = ids[offsets[i] : offsets[i + 1]]
                    unknown = np.flatnonzero(piece == self.unk_id)
                    typed = step.typed[typed_used[i] : typed_used[i] + len(unknown)]
                    typed_used[i] += len(unknown)
                    if typed:
                        table = list(words[i])
                        remembered[offsets[i] + unknown[: len(typed)]] = adapt.oov_keys(
                            table, typed, self.vocab_size, keys[i], weights[i], params
                        )
                        words[i] = tuple(table)
            adapt.count(
                keys,
                weights,
                ids,
                lengths,
                params,
                self.suggestible,
                np.array(before_of, dtype=np.int64),
                remembered,
            )
        live: list[bool] = adapt.live(keys, weights, self.vocab_size, params).tolist()
        # Views of this batch's columns: the store copies what it keeps (in one write
        # of the columns: `columns_of`).
        after = WordMemory.rows(keys, weights, words)
        return after, live, (keys, weights)

    def _stack(
        self, memories: Sequence[WordMemory | None]
    ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, ...]]]:
        """Memories that are not one read's columns, stacked into new (B, C) arrays (an
        empty memory for None), and their typed words."""
        none, nothing = adapt.empty_cache(1, self.params.capacity)
        keys_of: list[np.ndarray] = []
        weights_of: list[np.ndarray] = []
        words: list[tuple[str, ...]] = []
        for memory in memories:
            if memory is None:
                keys_of.append(none[0])
                weights_of.append(nothing[0])
                words.append(())
            else:
                keys_of.append(memory.keys)
                weights_of.append(memory.weights)
                words.append(memory.words)
        return stack_rows(keys_of), stack_rows(weights_of), words

    def prepare(self, group: list[StepRun]) -> Mixing | None:
        """What a run's rows mix in (None: no row of it mixes): each mixing row's memory as
        `count` left it, an empty one for the others."""
        return self.prepare_columns([r.mixed for r in group], [r.memory for r in group])

    def prepare_columns(
        self,
        mixed_of: Sequence[bool],
        memories: Sequence[WordMemory | None],
        stacked: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> Mixing | None:
        """`prepare` over columns: whether each row mixes, and its memory (`stacked`: the
        memories as (B, C) keys and weights already, as `count_columns` made them; they
        are not written)."""
        mixed = np.array(mixed_of, dtype=bool)
        if not mixed.any():
            return None
        if stacked is not None:
            keys, weights = stacked
            if not mixed.all():  # the rows that do not mix are emptied: a copy
                keys, weights = keys.copy(), weights.copy()
        elif all(m is not None for m in memories):  # always, after `count`
            keys = stack_rows([m.keys for m in memories])  # type: ignore[union-attr]
            weights = stack_rows([m.weights for m in memories])  # type: ignore[union-attr]
        else:
            keys, weights = adapt.empty_cache(len(memories), self.params.capacity)
            for i, memory in enumerate(memories):
                if memory is not None:
                    keys[i], weights[i] = memory.keys, memory.weights
        if not mixed.all():
            keys[~mixed] = adapt.EMPTY
            weights[~mixed] = np.float32(0.0)
        return Mixing(keys, weights, adapt.active_width(keys))

    def gather_ids(self, mixing: Mixing) -> np.ndarray:
        """The vocabulary ids whose probabilities a resident run sends out for `mixing`."""
        return adapt.gather_ids(mixing.used[0], self.vocab_size, self.unk_id)

    def answer(self, group: list[StepRun], output: StepOutput, mixing: Mixing) -> None:
        """The answers (`StepRun.answer`) of a run's rows that mix, with the writer's words
        mixed in, and whether each names a typed word (`StepRun.typed_answer`); the other
        rows keep the model's own (`top_words` gives them)."""
        answers, typed = self.answer_columns(
            [r.step for r in group],
            [r.last_token for r in group],
            [r.mixed for r in group],
            [r.memory for r in group],
            output,
            mixing,
        )
        for row, answer, names_typed in zip(group, answers, typed):
            if answer is not None:
                row.answer = answer
                row.typed_answer = names_typed

    def answer_columns(
        self,
        steps: Sequence[Step],
        lasts: Sequence[int],
        mixed: Sequence[bool],
        memories: Sequence[WordMemory | None],
        output: StepOutput,
        mixing: Mixing,
    ) -> tuple[list[tuple[np.ndarray, np.ndarray] | None], list[bool]]:
        """`answer` over columns (`lasts[i]`: the context's last token before the step):
        each mixing row's (ids, probs), best first (None for the others), and whether it
        names a typed word."""
        assert output.probs is not None or output.probs_at is not None
        # Rows that do not mix are answered by `top_words` (exactly as alone): here they
        # take the cheap path (no memory, no prefix).
        n = len(steps)
        candidates: list[np.ndarray | None] = [None] * n
        slips: list[np.ndarray | None] = [None] * n
        matches: list[np.ndarray | None] = [None] * n
        last = [step.tokens[-1] if step.tokens else before for step, before in zip(steps, lasts)]
        ks = [step.k for step in steps]
        # Only the rows that mix and complete a prefix need more (none, in a `Common` batch).
        for i in [i for i, step in enumerate(steps) if step.prefix_ids is not None]:
            step = steps[i]
            if mixed[i]:
                candidates[i], slips[i] = step.prefix_ids, step.prefix_slips
                memory = memories[i]
                if memory is not None and memory.words:
                    prefix = normalize(step.prefix)
                    matches[i] = np.array([normalize(w).startswith(prefix) for w in memory.words])
        # At most the graph's top K (a model exported with a smaller `max_k` than asked
        # for answers fewer words, as `top_words` does).
        k = min(max(ks), output.topk_ids.shape[1])
        ids, probs = adapt.top_k(
            *mixing.used,
            output.probs,
            output.topk_ids,
            output.topk_probs,
            self.unk_id,
            self.suggestible,
            k,
            self.params.lam,
            candidates,
            matches,
            output.probs_at,
            output.probs_index,
            self.params,
            np.array(last, dtype=np.int64),
            slips,
        )
        # Each row's words: its own k of them, padding (-1) only ever ending a row.
        shown = np.minimum(np.array(ks, dtype=np.int64), (ids >= 0).sum(1))
        inside = np.arange(ids.shape[1]) < shown[:, None]
        typed = ((ids >= self.vocab_size) & inside).any(1).tolist()
        answers: list[tuple[np.ndarray, np.ndarray] | None] = [None] * n
        for i, size in enumerate(shown.tolist()):
            if mixed[i]:
                answers[i] = ids[i, :size], probs[i, :size]
        return answers, typed
