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
the arena's (see theirs). `memory_bytes` counts every allocated row and estimates the index.

`get`/`get_many` return copies (read-only arrays): a batch may hold its records while
another batch writes the same rows. `put_many` writes rows in place.

A record written with `state_on_device` (the engine keeps that version's state on its
device: `SessionRecord`, `service.engine.residency`) takes a row of the state-less shape
(0, 0, 0, C): its metadata and memory only. When the engine spills it, `restore_states`
moves it to a row of its host shape, its version, TTL and place unchanged. The store
never sees a device row: it imports nothing from the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable

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
from service.store.base import SessionRecord, State, WordMemory, new_session_id
from service.store.index import ARENA_BITS, ARENA_MASK, SessionIndex, handle_of, split
from service.store.quotas import OwnerQuotas


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

    def _stored_rows(self, ids: list[str]) -> dict[int, list[tuple[int, int]]]:
        """The stored sessions among `ids`, by arena: (position in `ids`, row) each."""
        by_arena: dict[int, list[tuple[int, int]]] = {}
        handles = self._index.handles
        for i, session_id in enumerate(ids):
            h = handles.get(session_id)
            if h is not None:
                by_arena.setdefault(h & ARENA_MASK, []).append((i, h >> ARENA_BITS))
        return by_arena

    def _read(self, ids: list[str]) -> list[SessionRecord | None]:
        """The live records of `ids` (None where unknown or expired), each arena's rows read
        in one gather; an expired session found drops every expired one."""
        out: list[SessionRecord | None] = [None] * len(ids)
        horizon = self.clock() - self.ttl_s
        expired = False
        models, owner_of, words_of = self._models, self._quotas.owner_of, self._words
        last_steps = self._last_steps
        for arena_id, found in self._stored_rows(ids).items():
            arena = self._arenas[arena_id]
            data = arena.read_many(np.array([row for _, row in found], dtype=np.int64))
            # Per row only what must be per row: the record (fields given by position).
            keys = list(data.keys) if arena.shape[3] else None
            weights = list(data.weights) if arena.shape[3] else None
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
                if arena.shape[0]:
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
                    not arena.shape[0],
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
        their rows take the batch's new sessions and the arenas hold at most `cap` rows.
        """
        if len(records) != len(expected):
            raise ValueError("one expected version per record")
        # Everything that can refuse a record, before anything is written.
        places = [(self._arena_id(shape_of(r)), self._model_id(r.model)) for r in records]
        # ... and every record as the arrays its arena is written from: a value out of its
        # field's range or an array that does not convert refuses the whole batch here.
        by_arena: dict[int, list[int]] = {}  # arena -> the records of its shape
        for i, (arena_id, _) in enumerate(places):
            by_arena.setdefault(arena_id, []).append(i)
        arrays = {
            arena_id: pack(
                [records[i] for i in at], [places[i][1] for i in at], self._arenas[arena_id].shape
            )
            for arena_id, at in by_arena.items()
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
        index = self._index
        new = sum(session_id not in index for session_id in versions)
        owned: dict[str, int] = {}  # new sessions per owner (owners tracked with a cap)
        if self.owner_cap > 0:
            for record, ok in zip(records, written):
                if ok and record.owner and record.session_id not in index:
                    owned[record.owner] = owned.get(record.owner, 0) + 1
        evicted = self._drop(self._quotas.victims(owned, keep=versions))
        evicted += self._drop(index.oldest(len(index) + new - self.cap, keep=versions))
        # Placed in the batch's order (the LRU order); by row, so that a row freed and taken
        # again in this batch holds the write made last.
        placed: dict[int, dict[int, int]] = {}  # arena -> row -> the record written there
        for i, (record, fits) in enumerate(zip(records, written)):
            if fits:
                arena_id = places[i][0]
                placed.setdefault(arena_id, {})[self._place(record, arena_id)] = i
        now = self.clock()
        for arena_id, rows in placed.items():
            where = {i: j for j, i in enumerate(by_arena[arena_id])}  # record -> its array row
            at = np.fromiter((where[i] for i in rows.values()), dtype=np.int64, count=len(rows))
            data = arrays[arena_id]
            if len(at) < len(data.metas) or (at != np.arange(len(at))).any():
                data = Rows(data.states[at], data.metas[at], data.keys[at], data.weights[at])
            data.metas["version"] = [(expected[i] or 0) + 1 for i in rows.values()]
            data.metas["touched"] = now
            self._arenas[arena_id].write_many(
                np.fromiter(rows, dtype=np.int64, count=len(rows)), data
            )
        evicted += self._drop(index.oldest(len(index) - self.cap))  # a batch over the cap
        evicted += self._drop(self._quotas.victims(dict.fromkeys(owned, 0)))  # ... an owner's
        if evicted:
            self.evictions += evicted
            metrics.SESSION_EVICTIONS.inc(evicted)
        metrics.ACTIVE_SESSIONS.set(len(index))
        return written

    def _versions(self, records: list[SessionRecord]) -> list[int | None]:
        """The stored version of each record's session (None: not stored), each arena's
        rows read in one gather."""
        out: list[int | None] = [None] * len(records)
        for arena_id, found in self._stored_rows([r.session_id for r in records]).items():
            rows = np.array([row for _, row in found], dtype=np.int64)
            versions = self._arenas[arena_id].column(rows, "version").tolist()
            for (i, _), version in zip(found, versions):
                out[i] = version
        return out

    def _place(self, record: SessionRecord, arena_id: int) -> int:
        """The row a record is written into (its session's own unless its shape changed),
        with the index, LRU order, typed words and owner updated."""
        session_id = record.session_id
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
        if record.memory is not None and record.memory.words:
            self._words[session_id] = record.memory.words
        elif self._words:
            self._words.pop(session_id, None)
        if record.last_step:
            self._last_steps[session_id] = record.last_step
        elif self._last_steps:
            self._last_steps.pop(session_id, None)
        self._index.written(session_id, handle_of(arena_id, row))
        self._quotas.written(session_id, record.owner)
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

    def memory_bytes(self) -> int:
        """Bytes this store holds: the arenas (all allocated rows) and an estimate of the
        index (`SessionIndex.nbytes`)."""
        return sum(arena.nbytes for arena in self._arenas) + self._index.nbytes
