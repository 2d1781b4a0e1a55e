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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from service.arrays import stack_rows
from service.contract.tokenizer import normalize
from service.engine import adapt
from service.engine.runtime import StepOutput
from service.engine.steps import StepRun
from service.store.base import WordMemory


@dataclass(frozen=True)
class Mixing:
    """What one run's answers mix in: each row's memory, (B, C) each (an empty one for the
    rows that do not mix)."""

    keys: np.ndarray  # (B, C) int32
    weights: np.ndarray  # (B, C) float32


@dataclass(frozen=True)
class Adaptation:
    """A model's adaptation to the writer (`adapt`): its parameters and vocabulary, and the
    three hooks a batch calls."""

    params: adapt.AdaptParams
    suggestible: np.ndarray  # (V,) bool: the words the cache may remember and suggest
    unk_id: int
    vocab_size: int  # V: a memory key >= V is a typed word outside the vocabulary

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

    def count(self, rows: list[StepRun]) -> list[bool]:
        """Count the words each row runs in this batch into its memory (one vectorised
        update for the batch); per row, whether its memory now holds anything to mix.

        A long step counts its words chunk by chunk, as its tokens run: the update goes
        token by token, so counting in pieces gives the same memory as counting at once,
        and no batch counts more than a chunk of anyone's words beyond its own short ones."""
        params = self.params
        spans = []
        for row in rows:
            step, record = row.step, row.record
            if row.memory is None:  # the step's first batch: the memory it starts from
                starts_afresh = record is None or step.create or step.fresh or step.forget
                old = None if starts_afresh else record.memory  # type: ignore[union-attr]
                if old is not None and old.capacity == params.capacity:
                    row.memory = old
                else:
                    row.memory = WordMemory.empty(params.capacity)
            spans.append((row.counted, len(step.tokens) if row.final else row.done + row.piece))
        memories = [row.memory for row in rows]
        keys = stack_rows([m.keys for m in memories])  # type: ignore[union-attr]
        weights = stack_rows([m.weights for m in memories])  # type: ignore[union-attr]
        words = [m.words for m in memories]  # type: ignore[union-attr]
        lengths = np.array([max(0, end - start) for start, end in spans], dtype=np.int64)
        if lengths.any():
            # Every row's new tokens as one array: the common step is one word a row.
            flat = [t for row, (a, b) in zip(rows, spans) for t in row.step.tokens[a:b]]
            ids = np.array(flat, dtype=np.int64)
            remembered = np.where(self.suggestible[ids], ids, adapt.EMPTY)
            if self.unk_id in flat:  # typed words outside the vocabulary
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                for i, row in enumerate(rows):
                    piece = ids[offsets[i] : offsets[i + 1]]
                    unknown = np.flatnonzero(piece == self.unk_id)
                    typed = row.step.typed[row.typed_used : row.typed_used + len(unknown)]
                    row.typed_used += len(unknown)
                    if typed:
                        table = list(words[i])
                        remembered[offsets[i] + unknown[: len(typed)]] = adapt.oov_keys(
                            table, typed, self.vocab_size, keys[i], weights[i], params
                        )
                        words[i] = tuple(table)
            new = np.full((len(rows), int(lengths.max())), adapt.EMPTY, dtype=np.int32)
            raw = np.full(new.shape, adapt.EMPTY, dtype=np.int64)
            row_of = np.repeat(np.arange(len(rows)), lengths)
            column = np.arange(len(ids)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            new[row_of, column] = remembered
            raw[row_of, column] = ids
            # The token before each row's first new one (its bigram's first word).
            before = np.array(
                [r.step.tokens[a - 1] if a else r.last_token for r, (a, _) in zip(rows, spans)],
                dtype=np.int64,
            )
            adapt.update(keys, weights, new, lengths, params, self.vocab_size, raw, before)
        live: list[bool] = adapt.live(keys, weights, self.vocab_size, params).tolist()
        for i, (row, (_, end)) in enumerate(zip(rows, spans)):
            row.counted = max(row.counted, end)
            # Views of this batch's arrays: the store copies what it keeps.
            row.memory = WordMemory(keys[i], weights[i], words[i])
        return live

    def prepare(self, group: list[StepRun]) -> Mixing | None:
        """What a run's rows mix in (None: no row of it mixes)."""
        if not any(r.mixed for r in group):
            return None
        none, nothing = adapt.empty_cache(1, self.params.capacity)
        memories = [r.memory if r.mixed and r.memory is not None else None for r in group]
        keys = stack_rows([none[0] if m is None else m.keys for m in memories])
        weights = stack_rows([nothing[0] if m is None else m.weights for m in memories])
        return Mixing(keys, weights)

    def gather_ids(self, mixing: Mixing) -> np.ndarray:
        """The vocabulary ids whose probabilities a resident run sends out for `mixing`."""
        return adapt.gather_ids(mixing.keys, self.vocab_size, self.unk_id)

    def answer(self, group: list[StepRun], output: StepOutput, mixing: Mixing) -> None:
        """The answers (`StepRun.answer`) of a run's rows that mix, with the writer's words
        mixed in; the other rows keep the model's own (`top_words` gives them)."""
        assert output.probs is not None or output.probs_at is not None
        # Rows that do not mix are answered by `top_words` (exactly as alone): here they
        # take the cheap path (no memory, no prefix).
        candidates: list[np.ndarray | None] = [
            r.step.prefix_ids if r.mixed else None for r in group
        ]
        matches: list[np.ndarray | None] = [None] * len(group)
        for i, row in enumerate(group):
            memory = row.memory
            if row.mixed and row.step.prefix_ids is not None and memory and memory.words:
                prefix = normalize(row.step.prefix)
                matches[i] = np.array([normalize(w).startswith(prefix) for w in memory.words])
        # At most the graph's top K (a model exported with a smaller `max_k` than asked
        # for answers fewer words, as `top_words` does).
        k = min(max(r.step.k for r in group), output.topk_ids.shape[1])
        ids, probs = adapt.top_k(
            mixing.keys,
            mixing.weights,
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
            np.array([r.step.tokens[-1] if r.step.tokens else r.last_token for r in group]),
            [r.step.prefix_slips if r.mixed else None for r in group],
        )
        shown = (ids >= 0).sum(1).tolist()  # padding (-1) only ever ends a row
        for i, row in enumerate(group):
            if row.mixed:
                n = min(row.step.k, shown[i])
                row.answer = ids[i, :n], probs[i, :n]
