"""service.api.inbox: `Inbox`, a bounded FIFO of one producer and one consumer, and a
WebSocket's `ReceiveQueue`."""

from __future__ import annotations

import asyncio

import pytest

from service.api.inbox import Inbox, ReceiveQueue


def test_items_come_out_in_order_and_a_waiting_get_wakes_on_put() -> None:
    async def run() -> list[int]:
        inbox: Inbox[int] = Inbox(asyncio.get_running_loop(), 4)
        taker = asyncio.ensure_future(inbox.get())
        await asyncio.sleep(0)  # the getter waits on an empty inbox
        inbox.put_nowait(1)
        first = await taker
        for i in (2, 3, 4):
            await inbox.put(i)
        return [first, *[await inbox.get() for _ in range(3)]]

    assert asyncio.run(run()) == [1, 2, 3, 4]


def test_put_waits_while_full_until_an_item_is_taken() -> None:
    async def run() -> tuple[bool, bool, list[int]]:
        inbox: Inbox[int] = Inbox(asyncio.get_running_loop(), 2)
        await inbox.put(1)
        await inbox.put(2)
        assert inbox.full()
        putter = asyncio.ensure_future(inbox.put(3))
        await asyncio.sleep(0)
        waited = not putter.done()
        taken = [await inbox.get()]
        await asyncio.sleep(0)
        return waited, putter.done(), taken + [await inbox.get(), await inbox.get()]

    assert asyncio.run(run()) == (True, True, [1, 2, 3])


def test_put_nowait_goes_past_the_bound() -> None:
    async def run() -> int:
        inbox: Inbox[str] = Inbox(asyncio.get_running_loop(), 1)
        inbox.put_nowait("a")
        inbox.put_nowait("end")
        return len(inbox)

    assert asyncio.run(run()) == 2


def test_a_cancelled_get_leaves_the_inbox_usable() -> None:
    async def run() -> int:
        inbox: Inbox[int] = Inbox(asyncio.get_running_loop(), 2)
        getter = asyncio.ensure_future(inbox.get())
        await asyncio.sleep(0)
        getter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await getter
        inbox.put_nowait(7)  # the cancelled waiter is skipped
        return await asyncio.wait_for(inbox.get(), 1.0)

    assert asyncio.run(run()) == 7


def test_a_queued_disconnect_calls_on_disconnect_once_even_behind_messages() -> None:
    async def run() -> tuple[list[str], bool, list[str]]:
        queue = ReceiveQueue(asyncio.get_running_loop())
        calls: list[str] = []
        queue.on_disconnect = lambda: calls.append("left")
        queue.put_nowait({"type": "websocket.receive", "text": "a"})
        assert calls == [] and not queue.left
        queue.put_nowait({"type": "websocket.disconnect", "code": 1006})
        queue.put_nowait({"type": "websocket.disconnect", "code": 1006})
        taken = [(await queue.get())["type"] for _ in range(3)]
        return calls, queue.left, taken

    calls, left, taken = asyncio.run(run())
    assert calls == ["left"]  # at once, and once
    assert left
    assert taken == ["websocket.receive", "websocket.disconnect", "websocket.disconnect"]
