"""Shares of a model's queue: no client may hold more than its share of it.

The queue of a model (`max_queue` steps) is one for every client; without shares one
client's flood fills it and every other client's steps are refused. Each step names its
client (`StepRequest.client`: an API key's name, or `addr:` and the client's address on an
open service); a client may hold at most `share` of the queue, counting its steps from
when they are queued until they are answered (a long step in progress included). Past it
only that client's steps are refused (`Overloaded`): the others still queue.

`Retry-After` for a refusal comes from the measured drain rate: the steps answered per
second over the last `WINDOW_S` seconds; a client told to retry is told when the steps
ahead of it (its own when over its share, else the whole queue) should be done.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable

from service.errors import Overloaded

WINDOW_S = 10.0  # the drain rate is measured over this long
RETRY_AFTER_S = (1, 60)  # Retry-After is clamped to this range (seconds)


class DrainRate:
    """Steps answered per second, over the last `WINDOW_S` seconds (counted per second)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._seconds: deque[list[int]] = deque()  # [whole second, steps answered in it]

    def step_done(self, steps: int = 1) -> None:
        """`steps` were answered now (a batch's are counted in one call)."""
        second = int(self.clock())
        if self._seconds and self._seconds[-1][0] == second:
            self._seconds[-1][1] += steps
        else:
            self._seconds.append([second, steps])
            self._forget(second)

    def _forget(self, now: float) -> None:
        while self._seconds and now - self._seconds[0][0] > WINDOW_S:
            self._seconds.popleft()

    def per_second(self) -> float:
        """The rate (0.0 when nothing was answered within the window)."""
        now = self.clock()
        self._forget(now)
        if not self._seconds:
            return 0.0
        steps = sum(count for _, count in self._seconds)
        return steps / max(now - self._seconds[0][0], 1.0)

    def retry_after(self, steps_ahead: int) -> int:
        """Seconds until `steps_ahead` steps should be answered (clamped; the most without a
        rate)."""
        rate = self.per_second()
        low, high = RETRY_AFTER_S
        if rate <= 0.0:
            return high if steps_ahead else low
        return min(high, max(low, math.ceil(steps_ahead / rate)))


class QueueShares:
    """The steps each client holds in one model's queue, and the cap on them."""

    def __init__(self, max_queue: int, share: float, rate: DrainRate | None = None) -> None:
        self.cap = max(1, int(max_queue * share))
        self.held: Counter[str] = Counter()
        self.rate = rate or DrainRate()

    def admit(self, client: str, model: str) -> None:
        """Count a step of `client`; `Overloaded` (nothing counted) when it holds its share.

        A step with no client ("": in-process use, tests) takes no share."""
        if not client:
            return
        held = self.held[client]
        if held >= self.cap:
            raise Overloaded(
                f"this client holds its share of model {model!r}'s queue ({self.cap} steps); "
                "retry later",
                retry_after_s=self.rate.retry_after(held),
            )
        self.held[client] = held + 1

    def release_many(self, clients: Iterable[str], answered: int) -> None:
        """Steps of `clients` (one name per step) left the queue together, `answered` of
        them answered (the others failed or were cancelled): one call per batch."""
        if answered:
            self.rate.step_done(answered)
        if not self.held:  # no client holds a share (in-process use): nothing to count
            return
        held = self.held
        for client, count in Counter(clients).items():
            if not client:
                continue
            left = held[client] - count
            if left > 0:
                held[client] = left
            else:
                del held[client]

    def release(self, client: str, answered: bool) -> None:
        """A step of `client` left the queue: `answered`, or failed or cancelled (which
        do not count in the drain rate)."""
        if answered:
            self.rate.step_done()
        if not client:
            return
        left = self.held[client] - 1
        if left > 0:
            self.held[client] = left
        else:
            del self.held[client]
