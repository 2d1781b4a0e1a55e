"""Session state: the record and the store protocol, shared by every store.

A session is (model, recurrent state, token count, timestamps, version, owner, the
writer's words). Stores are
async and batch-shaped: the batcher reads all sessions of a batch with one
`get_many` and writes them back with one `put_many`, a compare-and-set on `version`,
so that a store over the network (Redis) costs one round trip each way per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import NamedTuple, Protocol, overload, runtime_checkable

import numpy as np

from service.contract.ids import new_session_id  # noqa: F401 (re-exported by service.store)

State = tuple[np.ndarray, ...]  # (h,) or (h, c); each float32 (L, H)


@dataclass(eq=False, slots=True)
class WordMemory:
    """What a session remembers of its writer's words (`service.engine.adapt`): a decayed
    count per word, `capacity` slots, and the typed words outside the vocabulary.

    `keys[i]` is a vocabulary id, or `vocab_size + j` for `words[j]` (-1: an empty slot);
    `weights[i]` its decayed count. Nothing of it is ever logged."""

    keys: np.ndarray  # (C,) int32
    weights: np.ndarray  # (C,) float32
    words: tuple[str, ...] = ()  # typed out-of-vocabulary words, as last typed
    # Where `keys`/`weights` are row `row` of a batch's (B, C) columns (`rows`): those
    # columns, so that the batch's memories are one pair of arrays again without a copy
    # per row (`columns_of`). Not part of the value: a store that serializes ignores it,
    # and its repr leaves it out (it holds the other sessions' memories of the batch).
    block: MemoryColumns | None = field(default=None, repr=False)
    row: int = field(default=-1, repr=False)

    @classmethod
    def empty(cls, capacity: int) -> WordMemory:
        """A memory that holds nothing yet."""
        return cls(np.full(capacity, -1, np.int32), np.zeros(capacity, np.float32))

    @classmethod
    def rows(
        cls, keys: np.ndarray, weights: np.ndarray, words: Iterable[tuple[str, ...]]
    ) -> list[WordMemory]:
        """One memory per row of (B, C) `keys`/`weights` (views of them, not copies), with
        each row's typed words; `columns_of` gives the two arrays back."""
        block = MemoryColumns(keys, weights)
        return list(map(cls, keys, weights, words, repeat(block), range(len(keys))))

    @property
    def capacity(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays and the typed words (UTF-8)."""
        words = sum(len(w.encode()) for w in self.words)
        return int(self.keys.nbytes + self.weights.nbytes) + words


class MemoryColumns(NamedTuple):
    """A batch's memories as columns: row b of each array is the b-th memory."""

    keys: np.ndarray  # (B, C) int32
    weights: np.ndarray  # (B, C) float32


def columns_of(memories: Sequence[WordMemory | None]) -> MemoryColumns | None:
    """The (B, C) arrays whose rows are `memories` in order, when they are exactly the rows
    of one `WordMemory.rows` call (no copy: the arrays themselves); else None (a memory
    missing, made otherwise, or the rows of another batch or order).

    One identity check a memory: the price of taking a batch's memories as columns where a
    stack would copy each row."""
    if not memories or memories[0] is None:
        return None
    block = memories[0].block
    if block is None or len(block.keys) != len(memories):
        return None
    for i, memory in enumerate(memories):
        if memory is None or memory.block is not block or memory.row != i:
            return None
    return block


@dataclass(eq=False, slots=True)  # states are arrays: compare fields explicitly
class SessionRecord:
    """One session as the batcher sees it.

    `state` holds the recurrent state after the last token, then the state before it:
    (h, h_prev) for a GRU, (h, c, h_prev, c_prev) for an LSTM. With the previous state
    and `last_token`, a request that adds no word (only a new `prefix`) is answered by
    re-running the last token: the model's distribution is only produced by a run.

    `state_on_device` (with an empty `state`) means "the engine that wrote this version
    keeps its state on its device" (`service.engine.residency`): only an engine told so
    by its wiring (it opened the in-process memory store itself) writes such records, and
    only it can step them; it matches them to its rows by (session_id, version,
    created_at). Every other store is always given host states (and refuses such a
    record). A store never sees a device row: the flag is all it keeps of one.
    """

    session_id: str
    model: str
    state: State  # each (L, H) float32: current arrays, then previous arrays
    tokens: int  # text tokens in the context (the implicit start token not counted)
    created_at: float  # Unix time
    last_used_at: float  # Unix time
    version: int = 0  # bumped by every successful write
    last_token: int = -1  # id of the last token run (the implicit start token at first)
    # Whose quota the session counts against (`NEXTWORD_MAX_SESSIONS_PER_KEY`): the API
    # key's name, or the client's address on an open service; "" for none.
    owner: str = ""
    # The writer's words (None: the model keeps none), and whether answers use them when
    # a request does not say (`adapt`).
    memory: WordMemory | None = None
    adapt: bool = True
    # The id of the last step applied (`StepRequest.step_id`; "" when it had none): a retry
    # of that step is recognised and answered, not applied a second time.
    last_step: str = ""
    # The state is on the device of the engine that wrote this version (`state` is empty).
    state_on_device: bool = False
    # The model revision that wrote the state (`ModelArtifact.revision`): an engine serving
    # another revision of the same model (retrained weights, another vocabulary) treats the
    # session as unknown instead of stepping a state its model does not understand. ""
    # where unknown (records written before revisions were kept, stores that keep none):
    # accepted by any revision, as before.
    revision: str = ""


@dataclass(eq=False, slots=True)
class SessionColumns(Sequence[SessionRecord]):
    """B records of one model as columns, each session's state kept on the device of the
    engine writing them (`SessionRecord.state_on_device`; no state arrays): what a batch of
    steps writes, without a `SessionRecord` per session. The in-process store's `put_many`
    takes them as they are; any other store is given `records()`. As a sequence, its items
    are the records (made when read).

    Row b of every column is session `session_ids[b]`; `version` is the version each
    record was read at (0 for a new session), as `SessionRecord.version` of a record
    handed to `put_many`."""

    session_ids: list[str]
    model: str
    tokens: np.ndarray | list[int]  # (B,) int64
    created_at: np.ndarray | list[float]  # (B,) float64
    last_used_at: float  # one write time for all
    version: np.ndarray | list[int]  # (B,) int64
    last_token: np.ndarray | list[int]  # (B,) int64
    owner: list[str]
    memory: list[WordMemory | None] | None  # None: no session has a memory
    adapt: np.ndarray | list[bool]  # (B,) bool
    last_step: list[str]
    state_on_device: bool = True  # False: `records()` need states before a store takes them
    revision: str = ""  # the model revision writing them (`SessionRecord.revision`)

    def __len__(self) -> int:
        return len(self.session_ids)

    @overload
    def __getitem__(self, i: int) -> SessionRecord: ...

    @overload
    def __getitem__(self, i: slice) -> list[SessionRecord]: ...

    def __getitem__(self, i: int | slice) -> SessionRecord | list[SessionRecord]:
        if isinstance(i, slice):
            return [self.record(j) for j in range(len(self))[i]]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.record(i % len(self))

    def record(self, i: int) -> SessionRecord:
        """Row `i` as a record (state-less)."""
        return SessionRecord(  # by position, in the field order of `SessionRecord`
            self.session_ids[i],
            self.model,
            (),
            int(self.tokens[i]),
            float(self.created_at[i]),
            self.last_used_at,
            int(self.version[i]),
            int(self.last_token[i]),
            self.owner[i],
            None if self.memory is None else self.memory[i],
            bool(self.adapt[i]),
            self.last_step[i],
            self.state_on_device,
            self.revision,
        )

    def records(self) -> list[SessionRecord]:
        """Every row as a record, in order."""
        return list(map(self.record, range(len(self.session_ids))))

    def take(self, at: Sequence[int]) -> SessionColumns:
        """The rows `at`, in that order."""
        memory = self.memory
        index = np.asarray(at, dtype=np.int64)
        return SessionColumns(
            [self.session_ids[i] for i in at],
            self.model,
            np.asarray(self.tokens, dtype=np.int64)[index],
            np.asarray(self.created_at, dtype=np.float64)[index],
            self.last_used_at,
            np.asarray(self.version, dtype=np.int64)[index],
            np.asarray(self.last_token, dtype=np.int64)[index],
            [self.owner[i] for i in at],
            None if memory is None else [memory[i] for i in at],
            np.asarray(self.adapt, dtype=bool)[index],
            [self.last_step[i] for i in at],
            self.state_on_device,
            self.revision,
        )


class SessionRows(Sequence[SessionRecord | None]):
    """A read of B sessions as columns (the in-process store's `get_many`): row b is the
    record of `ids[b]` where `found[b]`, else None. As a sequence its items are records,
    made the first time each is read; a batch of steps reads the columns instead.

    Numeric fields are (B,) arrays (meaningless where not found); `on_device[b]`: the row
    has no host state (`SessionRecord.state_on_device`); `states[b]`: its host state
    (empty where none)."""

    __slots__ = (
        "ids",
        "found",
        "model",
        "tokens",
        "created_at",
        "last_used_at",
        "version",
        "last_token",
        "owner",
        "memory",
        "adapt",
        "last_step",
        "on_device",
        "states",
        "revision",
        "_made",
    )

    def __init__(
        self,
        ids: list[str],
        found: np.ndarray,
        model: list[str],
        tokens: np.ndarray,
        created_at: np.ndarray,
        last_used_at: np.ndarray,
        version: np.ndarray,
        last_token: np.ndarray,
        owner: list[str],
        memory: list[WordMemory | None],
        adapt: np.ndarray,
        last_step: list[str],
        on_device: np.ndarray,
        states: list[State],
        revision: list[str] | None = None,
    ) -> None:
        self.ids = ids
        self.found = found  # (B,) bool
        self.model = model
        self.tokens = tokens  # (B,) int64
        self.created_at = created_at  # (B,) float64
        self.last_used_at = last_used_at  # (B,) float64
        self.version = version  # (B,) int64
        self.last_token = last_token  # (B,) int64
        self.owner = owner
        self.memory = memory
        self.adapt = adapt  # (B,) bool
        self.last_step = last_step
        self.on_device = on_device  # (B,) bool
        self.states = states
        self.revision = revision  # None: every row's is "" (a store that keeps none)
        self._made: list[SessionRecord | None] | None = None

    @classmethod
    def of(cls, records: Sequence[SessionRecord | None], ids: list[str]) -> SessionRows:
        """Records read one by one (`ids[b]`'s or None), as columns."""
        n = len(records)

        def column(name: str, dtype: type, empty: object) -> np.ndarray:
            values = (empty if r is None else getattr(r, name) for r in records)
            return np.fromiter(values, dtype, n)

        rows = cls(
            ids,
            np.fromiter((r is not None for r in records), bool, n),
            ["" if r is None else r.model for r in records],
            column("tokens", np.int64, 0),
            column("created_at", np.float64, 0.0),
            column("last_used_at", np.float64, 0.0),
            column("version", np.int64, 0),
            column("last_token", np.int64, -1),
            ["" if r is None else r.owner for r in records],
            [None if r is None else r.memory for r in records],
            column("adapt", bool, False),
            ["" if r is None else r.last_step for r in records],
            column("state_on_device", bool, False),
            [() if r is None else r.state for r in records],
            ["" if r is None else r.revision for r in records],
        )
        rows._made = list(records)
        return rows

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, i: int) -> SessionRecord | None: ...

    @overload
    def __getitem__(self, i: slice) -> list[SessionRecord | None]: ...

    def __getitem__(self, i: int | slice) -> SessionRecord | None | list[SessionRecord | None]:
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        n = len(self.ids)
        if not -n <= i < n:
            raise IndexError(i)
        i %= n
        made = self._made
        if made is None:
            made = self._made = [None] * n
        record = made[i]
        if record is None and self.found[i]:
            record = made[i] = SessionRecord(
                self.ids[i],
                self.model[i],
                self.states[i],
                int(self.tokens[i]),
                float(self.created_at[i]),
                float(self.last_used_at[i]),
                int(self.version[i]),
                int(self.last_token[i]),
                self.owner[i],
                self.memory[i],
                bool(self.adapt[i]),
                self.last_step[i],
                bool(self.on_device[i]),
                "" if self.revision is None else self.revision[i],
            )
        return record

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, SessionRows)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def take(self, at: Sequence[int]) -> SessionRows:
        """The rows `at` in that order (-1: a row not found)."""
        if not len(self.found):  # nothing was read: every row is one not found
            return SessionRows.of([None] * len(at), [""] * len(at))
        index = np.asarray(at, dtype=np.int64)
        missing = index < 0
        found = self.found[index] & ~missing
        picked = SessionRows(
            [self.ids[i] if i >= 0 else "" for i in at],
            found,
            [self.model[i] if i >= 0 else "" for i in at],
            self.tokens[index],
            self.created_at[index],
            self.last_used_at[index],
            self.version[index],
            self.last_token[index],
            [self.owner[i] if i >= 0 else "" for i in at],
            [self.memory[i] if i >= 0 else None for i in at],
            self.adapt[index],
            [self.last_step[i] if i >= 0 else "" for i in at],
            self.on_device[index],
            [self.states[i] if i >= 0 else () for i in at],
            None if self.revision is None else [self.revision[i] if i >= 0 else "" for i in at],
        )
        if self._made is not None:
            made = self._made
            picked._made = [made[i] if i >= 0 else None for i in at]
        return picked


@runtime_checkable
class SessionStore(Protocol):
    """Where sessions live; every method may raise `StoreUnavailable`."""

    @property
    def evictions(self) -> int:
        """Sessions dropped by the cap (least recently used first)."""
        ...

    @property
    def expirations(self) -> int:
        """Sessions dropped after `ttl_s` idle seconds."""
        ...

    def new_id(self) -> str:
        """A fresh unguessable id."""
        ...

    async def get_many(self, ids: list[str]) -> Sequence[SessionRecord | None]:
        """The live records of `ids` (None where unknown or expired), in one round trip."""
        ...

    async def put_many(
        self, records: list[SessionRecord], expected: list[int | None]
    ) -> list[bool]:
        """Compare-and-set each record on its version (None: must not exist yet).

        True where written; the stored version is then `(expected or 0) + 1`.
        """
        ...

    async def get(self, session_id: str) -> SessionRecord:
        """One live record; raises `UnknownSession`."""
        ...

    async def delete(self, session_id: str) -> None:
        """Forget a session; raises `UnknownSession`."""
        ...

    async def count(self) -> int:
        """Live sessions."""
        ...

    async def ping(self) -> None:
        """Raise `StoreUnavailable` when the store cannot be reached."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
