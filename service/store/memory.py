"""The in-process session store: idle TTL and an LRU cap (the default store)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service import metrics
from service.errors import UnknownSession
from service.store.base import SessionRecord, State, new_session_id


@dataclass(slots=True)
class _Slot:
    """A stored session: the state packed into one read-only (S, L, H) array."""

    model: str
    state: np.ndarray
    tokens: int
    created_at: float
    last_used_at: float
    version: int
    last_token: int
    touched: float  # store clock at the last write; drives the TTL


def _pack(state: State) -> np.ndarray:
    # One new contiguous array: never a view that would keep a whole batch's output alive.
    packed = np.stack(state).astype(np.float32, copy=False)
    packed.flags.writeable = False
    return packed


@dataclass
class MemorySessionStore:
    """Sessions in this process: idle TTL and an LRU cap.

    The ordered dict is kept in write order, which is both LRU order and TTL order
    (every write stamps `touched`), so expiry and eviction pop from its front.
    Reading a session (`get`, `get_many`) does not count as using it: a step writes.
    """

    ttl_s: float = 1800.0
    cap: int = 100_000
    clock: Callable[[], float] = time.monotonic
    evictions: int = 0
    expirations: int = 0
    _slots: OrderedDict[str, _Slot] = field(default_factory=OrderedDict, repr=False)

    def new_id(self) -> str:
        """A fresh unguessable id."""
        return new_session_id()

    def _expire(self) -> None:
        horizon = self.clock() - self.ttl_s
        dropped = 0
        while self._slots:
            slot = next(iter(self._slots.values()))
            if slot.touched > horizon:
                break
            self._slots.popitem(last=False)
            dropped += 1
        if dropped:
            self.expirations += dropped
            metrics.SESSION_EXPIRATIONS.inc(dropped)

    def _live(self, session_id: str) -> _Slot | None:
        slot = self._slots.get(session_id)
        if slot is not None and slot.touched <= self.clock() - self.ttl_s:
            self._expire()
            return None
        return slot

    @staticmethod
    def _record(session_id: str, slot: _Slot) -> SessionRecord:
        return SessionRecord(
            session_id=session_id,
            model=slot.model,
            state=tuple(slot.state),
            tokens=slot.tokens,
            created_at=slot.created_at,
            last_used_at=slot.last_used_at,
            version=slot.version,
            last_token=slot.last_token,
        )

    async def get_many(self, ids: list[str]) -> list[SessionRecord | None]:
        """The live records of `ids` (None where unknown or expired)."""
        out: list[SessionRecord | None] = []
        for session_id in ids:
            slot = self._live(session_id)
            out.append(None if slot is None else self._record(session_id, slot))
        return out

    async def put_many(
        self, records: list[SessionRecord], expected: list[int | None]
    ) -> list[bool]:
        """Compare-and-set each record on its version; evict past the cap."""
        if len(records) != len(expected):
            raise ValueError("one expected version per record")
        self._expire()
        now = self.clock()
        written = []
        for record, version in zip(records, expected):
            slot = self._slots.get(record.session_id)
            if (slot is None) != (version is None) or (slot and slot.version != version):
                written.append(False)
                continue
            self._slots[record.session_id] = _Slot(
                model=record.model,
                state=_pack(record.state),
                tokens=record.tokens,
                created_at=record.created_at,
                last_used_at=record.last_used_at,
                version=(version or 0) + 1,
                last_token=record.last_token,
                touched=now,
            )
            self._slots.move_to_end(record.session_id)
            written.append(True)
        evicted = 0
        while len(self._slots) > self.cap:
            self._slots.popitem(last=False)
            evicted += 1
        if evicted:
            self.evictions += evicted
            metrics.SESSION_EVICTIONS.inc(evicted)
        metrics.ACTIVE_SESSIONS.set(len(self._slots))
        return written

    async def get(self, session_id: str) -> SessionRecord:
        """One live record; raises `UnknownSession`."""
        slot = self._live(session_id)
        if slot is None:
            raise UnknownSession(f"no session {session_id!r} (never created, deleted or expired)")
        return self._record(session_id, slot)

    async def delete(self, session_id: str) -> None:
        """Forget a session; raises `UnknownSession`."""
        if self._live(session_id) is None:
            raise UnknownSession(f"no session {session_id!r} (never created, deleted or expired)")
        del self._slots[session_id]
        metrics.ACTIVE_SESSIONS.set(len(self._slots))

    async def count(self) -> int:
        """Live sessions (expired ones are dropped first)."""
        self._expire()
        metrics.ACTIVE_SESSIONS.set(len(self._slots))
        return len(self._slots)

    async def ping(self) -> None:
        """Always reachable."""

    async def close(self) -> None:
        """Drop every session."""
        self._slots.clear()
        metrics.ACTIVE_SESSIONS.set(0)
