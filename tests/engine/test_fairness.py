"""Queue shares and the drain rate (service/engine/fairness.py), on a fake clock."""

from __future__ import annotations

import pytest

from service.engine.fairness import RETRY_AFTER_S, WINDOW_S, DrainRate, QueueShares
from service.errors import Overloaded


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_drain_rate_counts_answered_steps_over_the_window() -> None:
    clock = Clock()
    rate = DrainRate(clock)
    assert rate.per_second() == 0.0
    assert rate.retry_after(0) == RETRY_AFTER_S[0]
    assert rate.retry_after(10) == RETRY_AFTER_S[1]  # nothing drains: the longest
    for _ in range(5):
        for _ in range(100):
            rate.step_done()
        clock.now += 1.0
    assert rate.per_second() == pytest.approx(100.0)
    assert rate.retry_after(1_000) == 10  # 1,000 steps ahead at 100 a second
    assert rate.retry_after(1) == 1  # never under a second
    assert rate.retry_after(10**9) == RETRY_AFTER_S[1]
    clock.now += 2 * WINDOW_S
    assert rate.per_second() == 0.0  # old answers are forgotten


def test_each_client_holds_at_most_its_share() -> None:
    shares = QueueShares(max_queue=10, share=0.3)
    assert shares.cap == 3
    for _ in range(3):
        shares.admit("alice", "lstm")
    with pytest.raises(Overloaded) as refused:
        shares.admit("alice", "lstm")
    assert "3 steps" in refused.value.message
    shares.admit("bob", "lstm")
    for _ in range(100):
        shares.admit("", "lstm")  # no client: no share counted
    shares.release("alice", answered=True)
    shares.admit("alice", "lstm")
    for name in ("alice", "alice", "alice", "bob"):
        shares.release(name, answered=False)
    assert shares.held == {}
    assert QueueShares(max_queue=2, share=0.1).cap == 1  # never 0


def test_retry_after_comes_from_the_error_when_it_has_one() -> None:
    from service.api.errors import retry_headers
    from service.errors import error_from_code

    assert retry_headers(Overloaded("full")) == {"Retry-After": "1"}  # the table's default
    assert retry_headers(Overloaded("over your share", retry_after_s=7.2)) == {"Retry-After": "8"}
    crossed = error_from_code("overloaded", "over your share", 12.0)  # from the engine
    assert isinstance(crossed, Overloaded) and retry_headers(crossed) == {"Retry-After": "12"}


def test_a_batch_leaves_the_shares_in_one_call_as_its_steps_would_one_by_one() -> None:
    clock = Clock()
    shares = QueueShares(max_queue=10, share=0.5, rate=DrainRate(clock))
    for client in ("alice", "alice", "bob", "alice", "bob", ""):
        shares.admit(client, "lstm")
    shares.release_many(["alice", "", "bob", "alice"], answered=3)
    assert shares.held == {"alice": 1, "bob": 1}
    shares.release_many(["alice", "bob"], answered=0)  # failed or cancelled: not drained
    assert shares.held == {}
    shares.release_many(["", ""], answered=2)  # no client holds a share: only the rate
    clock.now += 1.0
    assert shares.rate.per_second() == pytest.approx(5.0)
