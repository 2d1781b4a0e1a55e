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
    sees the disconnect. A request that never reads its body (a GET) is not watched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_read = asyncio.Event()
        disconnected = asyncio.Event()
        answered = False

        async def receive_body() -> Message:
            if body_read.is_set():  # the watcher reads from here on: wait for what it sees
                await disconnected.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected.set()
            elif not message.get("more_body", False):
                body_read.set()
            return message

        async def send_answer(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, receive_body, send_answer))

        async def watch() -> None:
            await body_read.wait()
            # After the body, the server's receive() returns only once the client is gone
            # or the response is complete.
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected.set()
                if not answered and not handler.done():
                    scope[ABANDONED] = True
                    handler.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait([handler])  # never cancels the handler if this wait is
        except asyncio.CancelledError:
            handler.cancel()
            raise
        finally:
            watcher.cancel()
            with suppress(asyncio.CancelledError):
                await watcher
        if handler.cancelled() and scope.get(ABANDONED):
            return  # the client is gone: nobody to answer
        handler.result()  # the app's own exception, if any, as if it ran here
