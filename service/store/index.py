"""The session index: session id -> handle (arena and row), in least recently written order.

A handle is one int, `row << ARENA_BITS | arena` (256 arenas per store), so the only
per-session Python objects of the memory store are the id string and that int, in one
ordered dict. The dict is kept in write order (every write moves a session to its end),
which is both the LRU order and the TTL order (every write stamps the row's `touched`):
expiry and eviction take from its front. Reading a session does not move it: a step
writes.

What an entry costs (`python -m benchmarks.bench_memory --via store`, 1,000,000 GRU and
200,000 LSTM sessions, before the memory columns existed): about 250-330 B per session over
the state, of which the id (80 B), the dict's entry with its handle (~110 B, more just after
the dict's table doubles) and the metadata record in the arena (51 B). The store before the
arenas kept a numpy array and a Python object per session: 610-680 B over the state.
"""

from __future__ import annotations

import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Container, Iterator

ARENA_BITS = 8  # a handle is row << ARENA_BITS | arena
ARENA_MASK = (1 << ARENA_BITS) - 1
_HANDLE_BYTES = 32  # an int object up to 2**60 (rows < 2**52)


def handle_of(arena: int, row: int) -> int:
    """The handle of a row of an arena."""
    return row << ARENA_BITS | arena


def split(handle: int) -> tuple[int, int]:
    """(arena, row) of a handle."""
    return handle & ARENA_MASK, handle >> ARENA_BITS


def _block(nbytes: int) -> int:
    return (nbytes + 15) & ~15  # pymalloc hands out 16-byte aligned blocks


class SessionIndex:
    """Session id -> handle, in least recently written order (the front is the oldest)."""

    def __init__(self) -> None:
        self.handles: OrderedDict[str, int] = OrderedDict()
        self._key_bytes = 0  # the ids' str objects, as `nbytes` counts them

    def __len__(self) -> int:
        return len(self.handles)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self.handles

    def __iter__(self) -> Iterator[str]:
        return iter(self.handles)

    def get(self, session_id: str) -> int | None:
        """A session's handle (None: not indexed)."""
        return self.handles.get(session_id)

    def written(self, session_id: str, handle: int) -> None:
        """Set a session's handle and make it the most recently written."""
        handles = self.handles
        if session_id not in handles:
            self._key_bytes += _block(sys.getsizeof(session_id))
        handles[session_id] = handle
        handles.move_to_end(session_id)

    def touch_many(self, session_ids: list[str]) -> None:
        """Make indexed sessions the most recently written, in this order (their handles
        unchanged; KeyError for one not indexed)."""
        deque(map(self.handles.move_to_end, session_ids), maxlen=0)  # the loop in C

    def moved(self, session_id: str, handle: int) -> None:
        """Give an indexed session another handle, keeping its place in the order."""
        self.handles[session_id] = handle

    def pop(self, session_id: str) -> int:
        """Remove a session; its handle (KeyError: not indexed)."""
        handle = self.handles.pop(session_id)
        self._key_bytes -= _block(sys.getsizeof(session_id))
        return handle

    def pop_expired(self, expired: Callable[[int], bool]) -> list[tuple[str, int]]:
        """Remove sessions from the front while `expired(handle)`: (id, handle) each.

        Valid because write order is TTL order: the first session not expired ends it."""
        out = []
        handles = self.handles
        while handles:
            session_id, handle = next(iter(handles.items()))
            if not expired(handle):
                break
            handles.popitem(last=False)
            self._key_bytes -= _block(sys.getsizeof(session_id))
            out.append((session_id, handle))
        return out

    def oldest(self, n: int, keep: Container[str] = ()) -> list[str]:
        """Up to `n` least recently written sessions not in `keep`, oldest first (the
        eviction choice; nothing is removed)."""
        victims: list[str] = []
        if n > 0:
            for session_id in self.handles:
                if session_id not in keep:
                    victims.append(session_id)
                    if len(victims) == n:
                        break
        return victims

    def clear(self) -> None:
        """Forget every session."""
        self.handles.clear()
        self._key_bytes = 0

    @property
    def nbytes(self) -> int:
        """An estimate of the bytes the index holds: the ordered dict with its nodes
        (`sys.getsizeof` counts both), the id strings and one int handle per session."""
        return sys.getsizeof(self.handles) + self._key_bytes + _HANDLE_BYTES * len(self.handles)
