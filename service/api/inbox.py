"""`Inbox`: the frames a stream has read ahead of the one it answers; one reader, one answerer.

Not `asyncio.Queue`: its `get` on an empty queue (every message, on a stream that keeps up)
looks up the running loop, which on Python 3.11 costs a `getpid()` system call, and its
general waiter lists are more than one reader and one answerer need. This is a deque and
at most one waiting future on each side, created on the loop given once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Inbox(Generic[T]):
    """A bounded FIFO between one producer task and one consumer task of `loop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self._loop = loop
        self._size = size
        self._items: deque[T] = deque()
        self._getter: asyncio.Future[None] | None = None  # the consumer, waiting for an item
        self._putter: asyncio.Future[None] | None = None  # the producer, waiting for room

    def __len__(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        """Whether nothing is waiting to be taken."""
        return not self._items

    def full(self) -> bool:
        """Whether `put` would wait."""
        return len(self._items) >= self._size

    def put_nowait(self, item: T) -> None:
        """Add `item` even when full (the bound is for `put`: a reader's flow control)."""
        self._items.append(item)
        getter = self._getter
        if getter is not None:
            self._getter = None
            if not getter.done():
                getter.set_result(None)

    async def put(self, item: T) -> None:
        """Add `item`, first waiting while the inbox is full."""
        while len(self._items) >= self._size:
            self._putter = self._loop.create_future()
            await self._putter
        self.put_nowait(item)

    async def get(self) -> T:
        """The oldest item, waiting for one if there is none."""
        while not self._items:
            self._getter = self._loop.create_future()
            await self._getter
        item = self._items.popleft()
        putter = self._putter
        if putter is not None:
            self._putter = None
            if not putter.done():
                putter.set_result(None)
        return item
