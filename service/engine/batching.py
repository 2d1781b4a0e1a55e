"""Taking a batch: which queued steps the next run takes, within its bounds.

`take` is the scheduler's whole policy for forming a batch, as a function of the two
queues and the bounds: no event loop, no model, no store. The scheduler calls it once per
batch (`StepBatcher._take`); tests call it with plain objects.

The rules, in queue order:

- The sessions' lane first (only when `sessions`: no session batch is in flight), then the
  stateless lane, up to `max_batch` steps.
- One step per session: a session's later steps wait behind its first, in order.
- A batch runs at most `max_tokens` tokens (a step counts the tokens it runs in this batch:
  its `Cost`), of which the chunks of long steps take at most `long_cap`.
- A step that does not fit waits, and so do its session's later steps; a shorter step
  behind it may still be taken (the bounds are not a barrier). Every step fits an empty
  batch (the caller keeps `max_tokens` and `long_cap` at least one chunk).
- A step whose client went away (`gone`) is dropped from its queue and counted.
- The scan of a lane stops once `max_batch` steps were passed over (held): a long queue
  of steps that cannot run now costs one batch's worth of looking, not the queue's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    """What `take` reads of a step: its session (None: a stateless step)."""

    @property
    def session_id(self) -> str | None: ...


StepT = TypeVar("StepT", bound=Queued)


# What a step costs the batch that takes it: the tokens it runs in this batch (at least 1),
# and whether they are a chunk of a long (chunked) step, counted against `long_cap`. A plain
# tuple: one is made per step and batch.
Cost = tuple[int, bool]


@dataclass(frozen=True)
class Bounds:
    """The bounds of one batch."""

    max_batch: int  # steps
    max_tokens: int  # tokens, summed over the steps taken
    long_cap: int  # of which tokens of long steps' chunks


@dataclass
class Taken(Generic[StepT]):
    """A batch taken: its steps, in queue order (sessions' first), and what it used."""

    steps: list[StepT]
    tokens: int  # tokens the batch runs
    long_tokens: int  # ... of which chunks of long steps
    dropped: int  # steps dropped because their clients went away


def take(
    pending: deque[StepT],
    stateless: deque[StepT],
    bounds: Bounds,
    cost: Callable[[StepT], Cost],
    gone: Callable[[StepT], bool],
    sessions: bool = True,
) -> Taken[StepT]:
    """Take the next batch from the sessions' queue `pending` (when `sessions`) and the
    `stateless` queue, in place: the steps taken and dropped leave their queue, the others
    stay in their order at its front."""
    batch: list[StepT] = []
    used = long_used = dropped = 0

    def scan(queue: deque[StepT], one_per_session: bool) -> None:
        nonlocal used, long_used, dropped
        held: list[StepT] = []
        taken: set[str] = set()
        while (
            queue
            and len(batch) < bounds.max_batch
            and len(held) < bounds.max_batch
            and used < bounds.max_tokens
        ):
            step = queue.popleft()
            if gone(step):
                dropped += 1
                continue
            session = step.session_id
            if one_per_session and session is not None and session in taken:
                held.append(step)  # its session's earlier step is in the batch or waits
                continue
            tokens, long = cost(step)
            fits = used + tokens <= bounds.max_tokens and (
                not long or long_used + tokens <= bounds.long_cap
            )
            if one_per_session and session is not None:
                taken.add(session)  # taken, or waiting: its later steps wait behind it
            if not fits:
                held.append(step)
                continue
            used += tokens
            long_used += tokens if long else 0
            batch.append(step)
        queue.extendleft(reversed(held))

    if sessions:
        scan(pending, one_per_session=True)
    scan(stateless, one_per_session=False)
    return Taken(batch, used, long_used, dropped)
