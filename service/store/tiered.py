"""The engine's own copy of its sessions in front of a shared store (Redis).

The shared store is what lets another machine, or a restarted engine, continue a session;
the engine's copy is what makes a step cheap. Where a session's state lives is decided
here, once: in this engine's memory while it steps the session, in Redis for everyone.

Reads. `get_many` answers from the local copy and asks Redis only for the sessions it does
not hold (one MGET for the misses). A local copy may be stale: another engine stepped the
session meanwhile. That is caught by the compare-and-set of the write, which fails on the
stale version; the failed session's local copy is dropped, and the scheduler's retry reads
it from Redis. So caching never lets two engines both apply a step.

Writes, `write`:

- "through" (the default): `put_many` writes the batch to Redis (one MULTI/EXEC
  compare-and-set) before the steps are answered; the local copy follows Redis. Nothing
  answered is lost when the engine dies: another continues from the last answered step.
- "behind": `put_many` writes the local copy and answers at once; a background task
  flushes the sessions written since the last flush to Redis every `flush_interval_s`
  (one transaction per flush, the latest state of each session). Steps answered since the
  last flush are lost if the engine dies, and if another engine stepped the same session
  meanwhile the flush loses the compare-and-set: Redis keeps the other engine's state and
  this engine's steps are dropped (counted in `nextword_store_conflicts`). For one engine
  per session (sticky routing) where losing the last moments of typing is acceptable.

  The window is a bound, not a hope: once the oldest step not yet flushed is older than
  `behind_window_s` (Redis down, hung or slower than the steps), `put_many` refuses new
  writes with `StoreUnavailable` (retryable: nothing was applied) until a flush catches
  up. So a crash loses at most the steps acknowledged in the last `behind_window_s` plus
  one flush's round trip, however long Redis has been away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from service import metrics
from service.errors import NextwordError, PartlyWritten, StoreUnavailable, UnknownSession
from service.store.base import SessionRecord, SessionStore, WordMemory

log = logging.getLogger(__name__)

WriteMode = Literal["through", "behind"]


def _own(record: SessionRecord, version: int) -> SessionRecord:
    """The record at `version` with its state in arrays of its own (never a view that
    would keep a whole batch's output alive)."""
    memory = record.memory
    if memory is not None:
        # Arrays of its own, and so no longer the rows of a batch's columns.
        memory = WordMemory(np.array(memory.keys), np.array(memory.weights), memory.words)
    return replace(
        record, version=version, state=tuple(np.array(a) for a in record.state), memory=memory
    )


@dataclass
class _Local:
    """The engine's copy of a session: the record and what Redis holds of it."""

    record: SessionRecord  # `version` is the local version
    shared_version: int | None  # the version in Redis (None: not written there yet)
    dirty: bool = False  # written locally since the last flush (behind)
    touched: float = 0.0


@dataclass(eq=False)
class TieredSessionStore:
    """A bounded local copy of the sessions this engine steps, over a shared store."""

    shared: SessionStore
    write: WriteMode = "through"
    cap: int = 100_000
    ttl_s: float = 1800.0
    flush_interval_s: float = 0.05
    behind_window_s: float = 1.0
    clock: Callable[[], float] = time.monotonic
    _local: OrderedDict[str, _Local] = field(default_factory=OrderedDict, repr=False)
    _flusher: asyncio.Task[None] | None = field(default=None, repr=False)
    # One flush at a time: two would send the same versions and one would lose the CAS.
    _flushing: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    # Sessions written behind and not flushed, by the time of their first such write
    # (oldest first): the age of the window.
    _unflushed: OrderedDict[str, float] = field(default_factory=OrderedDict, repr=False)

    @property
    def evictions(self) -> int:
        return self.shared.evictions

    @property
    def expirations(self) -> int:
        return self.shared.expirations

    def new_id(self) -> str:
        return self.shared.new_id()

    def _fresh(self, session_id: str) -> _Local | None:
        local = self._local.get(session_id)
        if local is not None and local.touched <= self.clock() - self.ttl_s:
            del self._local[session_id]  # Redis expires it on the same TTL
            return None
        return local

    def _keep(self, session_id: str, local: _Local) -> None:
        local.touched = self.clock()
        self._local[session_id] = local
        self._local.move_to_end(session_id)
        while len(self._local) > self.cap:
            oldest_id, oldest = next(iter(self._local.items()))
            if oldest.dirty:
                break  # written behind and not flushed yet: kept until the flush
            del self._local[oldest_id]

    async def get_many(self, ids: list[str]) -> list[SessionRecord | None]:
        """Local copies where held; the others from the shared store in one round trip."""
        found: dict[str, SessionRecord | None] = {}
        misses = []
        for session_id in ids:
            local = self._fresh(session_id)
            if local is None:
                misses.append(session_id)
            else:
                found[session_id] = local.record
        if misses:
            for session_id, record in zip(misses, await self.shared.get_many(misses)):
                found[session_id] = record
                if record is not None:
                    self._keep(session_id, _Local(record, record.version))
        return [found[session_id] for session_id in ids]

    async def put_many(
        self, records: list[SessionRecord], expected: list[int | None]
    ) -> list[bool]:
        """Compare-and-set on the versions read; through Redis or behind it (`write`)."""
        if len(records) != len(expected):
            raise ValueError("one expected version per record")
        if any(r.state_on_device for r in records):
            raise ValueError("a shared store keeps host states only (state_on_device)")
        if self.write == "behind":
            return self._put_behind(records, expected)
        shared_expected = []
        for record, version in zip(records, expected):
            local = self._local.get(record.session_id)
            # The version read was the shared one unless this copy is ahead of Redis.
            shared_expected.append(version if local is None else local.shared_version)
        try:
            written = await self.shared.put_many(records, shared_expected)
        except PartlyWritten as exc:  # the known part is kept as written, then re-raised
            self._follow(records, shared_expected, [bool(w) for w in exc.written])
            raise
        self._follow(records, shared_expected, written)
        return written

    def _follow(
        self, records: list[SessionRecord], versions: list[int | None], written: list[bool]
    ) -> None:
        """The local copies after a write through: the new record where written."""
        for record, version, ok in zip(records, versions, written):
            if ok:
                new_version = (version or 0) + 1
                self._keep(record.session_id, _Local(_own(record, new_version), new_version))
            else:
                self._local.pop(record.session_id, None)  # stale: the retry reads Redis

    def unflushed_age(self) -> float:
        """Seconds since the oldest step not yet flushed to Redis was written (0.0: none)."""
        while self._unflushed:
            session_id, since = next(iter(self._unflushed.items()))
            local = self._local.get(session_id)
            if local is None or not local.dirty:  # dropped (expired, a conflict) meanwhile
                del self._unflushed[session_id]
                continue
            return max(0.0, self.clock() - since)
        return 0.0

    def _put_behind(self, records: list[SessionRecord], expected: list[int | None]) -> list[bool]:
        self._start_flusher()
        age = self.unflushed_age()
        if age > self.behind_window_s:
            raise StoreUnavailable(
                f"the session store is {age:.1f} s behind (its limit is "
                f"{self.behind_window_s:g} s): steps are refused until it catches up; retry"
            )
        now = self.clock()
        written = []
        for record, version in zip(records, expected):
            local = self._fresh(record.session_id)
            current = None if local is None else local.record.version
            if (version is None) != (local is None) or (local is not None and current != version):
                written.append(False)
                self._local.pop(record.session_id, None)
                continue
            shared_version = None if local is None else local.shared_version
            self._keep(
                record.session_id,
                _Local(_own(record, (version or 0) + 1), shared_version, dirty=True),
            )
            self._unflushed.setdefault(record.session_id, now)
            written.append(True)
        return written

    def _start_flusher(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_forever(), name="session-flush"
            )

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            with contextlib.suppress(NextwordError):  # Redis down: kept dirty, retried
                await self.flush()

    async def flush(self) -> None:
        """Write every session written behind since the last flush to the shared store."""
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        dirty = [(sid, local) for sid, local in self._local.items() if local.dirty]
        if not dirty:
            return
        records = [local.record for _, local in dirty]
        try:
            written: list[bool | None] = list(
                await self.shared.put_many(records, [local.shared_version for _, local in dirty])
            )
        except PartlyWritten as exc:
            written = exc.written  # None: not known to be written, still dirty
        conflicts = 0
        for (session_id, local), ok in zip(dirty, written):
            current = self._local.get(session_id)
            if current is not local:  # written again during the flush: flushed next time,
                if ok and current is not None:  # on the version this flush wrote
                    current.shared_version = (local.shared_version or 0) + 1
                continue
            if ok is None:
                continue  # not known to be written: still dirty, flushed next time
            if ok:
                local.dirty = False
                local.shared_version = (local.shared_version or 0) + 1
            else:
                conflicts += 1
                del self._local[session_id]
            self._unflushed.pop(session_id, None)
        if conflicts:
            metrics.STORE_CONFLICTS.inc(conflicts)
            log.warning(
                "%d sessions written behind were stepped by another engine meanwhile: "
                "their steps here are dropped",
                conflicts,
            )

    async def get(self, session_id: str) -> SessionRecord:
        """One session as everyone sees it: from Redis, unless this copy is ahead of it."""
        local = self._fresh(session_id)
        if local is not None and local.dirty:
            return local.record
        return await self.shared.get(session_id)

    async def delete(self, session_id: str) -> None:
        local = self._local.pop(session_id, None)
        self._unflushed.pop(session_id, None)
        try:
            await self.shared.delete(session_id)
        except UnknownSession:
            if local is None or not local.dirty:
                raise  # held nowhere

    async def count(self) -> int:
        return await self.shared.count()

    async def ping(self) -> None:
        await self.shared.ping()

    async def close(self) -> None:
        """Flush what was written behind, then close the shared store."""
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.wait([self._flusher])
            self._flusher = None
        try:
            await self.flush()
        finally:
            self._local.clear()
            self._unflushed.clear()
            await self.shared.close()
