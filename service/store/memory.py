"""The in-process session store: a row arena per state shape, idle TTL and an LRU cap.

How the store keeps a session's host state (where it lives, host or an engine's device, is
`service.engine.residency`'s to decide). A session's state
(current + previous arrays, packed (S, L, H) float32) is one row of the `_StatePool` of
its shape: one pool per shape, so per model (the bundled LSTM is (4, 2, 512), the GRU
(2, 1, 512)), in host memory. A pool is a list of chunks that grows geometrically
(each new chunk as large as all the earlier ones together, so a pool of n rows took
about log2(n / first) allocations) and never moves a row: growing by a copy would stall
the engine for the length of the copy (1.4 s for 2 GiB -> 4 GiB here). Freed rows go on
a free list and are reused first; a pool never shrinks (`close` drops them all). A row's
metadata (model, tokens, timestamps, version, last token, TTL stamp, adapt) lies beside it
in a packed numpy record, so the per-session Python objects are only the session id and an
int handle (row and pool) in one ordered dict.

What an idle session costs (`python -m benchmarks.bench_memory --via store`, results in
`benchmarks/results/memory.json`): the resident set grew by 4,350 B per session for
1,000,000 GRU sessions (4,096 B of state: current + previous, 2 x 1 x 512 float32) and
by 16,713 B for 200,000 LSTM sessions (16,384 B of state). The ~250-330 B over the state
are the id (80 B), the ordered dict's entry with its handle (~110 B, more just after the
dict's table doubles) and the metadata record (51 B). The store before the pools kept a
numpy array and a Python object per session: 610-680 B over the state. `memory_bytes`
counts every allocated row; the rows of a new chunk not yet written are reserved but,
on Linux, not resident (up to half the pool just after it grew).

With adaptation (`service.engine.adapt`), a session's memory of its writer's words lives
in the same row: C int32 keys and C float32 weights beside the state (C = 256 slots for
the bundled models: 2,048 B more per session; the figures above predate it and measure
the state alone), and the typed words outside the vocabulary, the only variable part, in
a dict of their own for the sessions that have any.

`get`/`get_many` return copies (read-only arrays): a batch may hold its records while
another batch writes the same rows. `put_many` writes rows in place.

A record written with `state_on_device` (the engine keeps that version's state on its
device: `SessionRecord`, `service.engine.residency`) takes a row of the state-less shape
(0, 0, 0, C): its metadata and memory only. When the engine spills it, `restore_states`
moves it to a row of its host shape, its version, TTL and place unchanged. The store
never sees a device row: it imports nothing from the engine.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Container
from typing import Any, NamedTuple

import numpy as np

from service import metrics
from service.arrays import stack_rows
from service.errors import UnknownSession
from service.store.base import SessionRecord, State, WordMemory, new_session_id

Shape = tuple[int, int, int, int]  # (S, L, H, C): arrays per session, layers, hidden, memory

# A session's metadata, one packed record per row (51 bytes).
_META = np.dtype(
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
_Meta = tuple[int, int, float, float, int, int, float, int]  # a _META record as Python values
_POOL_BITS = 8  # a handle is row << _POOL_BITS | pool: 256 shapes per store
_POOL_MASK = (1 << _POOL_BITS) - 1
_HANDLE_BYTES = 32  # an int object up to 2**60 (rows < 2**52)


class Rows(NamedTuple):
    """Rows of a `_StatePool` as arrays, one entry per row."""

    states: np.ndarray  # (B, S, L, H) float32
    metas: np.ndarray  # (B,) of _META
    keys: np.ndarray  # (B, C) int32
    weights: np.ndarray  # (B, C) float32


class PoolUsage(NamedTuple):
    """One pool's rows: in use, allocated, and the bytes allocated for them."""

    shape: Shape
    used: int
    capacity: int
    nbytes: int


class _StatePool:
    """Rows of one state shape: float32 state and metadata chunks, and a free list.

    With a memory of C slots (the writer's words: `WordMemory`), each row also has C int32
    keys and C float32 weights, in chunks beside the states.

    Chunk 0 has `first` rows; chunk k >= 1 has first * 2**(k - 1), so after k + 1 chunks
    the capacity is first * 2**k and a row's chunk is found by a bit length.
    """

    def __init__(self, shape: Shape, first: int) -> None:
        self.shape = shape
        self.first = first
        self.states: list[np.ndarray] = []  # each (rows, S, L, H) float32
        self.metas: list[np.ndarray] = []  # each (rows,) of _META
        self.keys: list[np.ndarray] = []  # each (rows, C) int32 (C > 0)
        self.weights: list[np.ndarray] = []  # each (rows, C) float32
        self.capacity = 0
        self._high = 0  # rows below this were handed out at least once
        self._free = np.empty(0, dtype=np.int64)  # a stack of freed rows
        self._nfree = 0

    @property
    def used(self) -> int:
        """Rows holding a session."""
        return self._high - self._nfree

    @property
    def nbytes(self) -> int:
        """Bytes allocated: state and metadata chunks, the free list."""
        return (
            sum(a.nbytes for a in self.states)
            + sum(a.nbytes for a in self.metas)
            + sum(a.nbytes for a in self.keys)
            + sum(a.nbytes for a in self.weights)
            + self._free.nbytes
        )

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
            rows = self.capacity or self.first
            self.states.append(np.empty((rows, *self.shape[:3]), dtype=np.float32))
            self.metas.append(np.zeros(rows, dtype=_META))
            if self.shape[3]:
                self.keys.append(np.empty((rows, self.shape[3]), dtype=np.int32))
                self.weights.append(np.empty((rows, self.shape[3]), dtype=np.float32))
            self.capacity += rows
        self._high += 1
        return self._high - 1

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

    def _places(self, rows: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Rows grouped by chunk: (chunk, positions in `rows`, offsets in the chunk)."""
        starts = np.array([0] + [self.first << k for k in range(len(self.states) - 1)])
        chunks = np.searchsorted(starts, rows, side="right") - 1
        offsets = rows - starts[chunks]
        if len(self.states) == 1 or (chunks == chunks[0]).all():
            return [(int(chunks[0]), np.arange(len(rows)), offsets)]
        places = []
        for chunk in np.unique(chunks):
            at = np.flatnonzero(chunks == chunk)
            places.append((int(chunk), at, offsets[at]))
        return places

    def read_many(self, rows: np.ndarray) -> Rows:
        """Copies of rows, in one gather per chunk: states (B, S, L, H), metadata (B,) of
        `_META`, and the memories' keys and weights (B, C) (C = 0: none). Read-only."""
        n = len(rows)
        states = np.empty((n, *self.shape[:3]), dtype=np.float32)
        metas = np.empty(n, dtype=_META)
        keys = np.empty((n, self.shape[3]), dtype=np.int32)
        weights = np.empty((n, self.shape[3]), dtype=np.float32)
        for chunk, at, offsets in self._places(rows):
            if self.shape[0]:
                states[at] = self.states[chunk][offsets]
            metas[at] = self.metas[chunk][offsets]
            if self.shape[3]:
                keys[at] = self.keys[chunk][offsets]
                weights[at] = self.weights[chunk][offsets]
        for array in (states, metas, keys, weights):
            array.flags.writeable = False
        return Rows(states, metas, keys, weights)

    def metas_of(self, rows: np.ndarray) -> np.ndarray:
        """A copy of rows' metadata, (B,) of `_META`."""
        metas = np.empty(len(rows), dtype=_META)
        for chunk, at, offsets in self._places(rows):
            metas[at] = self.metas[chunk][offsets]
        return metas

    def write_many(self, rows: np.ndarray, data: Rows) -> None:
        """Write rows (distinct) from arrays shaped as `read_many` gives them (states
        unused when the shape holds none; keys and weights when it has a memory)."""
        for chunk, at, offsets in self._places(rows):
            if self.shape[0]:
                self.states[chunk][offsets] = data.states[at]
            self.metas[chunk][offsets] = data.metas[at]
            if self.shape[3]:
                self.keys[chunk][offsets] = data.keys[at]
                self.weights[chunk][offsets] = data.weights[at]

    def read(self, row: int) -> tuple[np.ndarray, _Meta, tuple[np.ndarray, np.ndarray] | None]:
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

    def write(self, row: int, state: State, meta: _Meta, memory: WordMemory | None) -> None:
        """Copy a state (arrays of this pool's (L, H)), its metadata and its memory's arrays
        into a row."""
        chunk, offset = self.locate(row)
        dst = self.states[chunk][offset]
        for i, array in enumerate(state):
            dst[i] = array  # cast to float32 in the copy
        self.metas[chunk][offset] = meta
        if memory is not None:
            self.keys[chunk][offset] = memory.keys
            self.weights[chunk][offset] = memory.weights


def _shape_of(record: SessionRecord) -> Shape:
    """The pool shape of a record; ValueError unless its state is S arrays of one (L, H)
    (none for a state the engine keeps on its device: `SessionRecord.state_on_device`)
    and its memory two arrays of one length."""
    state = record.state
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


def _rows_of(records: list[SessionRecord], models: list[int]) -> Rows:
    """Records of one pool shape (and their model ids) as the arrays `write_many` takes;
    their metadata's version and TTL stamp are left 0 for the caller to set."""
    # Column by column: a structured array built from a list of tuples costs ~4x this.
    metas = np.zeros(len(records), dtype=_META)
    metas["model"] = models
    metas["tokens"] = [r.tokens for r in records]
    metas["created_at"] = [r.created_at for r in records]
    metas["last_used_at"] = [r.last_used_at for r in records]
    metas["last_token"] = [r.last_token for r in records]
    metas["adapt"] = [r.adapt for r in records]
    shape = _shape_of(records[0])
    states = np.empty((len(records), *shape[:3]), dtype=np.float32)
    if shape[0]:
        for i, record in enumerate(records):
            for j, array in enumerate(record.state):
                states[i, j] = array  # cast to float32 in the copy
    keys = weights = np.empty((len(records), 0))
    if shape[3]:  # a memory's arrays may be any array-like `_shape_of` accepts
        keys = stack_rows([np.asarray(r.memory.keys) for r in records])  # type: ignore[union-attr]
        weights = stack_rows([np.asarray(r.memory.weights) for r in records])  # type: ignore[union-attr]
    return Rows(states, metas, keys, weights)


def _block(nbytes: int) -> int:
    return (nbytes + 15) & ~15  # pymalloc hands out 16-byte aligned blocks


class MemorySessionStore:
    """Sessions in this process: state rows in pools, idle TTL and an LRU cap.

    The ordered dict (id -> handle) is kept in write order, which is both LRU order and
    TTL order (every write stamps `touched`), so expiry and eviction pop from its front
    and free the session's row. Reading a session (`get`, `get_many`) does not count as
    using it: a step writes.

    With `owner_cap`, an owner (`SessionRecord.owner`: an API key, or a client address)
    holds at most that many sessions: a new one past it evicts the owner's own least
    recently written session, never another owner's. Each owner's sessions are kept in
    an ordered dict of their own (write order), so that eviction pops from its front.
    """

    def __init__(
        self,
        ttl_s: float = 1800.0,
        cap: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        first_rows: int = 1024,
        owner_cap: int = 0,
    ) -> None:
        if first_rows < 1:
            raise ValueError("first_rows must be at least 1")
        self.ttl_s = ttl_s
        self.cap = cap
        self.owner_cap = owner_cap  # sessions per owner (0: no cap, owners not tracked)
        self.clock = clock
        self.first_rows = first_rows  # rows in a pool's first chunk
        self.evictions = 0  # sessions dropped by the cap (least recently used first)
        self.expirations = 0  # sessions dropped after `ttl_s` idle seconds
        self._index: OrderedDict[str, int] = OrderedDict()
        self._pools: list[_StatePool] = []
        self._pool_ids: dict[Shape, int] = {}
        self._models: list[str] = []
        self._model_ids: dict[str, int] = {}
        self._key_bytes = 0  # the ids' str objects, as the index's estimate counts them
        self._owned: dict[str, OrderedDict[str, None]] = {}  # owner -> its sessions
        self._owner_of: dict[str, str] = {}  # session -> owner (owned sessions only)
        self._words: dict[str, tuple[str, ...]] = {}  # session -> its typed words (if any)
        self._last_steps: dict[str, str] = {}  # session -> its last step's id (if it had one)

    def new_id(self) -> str:
        """A fresh unguessable id."""
        return new_session_id()

    # --- where a session's state lives -------------------------------------------------

    def _pool_id(self, shape: Shape) -> int:
        pool_id = self._pool_ids.get(shape)
        if pool_id is None:
            if len(self._pools) > _POOL_MASK:
                raise ValueError(f"more than {_POOL_MASK + 1} state shapes in one store")
            pool_id = self._pool_ids[shape] = len(self._pools)
            self._pools.append(_StatePool(shape, self.first_rows))
        return pool_id

    def _model_id(self, model: str) -> int:
        model_id = self._model_ids.get(model)
        if model_id is None:
            if len(self._models) >= np.iinfo(_META["model"]).max:
                raise ValueError("too many model names in one store")
            model_id = self._model_ids[model] = len(self._models)
            self._models.append(model)
        return model_id

    def _pool(self, handle: int) -> tuple[_StatePool, int]:
        return self._pools[handle & _POOL_MASK], handle >> _POOL_BITS

    def _stored_state(self, session_id: str) -> np.ndarray:
        """The pool row holding a session's state (a view; for tests)."""
        pool, row = self._pool(self._index[session_id])
        return pool.row(row)

    def _forget(self, session_id: str, handle: int) -> None:
        """Free a dropped session's row (the caller removed it from the index)."""
        pool, row = self._pool(handle)
        pool.release(row)
        self._key_bytes -= _block(sys.getsizeof(session_id))
        self._words.pop(session_id, None)
        self._last_steps.pop(session_id, None)
        owner = self._owner_of.pop(session_id, None)
        if owner is not None:
            sessions = self._owned[owner]
            del sessions[session_id]
            if not sessions:
                del self._owned[owner]

    # --- TTL and LRU --------------------------------------------------------------------

    def _expire(self) -> None:
        horizon = self.clock() - self.ttl_s
        dropped = 0
        while self._index:
            handle = next(iter(self._index.values()))
            pool, row = self._pool(handle)
            if pool.touched(row) > horizon:
                break
            self._forget(*self._index.popitem(last=False))
            dropped += 1
        if dropped:
            self.expirations += dropped
            metrics.SESSION_EXPIRATIONS.inc(dropped)

    def _live(self, session_id: str) -> int | None:
        handle = self._index.get(session_id)
        if handle is not None and self._expired(session_id, self.clock()):
            self._expire()
            return None
        return handle

    def _stored_rows(self, ids: list[str]) -> dict[int, list[tuple[int, int]]]:
        """The stored sessions among `ids`, by pool: (position in `ids`, row) each."""
        by_pool: dict[int, list[tuple[int, int]]] = {}
        for i, session_id in enumerate(ids):
            handle = self._index.get(session_id)
            if handle is not None:
                by_pool.setdefault(handle & _POOL_MASK, []).append((i, handle >> _POOL_BITS))
        return by_pool

    def _read(self, ids: list[str]) -> list[SessionRecord | None]:
        """The live records of `ids` (None where unknown or expired), each pool's rows read
        in one gather; an expired session found drops every expired one."""
        out: list[SessionRecord | None] = [None] * len(ids)
        horizon = self.clock() - self.ttl_s
        expired = False
        models, owner_of, words_of = self._models, self._owner_of, self._words
        last_steps = self._last_steps
        for pool_id, found in self._stored_rows(ids).items():
            pool = self._pools[pool_id]
            data = pool.read_many(np.array([row for _, row in found], dtype=np.int64))
            # Per row only what must be per row: the record (fields given by position).
            keys = list(data.keys) if pool.shape[3] else None
            weights = list(data.weights) if pool.shape[3] else None
            for j, meta in enumerate(data.metas.tolist()):
                model, tokens, created_at, last_used_at, version, last_token, touched, adapt = meta
                if touched <= horizon:
                    expired = True
                    continue
                at = found[j][0]
                session_id = ids[at]
                memory = None
                if keys is not None and weights is not None:
                    memory = WordMemory(keys[j], weights[j], words_of.get(session_id, ()))
                state: State = ()
                if pool.shape[0]:
                    # A copy of its own: a long step holds its record across batches, and a
                    # view would keep this whole read alive (256 LSTM states: 4 MiB).
                    own = data.states[j].copy()
                    own.flags.writeable = False
                    state = tuple(own)
                out[at] = SessionRecord(
                    session_id,
                    models[model],
                    state,
                    tokens,
                    created_at,
                    last_used_at,
                    version,
                    last_token,
                    owner_of.get(session_id, ""),
                    memory,
                    bool(adapt),
                    last_steps.get(session_id, ""),
                    not pool.shape[0],
                )
        if expired:
            self._expire()
        return out

    # --- the protocol -------------------------------------------------------------------

    async def get_many(self, ids: list[str]) -> list[SessionRecord | None]:
        """The live records of `ids` (None where unknown or expired)."""
        return self._read(ids)

    async def put_many(
        self, records: list[SessionRecord], expected: list[int | None]
    ) -> list[bool]:
        """Compare-and-set each record on its version; evict past the cap.

        As if every write were made, then the least recently written sessions dropped
        down to the cap; but sessions this batch does not write are dropped first, so
        their rows take the batch's new sessions and the pools hold at most `cap` rows.
        """
        if len(records) != len(expected):
            raise ValueError("one expected version per record")
        # Everything that can refuse a record, before anything is written.
        places = [(self._pool_id(_shape_of(r)), self._model_id(r.model)) for r in records]
        # ... and every record as the arrays its pool is written from: a value out of its
        # field's range or an array that does not convert refuses the whole batch here.
        by_pool: dict[int, list[int]] = {}  # pool -> the records of its shape
        for i, (pool_id, _) in enumerate(places):
            by_pool.setdefault(pool_id, []).append(i)
        arrays = {
            pool_id: _rows_of([records[i] for i in at], [places[i][1] for i in at])
            for pool_id, at in by_pool.items()
        }
        self._expire()
        versions: dict[str, int] = {}  # the version each session written here ends at
        written = []
        for record, version, stored in zip(records, expected, self._versions(records)):
            have = versions.get(record.session_id, stored)
            fits = have == version  # None == None: a new session
            if fits:
                versions[record.session_id] = (version or 0) + 1
            written.append(fits)
        new = sum(session_id not in self._index for session_id in versions)
        owned: dict[str, int] = {}  # new sessions per owner (owners tracked with a cap)
        if self.owner_cap > 0:
            for record, ok in zip(records, written):
                if ok and record.owner and record.session_id not in self._index:
                    owned[record.owner] = owned.get(record.owner, 0) + 1
        evicted = self._evict_owned(owned, keep=versions)
        evicted += self._evict(len(self._index) + new - self.cap, keep=versions)
        # Placed in the batch's order (the LRU order); by row, so that a row freed and taken
        # again in this batch holds the write made last.
        placed: dict[int, dict[int, int]] = {}  # pool -> row -> the record written there
        for i, (record, fits) in enumerate(zip(records, written)):
            if fits:
                pool_id = places[i][0]
                placed.setdefault(pool_id, {})[self._place(record, pool_id)] = i
        now = self.clock()
        for pool_id, rows in placed.items():
            where = {i: j for j, i in enumerate(by_pool[pool_id])}  # record -> its array row
            at = np.fromiter((where[i] for i in rows.values()), dtype=np.int64, count=len(rows))
            data = arrays[pool_id]
            if len(at) < len(data.metas) or (at != np.arange(len(at))).any():
                data = Rows(data.states[at], data.metas[at], data.keys[at], data.weights[at])
            data.metas["version"] = [(expected[i] or 0) + 1 for i in rows.values()]
            data.metas["touched"] = now
            self._pools[pool_id].write_many(
                np.fromiter(rows, dtype=np.int64, count=len(rows)), data
            )
        evicted += self._evict(len(self._index) - self.cap)  # a batch larger than the cap
        evicted += self._evict_owned(dict.fromkeys(owned, 0))  # ... or than an owner's cap
        if evicted:
            self.evictions += evicted
            metrics.SESSION_EVICTIONS.inc(evicted)
        metrics.ACTIVE_SESSIONS.set(len(self._index))
        return written

    def _evict_owned(self, new: dict[str, int], keep: Container[str] = ()) -> int:
        """Make room under `owner_cap` for `new[owner]` more sessions of each owner: drop
        the owner's least recently written sessions, skipping those in `keep`."""
        victims = []
        for owner, count in new.items():
            sessions = self._owned.get(owner)
            if sessions is None:
                continue
            excess = len(sessions) + count - self.owner_cap
            for session_id in sessions:
                if excess <= 0:
                    break
                if session_id not in keep:
                    victims.append(session_id)
                    excess -= 1
        for session_id in victims:
            self._forget(session_id, self._index.pop(session_id))
        return len(victims)

    def _evict(self, n: int, keep: Container[str] = ()) -> int:
        """Drop up to `n` least recently written sessions, skipping those in `keep`."""
        victims = []
        if n > 0:
            for session_id in self._index:
                if session_id not in keep:
                    victims.append(session_id)
                    if len(victims) == n:
                        break
        for session_id in victims:
            self._forget(session_id, self._index.pop(session_id))
        return len(victims)

    def _versions(self, records: list[SessionRecord]) -> list[int | None]:
        """The stored version of each record's session (None: not stored), each pool's rows
        read in one gather."""
        out: list[int | None] = [None] * len(records)
        for pool_id, found in self._stored_rows([r.session_id for r in records]).items():
            rows = np.array([row for _, row in found], dtype=np.int64)
            versions = self._pools[pool_id].metas_of(rows)["version"].tolist()
            for (i, _), version in zip(found, versions):
                out[i] = version
        return out

    def _place(self, record: SessionRecord, pool_id: int) -> int:
        """The row a record is written into (its session's own unless its shape changed),
        with the index, LRU order, typed words and owner updated."""
        handle = self._index.get(record.session_id)
        if handle is None:
            row = self._pools[pool_id].alloc()
            self._key_bytes += _block(sys.getsizeof(record.session_id))
        elif handle & _POOL_MASK != pool_id:  # the same session with another state shape
            self._pools[handle & _POOL_MASK].release(handle >> _POOL_BITS)
            row = self._pools[pool_id].alloc()
        else:
            row = handle >> _POOL_BITS
        # The side tables are empty for most services: no lookup then.
        if record.memory is not None and record.memory.words:
            self._words[record.session_id] = record.memory.words
        elif self._words:
            self._words.pop(record.session_id, None)
        if record.last_step:
            self._last_steps[record.session_id] = record.last_step
        elif self._last_steps:
            self._last_steps.pop(record.session_id, None)
        self._index[record.session_id] = row << _POOL_BITS | pool_id
        self._index.move_to_end(record.session_id)
        # A session keeps the owner it was first written with; every write moves it to the
        # end of that owner's order, whatever owner the record names.
        owner = self._owner_of.get(record.session_id) if self._owner_of else None
        if owner is None and self.owner_cap > 0 and record.owner:
            owner = self._owner_of[record.session_id] = record.owner
        if owner is not None:
            sessions = self._owned.setdefault(owner, OrderedDict())
            sessions[record.session_id] = None
            sessions.move_to_end(record.session_id)
        return row

    async def get(self, session_id: str) -> SessionRecord:
        """One live record; raises `UnknownSession`."""
        record = self._read([session_id])[0]
        if record is None:
            raise UnknownSession(f"no session {session_id!r} (never created, deleted or expired)")
        return record

    async def delete(self, session_id: str) -> None:
        """Forget a session and free its row; raises `UnknownSession`."""
        handle = self._live(session_id)
        if handle is None:
            raise UnknownSession(f"no session {session_id!r} (never created, deleted or expired)")
        del self._index[session_id]
        self._forget(session_id, handle)
        metrics.ACTIVE_SESSIONS.set(len(self._index))

    async def count(self) -> int:
        """Live sessions (expired ones are dropped first)."""
        self._expire()
        metrics.ACTIVE_SESSIONS.set(len(self._index))
        return len(self._index)

    async def ping(self) -> None:
        """Always reachable."""

    async def close(self) -> None:
        """Drop every session and release the pools."""
        self._index.clear()
        self._pools.clear()
        self._pool_ids.clear()
        self._models.clear()
        self._model_ids.clear()
        self._owned.clear()
        self._owner_of.clear()
        self._words.clear()
        self._last_steps.clear()
        self._key_bytes = 0
        metrics.ACTIVE_SESSIONS.set(0)

    def _expired(self, session_id: str, now: float) -> bool:
        pool, row = self._pool(self._index[session_id])
        return pool.touched(row) <= now - self.ttl_s

    # --- states an engine kept on its device ----------------------------------------------

    def restore_states(
        self, ids: list[str], versions: list[int], states: list[State]
    ) -> list[bool]:
        """Give host states to sessions written without one (`state_on_device`: the engine
        kept them on its device) and still at exactly `versions`: the engine spilling them
        (`service.engine.residency`). Nothing else changes: not the version, the TTL, the
        place in the LRU order, the owner or the memory. False where the session is gone,
        expired, at another version or holds a state already (nothing written)."""
        now = self.clock()
        out = []
        for session_id, version, state in zip(ids, versions, states):
            handle = self._index.get(session_id)
            if handle is None:
                out.append(False)
                continue
            old, row = self._pool(handle)
            if old.shape[0] or old.version(row) != version or self._expired(session_id, now):
                out.append(False)
                continue
            _, meta, arrays = old.read(row)
            memory = None if arrays is None else WordMemory(*arrays)
            first = state[0]
            pool_id = self._pool_id(
                (len(state), int(first.shape[0]), int(first.shape[1]), old.shape[3])
            )
            new_row = self._pools[pool_id].alloc()
            self._pools[pool_id].write(new_row, state, meta, memory)
            old.release(row)
            self._index[session_id] = new_row << _POOL_BITS | pool_id  # keeps its place
            out.append(True)
        return out

    # --- what it costs ------------------------------------------------------------------

    def pool_usage(self) -> list[PoolUsage]:
        """Each pool's shape, rows in use, rows allocated and bytes allocated."""
        return [PoolUsage(p.shape, p.used, p.capacity, p.nbytes) for p in self._pools]

    def memory_bytes(self) -> int:
        """Bytes this store holds: the pools (all allocated rows) and an estimate of the index.

        The index: the ordered dict with its nodes (`sys.getsizeof` counts both), the id
        strings and one int handle per session.
        """
        index = sys.getsizeof(self._index) + self._key_bytes + _HANDLE_BYTES * len(self._index)
        return sum(p.nbytes for p in self._pools) + index
