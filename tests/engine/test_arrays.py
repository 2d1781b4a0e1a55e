"""Array helpers (`service.arrays`) and the serving processes' heap (`service.heap`)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import numpy as np
import pytest

from service import heap
from service.arrays import stack_rows


@pytest.mark.parametrize("shape", [(), (5,), (2, 3)])
def test_stack_rows_is_np_stack(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    base = rng.random((7, *shape)).astype(np.float32)
    arrays = [base[i] for i in range(7)]  # views, as a batch's rows are
    got = stack_rows(arrays)
    np.testing.assert_array_equal(got, np.stack(arrays))
    assert got.dtype == np.float32 and not np.shares_memory(got, base)


def test_stack_rows_refuses_arrays_of_other_shapes() -> None:
    with pytest.raises(ValueError, match="do not stack"):
        stack_rows([np.zeros((2, 3)), np.zeros((3, 2))])  # same size, other shape


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settle_freezes_the_heap_and_raises_the_young_threshold(restored_gc: None) -> None:
    kept = [[] for _ in range(10)]  # lists are tracked by the collector
    heap.settle()
    assert gc.get_freeze_count() >= len(kept)
    assert gc.get_threshold()[0] == heap.YOUNG
    # Frozen: no collection walks them (`get_objects` lists the generations collected).
    walked = {id(o) for o in gc.get_objects()}
    assert not any(id(x) in walked for x in kept)
    later = []
    assert id(later) in {id(o) for o in gc.get_objects()}  # objects made after are walked
