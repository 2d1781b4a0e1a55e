"""Abandoned requests: an HTTP request whose client leaves before its answer is cancelled.

An ASGI server does not cancel a request's task when its client disconnects: it only says
so through `receive()`, and a route waiting for the engine never calls it. So a long
prediction whose client gave up would still run whole. `CancelOnDisconnect` runs the app
in a task of its own and, once the app has read the whole body, listens for the
disconnect itself: when it comes before the response is complete, the task is cancelled.
The cancellation reaches `EngineClient.call`, which sends an abort: a step still queued is
never run, a long one in progress stops at its next chunk (`service.engine.scheduler`),
just as for a WebSocket client that leaves.

A request counts as abandoned in the request metrics with status 499 (nginx's "client
closed request"); nothing is logged per request (a flood of them must not flood the log).
"""

from __future__ import annotations

import asyncio
from contextlib import suppress

from starlette.types import ASGIApp, Message, Receive, Scope, Send

ABANDONED = "nextword.abandoned"  # scope mark: the client left before the answer


class CancelOnDisconnect:
    """ASGI middleware: cancel an HTTP request's handler when its client disconnects.

    Only after the body has been read (by the app): until then the app's own `receive()`
    sees the disconnect. A request that never reads its body (a GET) is not watched.

    The app runs in the request's own task (no second task per request, the hot path's
    cost): a watcher task, started once the body is read, cancels that task when the
    disconnect comes first, and the cancellation it asked for ends here; one from anywhere
    else (the server's) goes on up."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        task = asyncio.current_task()
        assert task is not None  # an ASGI app runs in a task
        answered = False
        abandoned = False  # the watcher cancelled the task
        watcher: asyncio.Task[None] | None = None
        gone: asyncio.Future[None] | None = None  # done once the watcher saw the disconnect

        async def watch() -> None:
            nonlocal abandoned
            # After the body, the server's receive() returns only once the client is gone
            # or the response is complete.
            message = await receive()
            if message["type"] == "http.disconnect":
                if gone is not None and not gone.done():
                    gone.set_result(None)
                if not answered:
                    scope[ABANDONED] = abandoned = True
                    task.cancel()

        async def receive_body() -> Message:
            nonlocal watcher, gone
            if watcher is not None:  # the watcher reads from here on: wait for what it sees
                if gone is None:
                    gone = asyncio.get_running_loop().create_future()
                await gone
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] != "http.disconnect" and not message.get("more_body", False):
                watcher = asyncio.ensure_future(watch())
            return message

        async def send_answer(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        try:
            await self.app(scope, receive_body, send_answer)
        except asyncio.CancelledError:
            # Ours alone (not the server's as well): the client is gone, nobody to answer.
            if not abandoned or task.uncancel() > 0:
                raise
        finally:
            if watcher is not None:
                watcher.cancel()
                with suppress(asyncio.CancelledError):
                    await watcher
