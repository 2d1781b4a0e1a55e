"""service.metrics.Tally: counts kept in process, published once per tick, same totals."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service import metrics
from service.metrics import LATENCY_BUCKETS, Tally, observe_all


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a registry, by name and labels (the `_created` ones left out)."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_observe_all_gives_the_same_histogram_as_observing_one_by_one() -> None:
    rng = random.Random(7)
    values = [rng.choice([0.0, 0.0005, 0.001, 5.0, 99.0]) for _ in range(50)]
    values += [rng.expovariate(200.0) for _ in range(500)]
    one, bulk = CollectorRegistry(), CollectorRegistry()
    by_one = Histogram("h", "h", ["route"], buckets=LATENCY_BUCKETS, registry=one)
    in_bulk = Histogram("h", "h", ["route"], buckets=LATENCY_BUCKETS, registry=bulk)
    for value in values:
        by_one.labels("/x").observe(value)
    observe_all(in_bulk.labels("/x"), values[:100])
    observe_all(in_bulk.labels("/x"), values[100:])
    # The same counts in every bucket; the sum up to float rounding (another order).
    assert samples(bulk) == pytest.approx(samples(one), rel=1e-12)
    assert samples(bulk)[("h_count", (("route", "/x"),))] == len(values)


def test_outside_an_event_loop_a_tally_publishes_at_once() -> None:
    registry = CollectorRegistry()
    counter = Counter("c", "c", registry=registry)
    Tally().inc(counter, 3)
    assert registry.get_sample_value("c_total") == 3


def test_inside_a_loop_a_tick_publishes_everything_counted_in_it_once() -> None:
    registry = CollectorRegistry()
    counter = Counter("c", "c", ["type"], registry=registry)
    histogram = Histogram("h", "h", buckets=(0.1, 1.0), registry=registry)
    tally = Tally()

    async def count() -> list[float | None]:
        for _ in range(10):
            tally.inc(counter.labels("a"))
            tally.observe(histogram, 0.5)
        tally.inc(counter.labels("b"), 2)
        before = registry.get_sample_value("c_total", {"type": "a"})
        await asyncio.sleep(0)  # the tick ends: its publish runs
        return [before, registry.get_sample_value("c_total", {"type": "a"})]

    assert asyncio.run(count()) == [0, 10]
    assert registry.get_sample_value("c_total", {"type": "b"}) == 2
    assert registry.get_sample_value("h_bucket", {"le": "1.0"}) == 10
    assert registry.get_sample_value("h_bucket", {"le": "0.1"}) == 0
    assert registry.get_sample_value("h_sum") == 5.0


def test_render_publishes_what_this_process_counted_first() -> None:
    child = metrics.WS_MESSAGES.labels("error")
    before = child._value.get()

    async def count_then_render() -> bytes:
        metrics.TALLY.inc(child, 4)
        return metrics.render()  # before the tick that would publish it

    text = asyncio.run(count_then_render()).decode()
    after = child._value.get()
    assert after == before + 4
    assert f'nextword_ws_messages_total{{type="error"}} {after}' in text


def test_counts_are_not_held_when_the_loop_that_should_publish_them_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = CollectorRegistry()
    counter = Counter("c", "c", registry=registry)
    tally = Tally()
    stopped = asyncio.new_event_loop()  # never runs again: what it was given never runs
    monkeypatch.setattr(metrics.asyncio, "get_running_loop", lambda: stopped)
    tally.inc(counter)
    tally.inc(counter)
    assert registry.get_sample_value("c_total") == 0
    monkeypatch.undo()
    stopped.close()
    clock = time.monotonic() + 2 * metrics.STALE_S
    monkeypatch.setattr(metrics.time, "monotonic", lambda: clock)
    tally.inc(counter)  # outside a loop, a second later: published at once, all three
    assert registry.get_sample_value("c_total") == 3
