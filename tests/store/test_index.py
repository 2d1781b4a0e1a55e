"""The session index alone (write order, expiry from the front, the eviction choice) and
the owner quotas."""

from __future__ import annotations

from service.store.index import SessionIndex, handle_of, split
from service.store.quotas import OwnerQuotas


def test_a_handle_names_an_arena_and_a_row() -> None:
    assert split(handle_of(3, 1_000_000)) == (3, 1_000_000)
    assert split(handle_of(255, 0)) == (255, 0)


def test_the_index_keeps_write_order_and_a_move_keeps_the_place() -> None:
    index = SessionIndex()
    for i, session_id in enumerate("abc"):
        index.written(session_id, handle_of(0, i))
    index.written("a", handle_of(0, 0))  # a write moves it to the end
    index.moved("b", handle_of(1, 5))  # a new place does not
    assert list(index) == ["b", "c", "a"] and index.get("b") == handle_of(1, 5)
    assert index.oldest(2) == ["b", "c"]
    assert index.oldest(2, keep={"b"}) == ["c", "a"]
    assert index.oldest(0) == [] and list(index) == ["b", "c", "a"]  # nothing removed
    assert index.pop("c") == handle_of(0, 2) and "c" not in index and len(index) == 2


def test_expiry_takes_from_the_front_until_the_first_live_session() -> None:
    index = SessionIndex()
    for i, session_id in enumerate("abcd"):
        index.written(session_id, handle_of(0, i))
    stale = {0, 1, 3}  # rows whose stamp is past the TTL; d's never reached: c is live
    dropped = index.pop_expired(lambda h: split(h)[1] in stale)
    assert dropped == [("a", handle_of(0, 0)), ("b", handle_of(0, 1))]
    assert list(index) == ["c", "d"]


def test_the_index_estimate_follows_its_sessions() -> None:
    index = SessionIndex()
    empty = index.nbytes
    index.written("x" * 40, 1)
    index.written("x" * 40, 2)  # the same id again: counted once
    one = index.nbytes
    assert one > empty
    index.pop("x" * 40)
    assert index.nbytes <= one and index._key_bytes == 0
    index.written("y", 1)
    index.clear()
    assert len(index) == 0 and index._key_bytes == 0


def test_quotas_keep_the_first_owner_and_choose_its_oldest_sessions() -> None:
    quotas = OwnerQuotas(cap=2)
    quotas.written("a", "k1")
    quotas.written("b", "k1")
    quotas.written("c", "k2")
    quotas.written("a", "k2")  # written again naming another owner: still k1's, now newest
    assert quotas.owner("a") == "k1" and quotas.owner("c") == "k2" and quotas.owner("z") == ""
    assert list(quotas.owned["k1"]) == ["b", "a"]
    assert quotas.victims({"k1": 1}) == ["b"]  # room for one more of k1's
    assert quotas.victims({"k1": 1}, keep={"b"}) == ["a"]
    assert quotas.victims({"k1": 0, "k2": 1, "k3": 5}) == []  # under the cap; k3 has none
    quotas.forget("b")
    quotas.forget("a")
    assert "k1" not in quotas.owned and quotas.owner("a") == ""


def test_without_a_cap_no_owner_is_tracked() -> None:
    quotas = OwnerQuotas(cap=0)
    quotas.written("a", "k1")
    quotas.forget("a")
    assert quotas.owned == {} and quotas.owner_of == {} and quotas.owner("a") == ""
