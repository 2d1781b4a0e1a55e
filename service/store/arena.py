"""Row arenas: the host rows of one record shape, and the packing of records into them.

A `RowArena` holds every stored session of one `Shape` (S, L, H, C): per row a float32
(S, L, H) state (current + previous arrays), a `META` record (model, tokens, timestamps,
version, last token, TTL stamp, adapt) and, with a writer's-words memory of C slots
(`WordMemory`), C int32 keys and C float32 weights. A record the engine keeps on its device
(`SessionRecord.state_on_device`) has the state-less shape (0, 0, 0, C): metadata and memory
only.

An arena is a list of chunks that grows geometrically (each new chunk as large as all the
earlier ones together, so an arena of n rows took about log2(n / first) allocations) and
never moves a row: growing by a copy would stall the engine for the length of the copy
(1.4 s for 2 GiB -> 4 GiB here). Freed rows go on a free list (a stack: the most recently
freed is reused first); an arena never shrinks. A row is a plain int; batches of rows are
int64 arrays, read and written with one gather or scatter per chunk.

What a row costs (`python -m benchmarks.bench_memory --via store`, results in
`benchmarks/results/memory.json`, measured before the memory columns existed, so the state
alone): 4,096 B of state for a GRU session (2 x 1 x 512 float32, current + previous),
16,384 B for an LSTM one (4 x 2 x 512), and the 51 B metadata record. A memory of C = 512
slots (the bundled models) adds 4,096 B. The rows of a new chunk not yet written are
allocated but, on Linux, not resident (up to half the arena just after it grew).

The arena knows nothing of session ids, TTLs or owners (`service.store.index`,
`service.store.quotas`): it keeps rows.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any, NamedTuple

import numpy as np

from service.arrays import stack_rows
from service.store.base import SessionRecord, State, WordMemory, columns_of

Shape = tuple[int, int, int, int]  # (S, L, H, C): arrays per session, layers, hidden, memory

# A session's metadata, one packed record per row (51 bytes).
META = np.dtype(
    [
        ("model", "<u2"),  # index into the store's model names
        ("tokens", "<i8"),
        ("created_at", "<f8"),
        ("last_used_at", "<f8"),
        ("version", "<i8"),
        ("last_token", "<i8"),
        ("touched", "<f8"),  # store clock at the last write; drives the TTL
        ("adapt", "u1"),  # the session's default for `adapt`
    ]
)
Meta = tuple[int, int, float, float, int, int, float, int]  # a META record as Python values
_NOTHING: Shape = (0, 0, 0, 0)  # a record with neither a host state nor a memory


class Rows(NamedTuple):
    """Rows of a `RowArena` as arrays, one entry per row."""

    states: np.ndarray  # (B, S, L, H) float32
    metas: np.ndarray  # (B,) of META
    keys: np.ndarray  # (B, C) int32
    weights: np.ndarray  # (B, C) float32


class ArenaUsage(NamedTuple):
    """One arena's rows: in use, allocated, and the bytes allocated for them."""

    shape: Shape
    used: int
    capacity: int
    nbytes: int


class RowArena:
    """Rows of one record shape: float32 state, metadata and memory chunks, and a free list.

    Chunk 0 has `first` rows; chunk k >= 1 has first * 2**(k - 1), so after k + 1 chunks
    the capacity is first * 2**k and a row's chunk is found by a bit length.
    """

    def __init__(self, shape: Shape, first: int) -> None:
        self.shape = shape
        self.first = first
        self.states: list[np.ndarray] = []  # each (rows, S, L, H) float32
        self.metas: list[np.ndarray] = []  # each (rows,) of META
        self.keys: list[np.ndarray] = []  # each (rows, C) int32 (C > 0)
        self.weights: list[np.ndarray] = []  # each (rows, C) float32
        self.capacity = 0
        self._starts = np.zeros(0, dtype=np.int64)  # each chunk's first row
        self._high = 0  # rows below this were handed out at least once
        self._free = np.empty(0, dtype=np.int64)  # a stack of freed rows
        self._nfree = 0

    @property
    def used(self) -> int:
        """Rows holding a session."""
        return self._high - self._nfree

    @property
    def nbytes(self) -> int:
        """Bytes allocated: state, metadata and memory chunks, the free list."""
        return (
            sum(a.nbytes for a in self.states)
            + sum(a.nbytes for a in self.metas)
            + sum(a.nbytes for a in self.keys)
            + sum(a.nbytes for a in self.weights)
            + self._free.nbytes
        )

    def usage(self) -> ArenaUsage:
        """This arena's shape, rows in use, rows allocated and bytes allocated."""
        return ArenaUsage(self.shape, self.used, self.capacity, self.nbytes)

    def locate(self, row: int) -> tuple[int, int]:
        """(chunk, offset) of a row."""
        if row < self.first:
            return 0, row
        chunk = (row // self.first).bit_length()
        return chunk, row - (self.first << (chunk - 1))

    def alloc(self) -> int:
        """A free row (the most recently freed first; a new chunk when none is left)."""
        if self._nfree:
            self._nfree -= 1
            return int(self._free[self._nfree])
        if self._high == self.capacity:
            self._grow()
        self._high += 1
        return self._high - 1

    def _grow(self) -> None:
        rows = self.capacity or self.first
        self.states.append(np.empty((rows, *self.shape[:3]), dtype=np.float32))
        self.metas.append(np.zeros(rows, dtype=META))
        if self.shape[3]:
            self.keys.append(np.empty((rows, self.shape[3]), dtype=np.int32))
            self.weights.append(np.empty((rows, self.shape[3]), dtype=np.float32))
        self._starts = np.append(self._starts, self.capacity)
        self.capacity += rows

    def release(self, row: int) -> None:
        """Give a row back."""
        if self._nfree == len(self._free):
            grown = np.empty(max(64, 2 * len(self._free)), dtype=np.int64)
            grown[: self._nfree] = self._free
            self._free = grown
        self._free[self._nfree] = row
        self._nfree += 1

    def row(self, row: int) -> np.ndarray:
        """The stored (S, L, H) state of a row: a view, valid until the row is written."""
        chunk, offset = self.locate(row)
        return self.states[chunk][offset]  # type: ignore[no-any-return]

    def touched(self, row: int) -> float:
        """The store clock at a row's last write."""
        chunk, offset = self.locate(row)
        return float(self.metas[chunk]["touched"][offset])

    def version(self, row: int) -> int:
        """A row's version."""
        chunk, offset = self.locate(row)
        return int(self.metas[chunk]["version"][offset])

    def places(self, rows: np.ndarray) -> list[tuple[int, np.ndarray | slice, np.ndarray]]:
        """Rows grouped by chunk: (chunk, positions in `rows`, offsets in the chunk)."""
        if len(self._starts) == 1:
            return [(0, slice(None), rows)]
        chunks = np.searchsorted(self._starts, rows, side="right") - 1
        offsets = rows - self._starts[chunks]
        if (chunks == chunks[0]).all():
            return [(int(chunks[0]), slice(None), offsets)]
        places: list[tuple[int, np.ndarray | slice, np.ndarray]] = []
        for chunk in np.unique(chunks):
            at = np.flatnonzero(chunks == chunk)
            places.append((int(chunk), at, offsets[at]))
        return places

    def read_many(self, rows: np.ndarray) -> Rows:
        """Copies of rows, in one gather per chunk: states (B, S, L, H), metadata (B,) of
        `META`, and the memories' keys and weights (B, C) (C = 0: none). Read-only."""
        n = len(rows)
        states = np.empty((n, *self.shape[:3]), dtype=np.float32)
        metas = np.empty(n, dtype=META)
        keys = np.empty((n, self.shape[3]), dtype=np.int32)
        weights = np.empty((n, self.shape[3]), dtype=np.float32)
        for chunk, at, offsets in self.places(rows):
            if self.shape[0]:
                states[at] = self.states[chunk][offsets]
            metas[at] = self.metas[chunk][offsets]
            if self.shape[3]:
                keys[at] = self.keys[chunk][offsets]
                weights[at] = self.weights[chunk][offsets]
        for array in (states, metas, keys, weights):
            array.flags.writeable = False
        return Rows(states, metas, keys, weights)

    def column(self, rows: np.ndarray, field: str) -> np.ndarray:
        """A copy of one metadata field of rows, (B,)."""
        out = np.empty(len(rows), dtype=META[field])
        for chunk, at, offsets in self.places(rows):
            out[at] = self.metas[chunk][field][offsets]
        return out

    def write_many(self, rows: np.ndarray, data: Rows) -> None:
        """Write rows (distinct) from arrays shaped as `read_many` gives them (states
        unused when the shape holds none; keys and weights when it has a memory)."""
        for chunk, at, offsets in self.places(rows):
            if self.shape[0]:
                self.states[chunk][offsets] = data.states[at]
            self.metas[chunk][offsets] = data.metas[at]
            if self.shape[3]:
                self.keys[chunk][offsets] = data.keys[at]
                self.weights[chunk][offsets] = data.weights[at]

    def read(self, row: int) -> tuple[np.ndarray, Meta, tuple[np.ndarray, np.ndarray] | None]:
        """A read-only copy of a row's state, its metadata as Python values, and read-only
        views of its memory's (keys, weights) (None without a memory).

        The memory is only read by the batch that reads the record, before any other
        session batch can write (the scheduler copies it into the batch's arrays), so a
        view is enough; the state is held by long steps across batches, so it is copied."""
        chunk, offset = self.locate(row)
        state = self.states[chunk][offset].copy()
        state.flags.writeable = False
        memory = None
        if self.shape[3]:
            keys, weights = self.keys[chunk][offset], self.weights[chunk][offset]
            keys.flags.writeable = weights.flags.writeable = False
            memory = (keys, weights)
        return state, self.metas[chunk][offset].item(), memory

    def write(self, row: int, state: State, meta: Meta, memory: WordMemory | None) -> None:
        """Copy a state (arrays of this arena's (L, H)), its metadata and its memory's
        arrays into a row."""
        chunk, offset = self.locate(row)
        dst = self.states[chunk][offset]
        for i, array in enumerate(state):
            dst[i] = array  # cast to float32 in the copy
        self.metas[chunk][offset] = meta
        if memory is not None:
            self.keys[chunk][offset] = memory.keys
            self.weights[chunk][offset] = memory.weights


def shape_of(record: SessionRecord) -> Shape:
    """The arena shape of a record; ValueError unless its state is S arrays of one (L, H)
    (none for a state the engine keeps on its device: `SessionRecord.state_on_device`)
    and its memory two arrays of one length."""
    state = record.state
    if record.state_on_device and record.memory is None and not state:
        return _NOTHING  # the engine's usual record (adaptation off): no array to check
    first: tuple[int, ...] = (0, 0)
    if record.state_on_device:
        if state:
            raise ValueError("a state kept on a device has no arrays here")
    else:
        if not state:
            raise ValueError("a session state needs at least one array")
        first = _shape(state[0])
        if len(first) != 2 or any(_shape(a) != first for a in state[1:]):
            raise ValueError(f"state arrays must all be (L, H); got {[_shape(a) for a in state]}")
    slots = 0
    memory = record.memory
    if memory is not None:
        slots = len(memory.keys)
        if _shape(memory.keys) != (slots,) or _shape(memory.weights) != (slots,):
            raise ValueError("a memory's keys and weights must be two arrays of one length")
    return (len(state), int(first[0]), int(first[1]), slots)


def _shape(array: Any) -> tuple[int, ...]:
    return array.shape if type(array) is np.ndarray else np.shape(array)


def pack(records: list[SessionRecord], models: np.ndarray | list[int], shape: Shape) -> Rows:
    """Records of one arena `shape` (and their model ids) as the arrays `write_many` takes;
    their metadata's version and TTL stamp are left 0 for the caller to set. Raises
    ValueError (or OverflowError) for a value out of its field's range or an array that
    does not convert."""
    # Column by column: a structured array built from a list of tuples costs ~4x this.
    metas = np.zeros(len(records), dtype=META)
    metas["model"] = models
    n = len(records)
    for field in ("tokens", "created_at", "last_used_at", "last_token", "adapt"):
        # np.fromiter checks each value against the field's type: one out of range raises.
        metas[field] = np.fromiter(map(attrgetter(field), records), META[field], count=n)
    states = np.empty((len(records), *shape[:3]), dtype=np.float32)
    if shape[0]:
        for i, record in enumerate(records):
            for j, array in enumerate(record.state):
                states[i, j] = array  # cast to float32 in the copy
    keys = weights = np.empty((len(records), 0))
    if shape[3]:
        memories = [r.memory for r in records]
        # A batch's memories that are the rows of one (B, C) pair in order (the engine's
        # usual write) are taken as those arrays: `write_many` copies them once, into the
        # arena's columns. Others are stacked; their arrays may be any array-like
        # `shape_of` accepts.
        columns = columns_of(memories)
        if columns is not None:
            keys, weights = columns
        else:
            keys = stack_rows([np.asarray(m.keys) for m in memories])  # type: ignore[union-attr]
            weights = stack_rows([np.asarray(m.weights) for m in memories])  # type: ignore[union-attr]
    return Rows(states, metas, keys, weights)
