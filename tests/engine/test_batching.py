"""Taking a batch (service/engine/batching.py): the scheduler's policy as a plain function,
on plain steps (a session, a token cost, whether it is a long step's chunk, whether its
client went away)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from service.engine.batching import Bounds, Taken, take


@dataclass(eq=False)
class Fake:
    name: str
    session_id: str | None = None
    tokens: int = 1
    long: bool = False
    gone: bool = False


def run(
    pending: list[Fake],
    stateless: list[Fake] = (),  # type: ignore[assignment]
    *,
    max_batch: int = 8,
    max_tokens: int = 100,
    long_cap: int = 100,
    sessions: bool = True,
) -> tuple[Taken[Fake], deque[Fake], deque[Fake]]:
    lane, free = deque(pending), deque(stateless)
    taken = take(
        lane,
        free,
        Bounds(max_batch, max_tokens, long_cap),
        lambda s: (s.tokens, s.long),
        lambda s: s.gone,
        sessions,
    )
    return taken, lane, free


def names(steps: list[Fake] | deque[Fake]) -> list[str]:
    return [s.name for s in steps]


def test_one_step_per_session_and_the_later_ones_wait_in_order() -> None:
    steps = [Fake("a1", "a"), Fake("b1", "b"), Fake("a2", "a"), Fake("c1", "c"), Fake("a3", "a")]
    taken, lane, _ = run(steps)
    assert names(taken.steps) == ["a1", "b1", "c1"]
    assert names(lane) == ["a2", "a3"]  # still in arrival order, at the front


def test_sessions_come_first_then_stateless_steps_up_to_the_batch_size() -> None:
    taken, lane, free = run(
        [Fake("a1", "a"), Fake("b1", "b")],
        [Fake("p1"), Fake("p2"), Fake("p3")],
        max_batch=4,
    )
    assert names(taken.steps) == ["a1", "b1", "p1", "p2"]
    assert names(lane) == [] and names(free) == ["p3"]


def test_a_busy_session_lane_takes_only_stateless_steps() -> None:
    taken, lane, _ = run([Fake("a1", "a")], [Fake("p1")], sessions=False)
    assert names(taken.steps) == ["p1"] and names(lane) == ["a1"]


def test_a_step_over_the_token_bound_waits_and_a_shorter_one_behind_it_is_taken() -> None:
    steps = [Fake("a1", "a", 6), Fake("b1", "b", 6), Fake("a2", "a", 1), Fake("c1", "c", 2)]
    taken, lane, _ = run(steps, max_tokens=9)
    # b1 does not fit after a1: it waits; a2 waits behind a1 (its session's); c1 fits.
    assert names(taken.steps) == ["a1", "c1"]
    assert names(lane) == ["b1", "a2"]
    assert taken.tokens == 8 and taken.long_tokens == 0


def test_a_session_whose_first_step_waits_keeps_its_later_steps_behind_it() -> None:
    steps = [Fake("a1", "a", 5), Fake("a2", "a", 1)]
    taken, lane, _ = run(steps, max_tokens=4)
    assert names(taken.steps) == [] and names(lane) == ["a1", "a2"]


def test_long_chunks_stay_within_their_cap_and_short_steps_fill_the_rest() -> None:
    steps = [
        Fake("l1", "l1", 4, long=True),
        Fake("l2", "l2", 4, long=True),
        Fake("l3", "l3", 4, long=True),
        Fake("s1", "s1", 1),
    ]
    taken, lane, _ = run(steps, max_tokens=20, long_cap=8)
    assert names(taken.steps) == ["l1", "l2", "s1"]
    assert names(lane) == ["l3"]
    assert taken.long_tokens == 8 and taken.tokens == 9


def test_steps_whose_clients_went_away_are_dropped_and_counted() -> None:
    steps = [Fake("a1", "a", gone=True), Fake("a2", "a"), Fake("b1", "b", gone=True)]
    taken, lane, free = run(steps, [Fake("p1", gone=True), Fake("p2")])
    # a1 left the queue: a2, the session's next step, is taken in its place.
    assert names(taken.steps) == ["a2", "p2"]
    assert taken.dropped == 3 and not lane and not free


def test_the_scan_stops_after_a_batch_of_held_steps() -> None:
    # Nine steps of one session: the first is taken, then eight are held (the batch size),
    # and the scan stops there: the last waits unexamined, the order kept.
    steps = [Fake(f"a{i}", "a") for i in range(10)] + [Fake("b1", "b")]
    taken, lane, _ = run(steps, max_batch=8)
    assert names(taken.steps) == ["a0"]
    assert names(lane) == [f"a{i}" for i in range(1, 10)] + ["b1"]


def test_an_empty_batch_takes_one_step_at_its_bound() -> None:
    taken, _, _ = run([Fake("l1", "l", 16, long=True)], max_tokens=16, long_cap=16)
    assert names(taken.steps) == ["l1"]
