"""`Inbox`: a bounded FIFO of one producer and one consumer; `ReceiveQueue`: a WebSocket's.

A WebSocket's received messages wait in a `ReceiveQueue`, which the protocol fills (our
uvicorn protocol, `service.api.connections`, or a read-ahead task on other servers) and
the stream's answering task empties, and which tells the answering task at once when the
client leaves (`on_disconnect`), so that it can abort the step it waits for.

Not `asyncio.Queue`: its `get` on an empty queue (every message, on a stream that keeps up)
looks up the running loop, which on Python 3.11 costs a `getpid()` system call, and its
general waiter lists are more than one reader and one answerer need. This is a deque and
at most one waiting future on each side, created on the loop given once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, MutableMapping
from typing import Any, Generic, Protocol, TypeVar

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


# Messages a WebSocket reads ahead of the one being answered; past this its protocol stops
# reading, and TCP flow control slows the client down.
READ_AHEAD = 32
LEFT = "websocket.disconnect"
RECEIVED_AT = "nextword.received_at"  # a received message's key: `perf_counter()` on arrival
# The scope extensions under which our uvicorn protocol offers itself as the `Receiver`
# and as the `Sender`.
DIRECT_RECEIVE = "nextword.receiver"
DIRECT_SEND = "nextword.sender"


Message = MutableMapping[str, Any]  # an ASGI message (starlette's `Message`)


class ReceiveQueue(Inbox[Message]):
    """A WebSocket's received ASGI messages, taken by the app's answering task directly.

    `on_disconnect`, when set, is called (once, then cleared) as soon as a
    `websocket.disconnect` is queued, even behind messages not yet taken: the answering
    task learns that its client left while it waits for the engine, not only when it next
    reads; `left` says a disconnect has been queued (for a callback set afterwards). A
    received message carries `RECEIVED_AT`, the `time.perf_counter()` it arrived at (time
    spent queued counts in the stream's latency; not the loop's clock: uvloop's counts
    whole milliseconds); `last_received` is the loop time of the latest."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int = READ_AHEAD) -> None:
        super().__init__(loop, size)
        self.on_disconnect: Callable[[], object] | None = None
        self.left = False
        self.last_received = loop.time()

    def put_nowait(self, item: Message) -> None:
        """Queue `item` (past the bound too); a disconnect also calls `on_disconnect`."""
        super().put_nowait(item)
        if item["type"] == LEFT:
            self.left = True
            callback, self.on_disconnect = self.on_disconnect, None
            if callback is not None:
                callback()


class Receiver(Protocol):
    """Where a stream takes its messages: `receive()` pops `queue` (the server's own queue,
    or one a read-ahead task fills) and keeps the server reading while there is room."""

    queue: ReceiveQueue

    async def receive(self) -> Message:
        """The next message: a `websocket.receive`, a `websocket.disconnect`, or one the app
        queued itself."""
        ...


class Sender(Protocol):
    """Where a stream sends its answers when the server offers it (our uvicorn protocol):
    encoded text, framed by the protocol itself, without an ASGI message on the way."""

    async def send_text(self, data: bytes) -> None:
        """Send `data` (UTF-8) as one text message; an `OSError` once the connection is
        no longer open."""
        ...
