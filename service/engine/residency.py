"""Residency: the one place that decides where a session's state lives with a state pool.

With a `StatePool` every state a batch runs from or into is a pool row. A session is
*resident* when this engine holds the two rows of its latest version (the state after its
last token, and the one before) in a `Residency` entry: session id -> entry, whose rows,
version and created_at are numpy columns, in least recently written order. Its record in
the store then says `state_on_device` (its `state` empty; see `SessionRecord`): the store
keeps its metadata, and the engine its state. A session that is not resident has its state in host arrays in
its record (spilled to host memory, or kept by a store that serializes states): its next
step uploads it into fresh rows.

Who holds a row (`StatePool`'s reference counts; every hold is given back by exactly one
owner):

- an entry: one hold on each of its two rows (a row may be pinned as well: a session
  that has run no token yet starts from the pool's start and zero states);
- a batch in flight (`Holding`): the rows it starts from, the rows it uploads and the
  rows its runs take; all released together when the batch ends, by whatever route it
  ends (answered, cancelled before, during or after its runs, compare-and-set lost, store
  error, run failure, shutdown), after the rows answered were committed to entries;
- a long (chunked) step between its batches: one hold on the row of the state it has run
  up to (`StepRun.carried`), handed to the batch that takes it next, or released when it
  is dropped (its client went away, shutdown);
- the scheduler, for good: the start and zero states (`StatePool.pin`).

The store decides nothing here and is asked for no capability: the wiring
(`EngineCore`) says whether the store is the in-process memory store, and only then is a
`Residency` given it (`keeps`: records are written `state_on_device`, entries are
kept, and a spill gives the store host states with `MemorySessionStore.restore_states`,
which changes neither version, nor TTL, nor LRU place). Any other store (Redis, tiered)
is always given host states: the write downloads the new ones. With a shared store
written through (`cache`: Redis holds every version this engine answered, and a
(session id, version, created_at) names one state cluster-wide, the compare-and-set
letting one writer make each version) the engine keeps the rows of what it wrote as
well, so that the next step of a session at the same version needs no upload; a record
another engine wrote has another version and is uploaded. Not when written behind: a
failed flush can leave Redis at a version this engine also made locally, with another
state.

A record is matched to an entry by (session id, version, created_at): a record whose
version and created_at are the entry's runs from its rows; one with host state and no
match is uploaded; one `state_on_device` and no match is a lost session
(`UnknownSession`, logged once: it must not happen). A session deleted through the
engine has its entry dropped at once (`EngineCore`). Expiring or evicting a session in
the store (or deleting it there directly) does not reach here: its entry is stale, never
matched again (a session re-created under the same id has another created_at; its
versions restart, its entry is replaced by its first write), and its rows are reclaimed
lazily, by `spill`, under pressure (the least recently written first, as any entry).
Until then
`nextword_state_pool_rows{use="used"}` counts them as used: the gauge is honest about
the rows held, not about the sessions alive.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import OrderedDict, deque
from collections.abc import Container, Sequence
from itertools import repeat

import numpy as np

from service import metrics
from service.engine.pool import StatePool
from service.errors import NextwordError, UnknownSession
from service.store import SessionRecord
from service.store.memory import MemorySessionStore

log = logging.getLogger(__name__)

NO_ROW = -1  # `Residency.find`: no entry matches
_INT_BYTES = 32  # an entry's int in the dict (entries past 256 are objects of their own)


class Holding:
    """Rows a batch holds until it ends: `add` takes over holds (rows taken, or held by
    the caller), `hold` adds holds, `close` releases them all, once.

    Rows added after `close` (a run the batch was cut short from, finishing in the engine
    thread) are released at once: a batch that ended holds nothing."""

    __slots__ = ("_closed", "_lock", "_parts", "pool")

    def __init__(self, pool: StatePool) -> None:
        self.pool = pool
        self._parts: list[np.ndarray] = []
        self._closed = False
        self._lock = threading.Lock()

    def add(self, rows: np.ndarray) -> None:
        """Take over one hold on each of `rows` (released by `close`)."""
        with self._lock:
            if not self._closed:
                self._parts.append(rows)
                return
        self.pool.release(rows)

    def hold(self, rows: np.ndarray) -> None:
        """One more hold on each of `rows` (already held by someone), released by `close`."""
        self.pool.hold(rows)
        self.add(rows)

    def close(self) -> None:
        """Release every hold taken over (a second call does nothing)."""
        with self._lock:
            parts, self._parts, self._closed = self._parts, [], True
        if parts:
            self.pool.release(np.concatenate(parts) if len(parts) > 1 else parts[0])


class Residency:
    """Which sessions of one model hold pool rows, and moving states in and out of them."""

    def __init__(
        self, pool: StatePool, store: MemorySessionStore | None = None, cache: bool = False
    ) -> None:
        self.pool = pool
        # With the in-process store: records are written `state_on_device`, entries kept.
        self.store = store
        self.on_device = store is not None
        # With `cache` (a shared store written through): records carry host states, and
        # the entries are kept beside them, so that the next step needs no upload.
        self.keeps = self.on_device or cache
        self._entries: OrderedDict[str, int] = OrderedDict()  # id -> entry, LRU first
        self._rows = np.zeros((0, 2), dtype=np.int64)  # per entry: current, previous
        self._version = np.zeros(0, dtype=np.int64)
        self._created = np.zeros(0, dtype=np.float64)
        self._spare: list[int] = []  # entries free for reuse
        self._key_bytes = 0  # the entries' id strings, as `nbytes` counts them
        self.lost = 0  # records found with their state nowhere (should stay 0)
        self._lost = metrics.LOST_SESSIONS.labels(pool.model.name)
        if store is not None:
            store.count_beside(lambda: self.nbytes)

    @property
    def nbytes(self) -> int:
        """An estimate of the bytes the entries hold in host memory (the device rows aside):
        the ordered dict with its nodes, the id strings, an int per entry and the columns."""
        columns = self._rows.nbytes + self._version.nbytes + self._created.nbytes
        entries = sys.getsizeof(self._entries) + self._key_bytes + _INT_BYTES * len(self._entries)
        return entries + columns + sys.getsizeof(self._spare)

    def __len__(self) -> int:
        """Resident sessions (entries, stale ones included until reclaimed)."""
        return len(self._entries)

    def _grow(self) -> None:
        size = max(64, 2 * len(self._version))
        old = len(self._version)
        self._rows = np.concatenate([self._rows, np.full((size - old, 2), NO_ROW, np.int64)])
        self._version = np.concatenate([self._version, np.zeros(size - old, np.int64)])
        self._created = np.concatenate([self._created, np.zeros(size - old, np.float64)])
        self._spare.extend(range(size - 1, old - 1, -1))

    def find(self, records: Sequence[SessionRecord]) -> np.ndarray:
        """(n, 2) int64: the rows (current, previous) of the entry each record's version and
        created_at match, NO_ROW where none does."""
        n = len(records)
        return self.find_many(
            [record.session_id for record in records],
            np.fromiter((record.version for record in records), np.int64, n),
            np.fromiter((record.created_at for record in records), np.float64, n),
        )

    def find_many(self, ids: list[str], versions: np.ndarray, created: np.ndarray) -> np.ndarray:
        """`find` of records given as columns: session ids, versions and created_at."""
        out = np.full((len(ids), 2), NO_ROW, dtype=np.int64)
        if not self._entries:
            return out
        get = self._entries.get
        entries = np.fromiter(map(get, ids, repeat(-1)), np.int64, len(ids))
        at = np.flatnonzero(entries >= 0)
        if len(at):
            index = entries[at]
            match = (self._version[index] == versions[at]) & (self._created[index] == created[at])
            out[at[match]] = self._rows[index[match]]
        return out

    def lost_session(self, record: SessionRecord) -> NextwordError:
        """The error for a record whose state is on this engine's device but in no entry
        (logged the first time)."""
        self.lost += 1
        self._lost.inc()
        if self.lost == 1:
            log.error(
                "model %s: session %r has its state nowhere (version %d): answered as unknown",
                self.pool.model.name,
                record.session_id,
                record.version,
            )
        return UnknownSession(
            f"no session {record.session_id!r} (never created, deleted or expired)"
        )

    def commit(
        self,
        ids: Sequence[str],
        versions: Sequence[int] | np.ndarray,
        created: Sequence[float] | np.ndarray,
        rows: np.ndarray,
    ) -> None:
        """Sessions written at `versions` with their states in `rows` ((n, 2): current,
        previous; held by the caller): each entry holds its rows from now, and the rows of
        the version it replaces are released. Each one becomes the most recently written."""
        if not self.keeps or not len(ids):
            return
        entries = self._entries
        known = list(map(entries.get, ids))
        if None not in known:
            # The common case, every session resident already: its entry becomes the most
            # recently written, in order (C-level passes, not a Python loop per session).
            deque(map(entries.move_to_end, ids), maxlen=0)
            index = np.array(known, dtype=np.int64)
            replaced = np.ones(len(ids), dtype=bool)
        else:
            index, replaced = self._enter(ids)
        rows = np.asarray(rows, dtype=np.int64).reshape(len(ids), 2)
        self.pool.hold(rows.ravel())  # before the release: a step may keep its rows
        old = self._rows[index[replaced]].ravel()
        self._rows[index] = rows
        self._version[index] = versions
        self._created[index] = created
        self.pool.release(old)

    def _enter(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """`commit`'s entries of `ids` (new ones made), each moved to the most recent end;
        returns their indices and whether each replaced an entry there already."""
        entries = self._entries
        index = np.empty(len(ids), dtype=np.int64)
        replaced = np.zeros(len(ids), dtype=bool)
        for i, session_id in enumerate(ids):
            entry = entries.get(session_id)
            if entry is None:
                if not self._spare:
                    self._grow()
                entry = entries[session_id] = self._spare.pop()
                self._key_bytes += sys.getsizeof(session_id)
            else:
                entries.move_to_end(session_id)
                replaced[i] = True
            index[i] = entry
        return index, replaced

    def drop(self, ids: Sequence[str]) -> None:
        """Forget the entries of `ids` (those there are) and release their rows."""
        gone = [s for s in ids if s in self._entries]
        index = [self._entries.pop(s) for s in gone]
        self._key_bytes -= sum(sys.getsizeof(s) for s in gone)
        if index:
            at = np.array(index, dtype=np.int64)
            rows = self._rows[at].ravel()
            self._rows[at] = NO_ROW
            self._spare.extend(index)
            self.pool.release(rows)

    def close(self) -> None:
        """Release every entry's rows (shutdown: the states are not kept)."""
        self.drop(list(self._entries))

    def holders(self) -> np.ndarray:
        """Every entry's rows, one per hold (for `StatePool.check_counts`)."""
        if not self._entries:
            return np.empty(0, dtype=np.int64)
        index = np.fromiter(self._entries.values(), np.int64, len(self._entries))
        return self._rows[index].ravel()

    def entry(self, session_id: str) -> tuple[int, int, float] | None:
        """(version, rows' first row, created_at) of a session's entry, if any (for tests)."""
        entry = self._entries.get(session_id)
        if entry is None:
            return None
        return int(self._version[entry]), int(self._rows[entry, 0]), float(self._created[entry])

    def spill(self, want: int, keep: Container[str | None] = ()) -> int:
        """Free about `want` rows (as many as it can): the least recently written entries
        not in `keep` (the sessions in flight) whose rows are not all pinned. Their states
        are downloaded (one copy for all) and given to the in-process store as host states
        (`MemorySessionStore.restore_states`: version, TTL and LRU place unchanged); an
        entry whose session the store no longer keeps at that version (deleted, expired,
        evicted) is stale and simply released. A cache's entries are released (the shared
        store has their host states). Returns the rows freed."""
        if not self.keeps:
            return 0
        before = self.pool.free
        victims: list[str] = []
        at: list[int] = []
        freeing = 0
        pinned = self.pool.pinned
        for session_id, entry in self._entries.items():
            if freeing >= want:
                break
            if session_id in keep:
                continue
            rows = self._rows[entry]
            gained = len({int(r) for r, p in zip(rows, pinned(rows)) if not p})
            if gained:  # an empty session holds the pinned start rows only
                victims.append(session_id)
                at.append(entry)
                freeing += gained
        if not victims:
            return 0
        if self.store is not None:
            index = np.array(at, dtype=np.int64)
            states = self.pool.download(self._rows[index].ravel())
            self.store.restore_states(
                victims,
                self._version[index].tolist(),
                [(*states[2 * i], *states[2 * i + 1]) for i in range(len(victims))],
            )
        self.drop(victims)  # restored, or stale: no record will match them again
        return max(0, self.pool.free - before)
