"""The in-process session store: records in row arenas, an index with idle TTL and an LRU
cap, and owner quotas.

How the store keeps a session's host record (where its state lives, host or an engine's
device, is `service.engine.residency`'s to decide). It composes three ideas, one module each:

- `service.store.arena`: a `RowArena` per record shape (state, metadata, memory), rows
  that never move, a free list; records packed into rows column by column;
- `service.store.index`: session id -> handle in least recently written order, which is
  also TTL order: expiry and the LRU cap take from its front;
- `service.store.quotas`: owners and their caps.

What it adds of its own: the model names (a u2 in each row's metadata), the typed words
outside the vocabulary (`WordMemory.words`, the only variable part of a memory) and the
last step's id, in dicts of their own for the sessions that have any, and the
compare-and-set of `put_many`.

What an idle session costs, all told (`python -m benchmarks.bench_memory --via store`,
results in `benchmarks/results/memory.json`, measured before the memory columns existed):
the resident set grew by 4,350 B per session for 1,000,000 GRU sessions (4,096 B of state)
and by 16,713 B for 200,000 LSTM sessions (16,384 B of state); the rest is the index's and
the arena's (see theirs). `memory_bytes` counts every allocated row and estimates the index,
and the engine's residency entries when it keeps states resident (`count_beside`).

`get`/`get_many` return copies (read-only arrays): a batch may hold its records while
another batch writes the same rows. `get_many` answers a batch's read as columns
(`SessionRows`, a sequence of records made when read) and `put_many` takes a batch's
write as columns too (`SessionColumns`): an engine's common batch goes from the arenas'
arrays to its own and back without a record per session. `put_many` writes rows in place.

A record written with `state_on_device` (the engine keeps that version's state on its
device: `SessionRecord`, `service.engine.residency`) takes a row of the state-less shape
(0, 0, 0, C): its metadata and memory only. When the engine spills it, `restore_states`
moves it to a row of its host shape, its version, TTL and place unchanged. The store
never sees a device row: it imports nothing from the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Iterable, Mapping
from itertools import repeat
from operator import attrgetter
from typing import Any, NamedTuple

import numpy as np

from service import metrics
from service.errors import UnknownSession
from service.store.arena import (
    META,
    ArenaUsage,
    RowArena,
    Rows,
    Shape,
    pack,
    shape_of,
)
from service.store.base import (
    SessionColumns,
    SessionRecord,
    SessionRows,
    State,
    WordMemory,
    columns_of,
    new_session_id,
)
from service.store.index import ARENA_BITS, ARENA_MASK, SessionIndex, handle_of, split
from service.store.quotas import OwnerQuotas

_ABSENT = -1  # a handle array's entry for an id not in the index
_NO_VERSION = np.iinfo(np.int64).min  # a version array's entry for "not stored" (None)
_SESSION_ID = attrgetter("session_id")
_MODEL = attrgetter("model")
_MEMORY = attrgetter("memory")
_LAST_STEP = attrgetter("last_step")
_OWNER = attrgetter("owner")


class _Sides(NamedTuple):
    """What a write needs of each record besides its packed arrays: the index's key, the
    quota's owner and the side tables' entries (typed words, last step's id)."""

    ids: list[str]
    owners: list[str]
    words: list[tuple[str, ...]]
    last_steps: list[str]


def _column(ids: Mapping[Any, int], keys: Iterable[Any], n: int) -> np.ndarray:
    """`ids[key]` for each of `n` keys, (n,) int64."""
    if len(ids) == 1:
        return np.full(n, next(iter(ids.values())), dtype=np.int64)
    return np.fromiter(map(ids.__getitem__, keys), dtype=np.int64, count=n)


def _versions(expected: list[int | None]) -> np.ndarray | None:
    """Expected versions as (B,) int64 (`_NO_VERSION` for None); None where one is not an
    int64 (or is `_NO_VERSION` itself): the caller compares them one by one then."""
    array = np.array([_NO_VERSION if e is None else e for e in expected])
    if array.dtype != np.int64 or array.shape != (len(expected),):
        return None
    if np.count_nonzero(array == _NO_VERSION) != expected.count(None):
        return None
    return array


def _subset(data: Rows, at: np.ndarray) -> Rows:
    """The rows `at` of packed arrays (the arrays themselves when `at` is all of them, in
    order)."""
    if len(at) == len(data.metas) and (at == np.arange(len(at))).all():
        return data
    return Rows(data.states[at], data.metas[at], data.keys[at], data.weights[at])


def _own_state(state: np.ndarray) -> State:
    """A read-only copy of one row's (S, L, H) state, as S arrays."""
    own = state.copy()
    own.flags.writeable = False
    return tuple(own)


class MemorySessionStore:
    """Sessions in this process: records in row arenas, idle TTL, an LRU cap and owner caps.

    Expiry and eviction drop the least recently written sessions (`SessionIndex`) and free
    their rows. Reading a session (`get`, `get_many`) does not count as using it: a step
    writes. With `owner_cap`, an owner holds at most that many sessions (`OwnerQuotas`).
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
        self.first_rows = first_rows  # rows in an arena's first chunk
        self.evictions = 0  # sessions dropped by the cap (least recently used first)
        self.expirations = 0  # sessions dropped after `ttl_s` idle seconds
        self._index = SessionIndex()
        self._quotas = OwnerQuotas(owner_cap)
        self._arenas: list[RowArena] = []
        self._arena_ids: dict[Shape, int] = {}
        self._models: list[str] = []
        self._model_ids: dict[str, int] = {}
        self._words: dict[str, tuple[str, ...]] = {}  # session -> its typed words (if any)
        self._last_steps: dict[str, str] = {}  # session -> its last step's id (if it had one)
        # What else holds this store's sessions' bytes (`count_beside`): the engine's
        # residency entries, which the store cannot see.
        self._beside: list[Callable[[], int]] = []

    def new_id(self) -> str:
        """A fresh unguessable id."""
        return new_session_id()

    # --- where a session's record lives -------------------------------------------------

    def _arena_id(self, shape: Shape) -> int:
        arena_id = self._arena_ids.get(shape)
        if arena_id is None:
            if len(self._arenas) > ARENA_MASK:
                raise ValueError(f"more than {ARENA_MASK + 1} state shapes in one store")
            arena_id = self._arena_ids[shape] = len(self._arenas)
            self._arenas.append(RowArena(shape, self.first_rows))
        return arena_id

    def _model_id(self, model: str) -> int:
        model_id = self._model_ids.get(model)
        if model_id is None:
            if len(self._models) >= np.iinfo(META["model"]).max:
                raise ValueError("too many model names in one store")
            model_id = self._model_ids[model] = len(self._models)
            self._models.append(model)
        return model_id

    def _row(self, handle: int) -> tuple[RowArena, int]:
        arena_id, row = split(handle)
        return self._arenas[arena_id], row

    def _stored_state(self, session_id: str) -> np.ndarray:
        """The arena row holding a session's state (a view; for tests)."""
        arena, row = self._row(self._index.handles[session_id])
        return arena.row(row)

    def _forget(self, session_id: str, handle: int) -> None:
        """Free a dropped session's row (the caller removed it from the index)."""
        arena, row = self._row(handle)
        arena.release(row)
        if self._words:
            self._words.pop(session_id, None)
        if self._last_steps:
            self._last_steps.pop(session_id, None)
        self._quotas.forget(session_id)

    def _drop(self, victims: list[str]) -> int:
        """Remove sessions from the index and free their rows; how many."""
        for session_id in victims:
            self._forget(session_id, self._index.pop(session_id))
        return len(victims)

    # --- TTL and LRU --------------------------------------------------------------------

    def _expire(self) -> None:
        horizon = self.clock() - self.ttl_s
        arenas = self._arenas

        def expired(handle: int) -> bool:
            arena_id, row = split(handle)
            return arenas[arena_id].touched(row) <= horizon

        dropped = self._index.pop_expired(expired)
        for session_id, handle in dropped:
            self._forget(session_id, handle)
        if dropped:
            self.expirations += len(dropped)
            metrics.SESSION_EXPIRATIONS.inc(len(dropped))

    def _expired(self, session_id: str, now: float) -> bool:
        arena, row = self._row(self._index.handles[session_id])
        return arena.touched(row) <= now - self.ttl_s

    def _live(self, session_id: str) -> int | None:
        handle = self._index.get(session_id)
        if handle is not None and self._expired(session_id, self.clock()):
            self._expire()
            return None
        return handle

    def _handles(self, ids: list[str]) -> np.ndarray:
        """The handle of each id, (B,) int64 (`_ABSENT` where not indexed)."""
        get = self._index.handles.get
        return np.fromiter(map(get, ids, repeat(_ABSENT)), dtype=np.int64, count=len(ids))

    def _by_arena(self, arena_ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Positions grouped by arena: (arena, positions in `arena_ids`, ascending) each."""
        if len(arena_ids) == 0:
            return []
        first = int(arena_ids[0])
        if (arena_ids == first).all():
            return [(first, np.arange(len(arena_ids)))]
        return [(int(a), np.flatnonzero(arena_ids == a)) for a in np.unique(arena_ids)]

    def _read(self, ids: list[str]) -> SessionRows:
        """The live records of `ids` as columns (not found where unknown or expired), each
        arena's rows read in one gather; an expired session found drops every expired one."""
        n = len(ids)
        handles = self._handles(ids)
        present = np.flatnonzero(handles != _ABSENT)
        metas = np.zeros(n, dtype=META)
        found = np.zeros(n, dtype=bool)
        on_device = np.zeros(n, dtype=bool)
        states: list[State] = [()] * n
        memories: list[WordMemory | None] = [None] * n
        if len(present):
            horizon = self.clock() - self.ttl_s
            expired = False
            handles = handles[present]
            for arena_id, at in self._by_arena(handles & ARENA_MASK):
                arena = self._arenas[arena_id]
                data = arena.read_many(handles[at] >> ARENA_BITS)
                live = data.metas["touched"] > horizon
                places = present[at]
                if not live.all():
                    expired = True
                    places = places[live]
                    data = Rows(*(array[live] for array in data))
                metas[places] = data.metas
                found[places] = True
                spots = places.tolist()
                if arena.shape[0]:
                    # A copy of its own per record: a long step holds its record across
                    # batches, and a view would keep this whole read alive.
                    for i, state in zip(spots, data.states):
                        states[i] = _own_state(state)
                else:
                    on_device[places] = True
                if arena.shape[3]:
                    words = self._words
                    mine = [ids[i] for i in spots]
                    typed = map(words.get, mine, repeat(())) if words else repeat((), len(mine))
                    # Views of the read's (B, C) columns, which they remember: the engine
                    # takes them as one pair of arrays again (`columns_of`), not row by row.
                    rows = WordMemory.rows(data.keys, data.weights, typed)
                    if len(spots) == n:
                        memories = rows  # type: ignore[assignment]  # every id, in order
                    else:
                        for i, memory in zip(spots, rows):
                            memories[i] = memory
            if expired:
                self._expire()
        models = self._models
        if len(models) == 1:
            names = [models[0]] * n
        else:
            names = [models[m] if models else "" for m in metas["model"].tolist()]
        owner_of = self._quotas.owner_of
        owners = list(map(owner_of.get, ids, repeat(""))) if owner_of else [""] * n
        last_steps = self._last_steps
        steps = list(map(last_steps.get, ids, repeat(""))) if last_steps else [""] * n
        return SessionRows(
            ids,
            found,
            names,
            metas["tokens"],
            metas["created_at"],
            metas["last_used_at"],
            metas["version"],
            metas["last_token"],
            owners,
            memories,
            metas["adapt"].astype(bool),
            steps,
            on_device,
            states,
        )

    # --- the protocol -------------------------------------------------------------------

    async def get_many(self, ids: list[str]) -> SessionRows:
        """The live records of `ids` (None where unknown or expired), as columns."""
        return self._read(ids)

    async def put_many(
        self, records: list[SessionRecord] | SessionColumns, expected: list[int | None]
    ) -> list[bool]:
        """Compare-and-set each record on its version; evict past the cap. The records may
        come as `SessionColumns` (an engine's batch, states on its device): the same
        write, without a record per session (`_put_columns`).

        As if every write were made in the batch's order, then the least recently written
        sessions dropped down to the cap; but sessions this batch does not write are
        dropped first, so their rows take the batch's new sessions and the arenas hold at
        most `cap` rows.

        The batch's metadata is handled as arrays (handles, stored and expected versions,
        the compare, the new versions and TTL stamps, one scatter per arena chunk); per
        record only what the index and the side tables need. A batch naming a session
        twice, or with a version that is not an int64, takes the same steps record by
        record.
        """
        if len(records) != len(expected):
            raise ValueError("one expected version per record")
        if isinstance(records, SessionColumns):
            return self._put_columns(records, expected)
        return self._put_records(records, expected)

    def _put_records(self, records: list[SessionRecord], expected: list[int | None]) -> list[bool]:
        """`put_many` of records: each one packed into its arena's arrays."""
        n = len(records)
        # Everything that can refuse a record, before anything is written ...
        shapes = list(map(shape_of, records))
        arena_of = {shape: self._arena_id(shape) for shape in dict.fromkeys(shapes)}
        model_of = {model: self._model_id(model) for model in dict.fromkeys(map(_MODEL, records))}
        arena_ids = _column(arena_of, shapes, n)
        model_ids = _column(model_of, map(_MODEL, records), n)
        # ... and every record as the arrays its arena is written from: a value out of its
        # field's range or an array that does not convert refuses the whole batch here.
        groups = self._by_arena(arena_ids)
        arrays = {
            arena_id: pack(
                [records[i] for i in at.tolist()], model_ids[at], self._arenas[arena_id].shape
            )
            for arena_id, at in groups
        }
        memories = list(map(_MEMORY, records))
        words = [() if m is None else m.words for m in memories]
        sides = _Sides(
            list(map(_SESSION_ID, records)),
            list(map(_OWNER, records)),
            words,
            list(map(_LAST_STEP, records)),
        )
        return self._put(sides, expected, arena_ids, dict(groups), arrays)

    def _put_columns(self, columns: SessionColumns, expected: list[int | None]) -> list[bool]:
        """`put_many` of `columns.records()`, without a record per session: the columns go
        into the arena's arrays as they are (one arena: every row is state-less, and its
        memory has the batch's capacity). The same compare-and-set, eviction and errors."""
        n = len(columns)
        if not columns.state_on_device:
            raise ValueError("columns are written only for states an engine keeps")
        memories = columns.memory
        keys = weights = np.empty((n, 0))
        words: list[tuple[str, ...]] = [()] * n
        if memories is not None and memories.count(None) < n:
            block = columns_of(memories)
            if block is None:  # not one batch's columns: the record path checks each
                return self._put_records(columns.records(), expected)
            keys, weights = block
            words = [m.words for m in memories]  # type: ignore[union-attr]
        arena_id = self._arena_id((0, 0, 0, int(keys.shape[1])))
        metas = np.zeros(n, dtype=META)
        metas["model"] = self._model_id(columns.model)
        metas["tokens"] = columns.tokens  # a value out of its field's range raises here
        metas["created_at"] = columns.created_at
        metas["last_used_at"] = columns.last_used_at
        metas["last_token"] = columns.last_token
        metas["adapt"] = columns.adapt
        states = np.empty((n, 0, 0, 0), dtype=np.float32)
        sides = _Sides(columns.session_ids, columns.owner, words, columns.last_step)
        return self._put(
            sides,
            expected,
            np.full(n, arena_id, dtype=np.int64),
            {arena_id: np.arange(n)},
            {arena_id: Rows(states, metas, keys, weights)},
        )

    def _put(
        self,
        sides: _Sides,
        expected: list[int | None],
        arena_ids: np.ndarray,
        positions: dict[int, np.ndarray],
        arrays: dict[int, Rows],
    ) -> list[bool]:
        """The compare-and-set of a batch whose records are packed (`arrays`, one `Rows`
        per arena, for the records `positions[arena]`, ascending; `arena_ids`: each
        record's arena) and whose other fields are `sides`."""
        ids = sides.ids
        n = len(ids)
        self._expire()
        handles = self._handles(ids)
        stored = self._stored_versions(handles)
        wanted = _versions(expected)
        distinct = len(set(ids)) == n
        index = self._index
        owned: dict[str, int] = {}  # new sessions per owner (owners tracked with a cap)
        if distinct and wanted is not None:
            fits = stored == wanted  # _NO_VERSION on both sides: a new session
            fit = np.flatnonzero(fits)
            creates = np.flatnonzero(fits & (handles == _ABSENT))
            new = len(creates)
            if self.owner_cap > 0:
                for i in creates.tolist():
                    owner = sides.owners[i]
                    if owner:
                        owned[owner] = owned.get(owner, 0) + 1
            written = fits.tolist()
        else:
            written, new, owned = self._compare_in_order(sides, expected, stored)
            fit = np.flatnonzero(written)
        keep: Container[str] = ()
        if owned or len(index) + new > self.cap:
            keep = {ids[i] for i in fit.tolist()}
        evicted = self._drop(self._quotas.victims(owned, keep=keep))
        evicted += self._drop(index.oldest(len(index) + new - self.cap, keep=keep))
        now = self.clock()
        kept = handles[fit]
        if (
            distinct
            and wanted is not None
            and new == 0
            and ((kept & ARENA_MASK) == arena_ids[fit]).all()
        ):
            # Every record written is its session's stored one, in the same arena: its row
            # stays; the index moves them to its end in one pass.
            self._written_in_place(sides, fit)
            for arena_id, at in self._by_arena(arena_ids[fit]):
                mine = fit[at]  # the records written into this arena
                data = _subset(arrays[arena_id], np.searchsorted(positions[arena_id], mine))
                data.metas["version"] = np.maximum(wanted[mine], 0) + 1
                data.metas["touched"] = now
                self._arenas[arena_id].write_many(kept[at] >> ARENA_BITS, data)
        else:
            self._write_in_order(sides, expected, written, arena_ids, positions, arrays, now)
        evicted += self._drop(index.oldest(len(index) - self.cap))  # a batch over the cap
        evicted += self._drop(self._quotas.victims(dict.fromkeys(owned, 0)))  # ... an owner's
        if evicted:
            self.evictions += evicted
            metrics.SESSION_EVICTIONS.inc(evicted)
        metrics.ACTIVE_SESSIONS.set(len(index))
        return written

    def _stored_versions(self, handles: np.ndarray) -> np.ndarray:
        """The stored version at each handle, (B,) int64 (`_NO_VERSION` where absent), each
        arena's rows read in one gather."""
        out = np.full(len(handles), _NO_VERSION, dtype=np.int64)
        found = np.flatnonzero(handles != _ABSENT)
        for arena_id, at in self._by_arena(handles[found] & ARENA_MASK):
            rows = handles[found[at]] >> ARENA_BITS
            out[found[at]] = self._arenas[arena_id].column(rows, "version")
        return out

    def _compare_in_order(
        self, sides: _Sides, expected: list[int | None], stored: np.ndarray
    ) -> tuple[list[bool], int, dict[str, int]]:
        """The compare-and-set record by record, for a batch that names a session twice (a
        later record compares with the version an earlier one wrote): which records are
        written, how many sessions are new, and how many new sessions each owner gets."""
        versions: dict[str, int] = {}  # the version each session written here ends at
        written = []
        for session_id, version, have in zip(sides.ids, expected, stored.tolist()):
            now = versions.get(session_id, None if have == _NO_VERSION else have)
            fits = now == version  # None == None: a new session
            if fits:
                versions[session_id] = (version or 0) + 1
            written.append(fits)
        index = self._index
        new = sum(session_id not in index for session_id in versions)
        owned: dict[str, int] = {}
        if self.owner_cap > 0:
            for session_id, owner, ok in zip(sides.ids, sides.owners, written):
                if ok and owner and session_id not in index:
                    owned[owner] = owned.get(owner, 0) + 1
        return written, new, owned

    def _written_in_place(self, sides: _Sides, fit: np.ndarray) -> None:
        """Index, side tables and owners for records written over their own rows (`fit`,
        in the batch's order)."""
        at = fit.tolist()
        every = len(at) == len(sides.ids)
        mine = sides.ids if every else [sides.ids[i] for i in at]
        self._index.touch_many(mine)
        # The side tables are empty for most services: no lookup per record then.
        table = self._words
        typed = sides.words if every else [sides.words[i] for i in at]
        if table or any(typed):
            for session_id, words in zip(mine, typed):
                if words:
                    table[session_id] = words
                elif table:
                    table.pop(session_id, None)
        steps = sides.last_steps if every else [sides.last_steps[i] for i in at]
        if all(steps):
            self._last_steps.update(zip(mine, steps))
        elif self._last_steps or any(steps):
            for session_id, step in zip(mine, steps):
                if step:
                    self._last_steps[session_id] = step
                else:
                    self._last_steps.pop(session_id, None)
        if self._quotas.owner_of or self.owner_cap > 0:
            owners = sides.owners if every else [sides.owners[i] for i in at]
            for session_id, owner in zip(mine, owners):
                self._quotas.written(session_id, owner)

    def _write_in_order(
        self,
        sides: _Sides,
        expected: list[int | None],
        written: list[bool],
        arena_ids: np.ndarray,
        positions: dict[int, np.ndarray],
        arrays: dict[int, Rows],
        now: float,
    ) -> None:
        """Place and write the records that `written` says, record by record (new
        sessions, a shape that changed, a session named twice)."""
        # Placed in the batch's order (the LRU order); by row, so that a row freed and taken
        # again in this batch holds the write made last.
        placed: dict[int, dict[int, int]] = {}  # arena -> row -> the record written there
        arena_of = arena_ids.tolist()
        for i, fits in enumerate(written):
            if fits:
                arena_id = arena_of[i]
                placed.setdefault(arena_id, {})[self._place(sides, i, arena_id)] = i
        for arena_id, rows in placed.items():
            mine = np.fromiter(rows.values(), dtype=np.int64, count=len(rows))
            data = _subset(arrays[arena_id], np.searchsorted(positions[arena_id], mine))
            data.metas["version"] = [(expected[i] or 0) + 1 for i in rows.values()]
            data.metas["touched"] = now
            self._arenas[arena_id].write_many(
                np.fromiter(rows, dtype=np.int64, count=len(rows)), data
            )

    def _place(self, sides: _Sides, i: int, arena_id: int) -> int:
        """The row record `i` is written into (its session's own unless its shape changed),
        with the index, LRU order, typed words and owner updated."""
        session_id = sides.ids[i]
        stored = self._index.get(session_id)
        if stored is None:
            row = self._arenas[arena_id].alloc()
        elif stored & ARENA_MASK != arena_id:  # the same session with another record shape
            old, old_row = self._row(stored)
            old.release(old_row)
            row = self._arenas[arena_id].alloc()
        else:
            row = stored >> ARENA_BITS
        # The side tables are empty for most services: no lookup then.
        words, last_step = sides.words[i], sides.last_steps[i]
        if words:
            self._words[session_id] = words
        elif self._words:
            self._words.pop(session_id, None)
        if last_step:
            self._last_steps[session_id] = last_step
        elif self._last_steps:
            self._last_steps.pop(session_id, None)
        self._index.written(session_id, handle_of(arena_id, row))
        self._quotas.written(session_id, sides.owners[i])
        return row

    async def get(self, session_id: str) -> SessionRecord:
        """One live record; raises `UnknownSession`."""
        record = self._read([session_id])[0]
        if record is None:
            raise UnknownSession(f"no session {session_id!r} (never created, deleted or expired)")
        return record

    async def delete(self, session_id: str) -> None:
        """Forget a session and free its row; raises `UnknownSession`."""
        stored = self._live(session_id)
        if stored is None:
            raise UnknownSession(f"no session {session_id!r} (never created, deleted or expired)")
        self._drop([session_id])
        metrics.ACTIVE_SESSIONS.set(len(self._index))

    async def count(self) -> int:
        """Live sessions (expired ones are dropped first)."""
        self._expire()
        metrics.ACTIVE_SESSIONS.set(len(self._index))
        return len(self._index)

    async def ping(self) -> None:
        """Always reachable."""

    async def close(self) -> None:
        """Drop every session and release the arenas."""
        self._index.clear()
        self._arenas.clear()
        self._arena_ids.clear()
        self._models.clear()
        self._model_ids.clear()
        self._quotas.clear()
        self._words.clear()
        self._last_steps.clear()
        metrics.ACTIVE_SESSIONS.set(0)

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
            stored = self._index.get(session_id)
            if stored is None:
                out.append(False)
                continue
            old, row = self._row(stored)
            if old.shape[0] or old.version(row) != version or self._expired(session_id, now):
                out.append(False)
                continue
            _, meta, arrays = old.read(row)
            memory = None if arrays is None else WordMemory(*arrays)
            first = state[0]
            arena_id = self._arena_id(
                (len(state), int(first.shape[0]), int(first.shape[1]), old.shape[3])
            )
            new_row = self._arenas[arena_id].alloc()
            self._arenas[arena_id].write(new_row, state, meta, memory)
            old.release(row)
            self._index.moved(session_id, handle_of(arena_id, new_row))  # keeps its place
            out.append(True)
        return out

    # --- what it costs ------------------------------------------------------------------

    def pool_usage(self) -> list[ArenaUsage]:
        """Each arena's shape, rows in use, rows allocated and bytes allocated."""
        return [arena.usage() for arena in self._arenas]

    def count_beside(self, nbytes: Callable[[], int]) -> None:
        """Count what `nbytes()` says in `memory_bytes` too: the bytes something else holds
        for this store's sessions (the engine's residency entries; not the device rows)."""
        self._beside.append(nbytes)

    def memory_bytes(self) -> int:
        """Bytes this store holds: the arenas (all allocated rows) and an estimate of the
        index (`SessionIndex.nbytes`), and what is counted beside it (`count_beside`)."""
        beside = sum(nbytes() for nbytes in self._beside)
        return sum(arena.nbytes for arena in self._arenas) + self._index.nbytes + beside
