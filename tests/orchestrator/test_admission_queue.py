"""The admission queue alone: pure ordering (priority, then tenant-fair finish tags), bounds."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.orchestrator.admission_queue import _TENANT_MEMORY, AdmissionQueue, Waiter
from services.orchestrator.domain import AdmissionRequest, Lease, Priority
from services.orchestrator.prefix import NO_MATCHES


def _req(rid: str, tenant: str = "", priority: Priority = Priority.STANDARD) -> AdmissionRequest:
    return AdmissionRequest(rid, "m", [1, 2, 3], 7, priority=priority, tenant=tenant)


async def test_priority_first_then_tenants_share_in_proportion_to_weight() -> None:
    weights = {"heavy": 3.0, "light": 1.0}
    q = AdmissionQueue(64, lambda t: weights.get(t, 1.0))
    loop = asyncio.get_running_loop()
    for i in range(6):
        q.push(_req(f"h{i}", "heavy"), NO_MATCHES, 0.0, loop.create_future(), ("", ""), None)
        q.push(_req(f"l{i}", "light"), NO_MATCHES, 0.0, loop.create_future(), ("", ""), None)
    q.push(
        _req("urgent", priority=Priority.INTERACTIVE),
        NO_MATCHES,
        0.0,
        loop.create_future(),
        ("", ""),
        None,
    )
    order = [w.request.request_id for w in q.drain_in_order()]
    assert order[0] == "urgent"
    first_eight = order[1:9]
    # Weight 3 vs 1: of the first eight standard grants, six go to the heavy tenant.
    assert sum(r.startswith("h") for r in first_eight) == 6
    assert len(q) == 0


async def test_bound_withdraw_and_restore() -> None:
    q = AdmissionQueue(2, lambda _t: 1.0)
    loop = asyncio.get_running_loop()
    futs: list[asyncio.Future[Lease]] = [loop.create_future() for _ in range(2)]
    a = q.push(_req("a"), NO_MATCHES, 0.0, futs[0], ("p", "v"), None)
    q.push(_req("b"), NO_MATCHES, 0.0, futs[1], ("p", "v"), None)
    assert q.full
    assert q.withdraw(a)
    assert futs[0].cancelled()
    assert not q.withdraw(a)  # leaves exactly once
    assert len(q) == 1
    taken = q.drain_in_order()
    assert [w.request.request_id for w in taken] == ["b"]
    q.restore(taken)
    assert len(q) == 1


async def test_waiting_lists_the_waiters_still_queued() -> None:
    q = AdmissionQueue(8, lambda _t: 1.0)
    loop = asyncio.get_running_loop()
    a = q.push(_req("a"), NO_MATCHES, 0.0, loop.create_future(), ("p", "v"), None)
    b = q.push(_req("b"), NO_MATCHES, 0.0, loop.create_future(), ("p", "v"), None)
    assert {w.request.request_id for w in q.waiting()} == {"a", "b"}
    assert q.withdraw(a)
    b.future.set_result(Lease("l", None, 0.0, 0.0))  # type: ignore[arg-type]  # granted
    assert list(q.waiting()) == []


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("push"), st.sampled_from(list(Priority)), st.sampled_from("xyz")),
            st.tuples(st.just("withdraw"), st.integers(0, 1000)),
            st.tuples(st.just("evict"), st.sampled_from(list(Priority))),
            st.tuples(st.just("pass"), st.integers(0, 7)),
        ),
        max_size=80,
    )
)
def test_the_queue_agrees_with_a_list_of_its_live_waiters(ops: list[tuple[object, ...]]) -> None:
    """Any mix of pushes, withdrawals, evictions and dispatch passes (drain, keep every k-th,
    restore): the queue's length, counts, waiters and service order are those of the live
    waiters, taken out ones left behind at once (their heap entries go lazily)."""

    loop = asyncio.new_event_loop()  # the waiters' futures only: never run, never current
    try:
        q = AdmissionQueue(12, lambda _t: 1.0)
        live: list[Waiter] = []
        for i, op in enumerate(ops):
            if op[0] == "push":
                prio, tenant = op[1], op[2]
                assert isinstance(prio, Priority)
                assert isinstance(tenant, str)
                assert q.full == (len(live) == 12)
                if q.full:
                    with pytest.raises(OverflowError, match="12 of 12"):
                        q.push(_req("over"), NO_MATCHES, 0.0, loop.create_future(), ("", ""), None)
                    continue
                live.append(
                    q.push(
                        _req(str(i), tenant, prio),
                        NO_MATCHES,
                        0.0,
                        loop.create_future(),
                        ("", ""),
                        None,
                    )
                )
            elif op[0] == "withdraw" and live:
                assert isinstance(op[1], int)
                w = live.pop(op[1] % len(live))
                assert q.withdraw(w)
                assert not q.withdraw(w)
            elif op[0] == "evict":
                of_class = [w for w in live if w.priority == op[1]]
                victim = q.evict_newest(op[1])  # type: ignore[arg-type]
                if not of_class:
                    assert victim is None
                    continue
                assert victim is max(of_class, key=lambda w: w.seq)
                live.remove(victim)
                victim.future.cancel()
            elif op[0] == "pass":
                assert isinstance(op[1], int)
                taken = q.drain_in_order()
                assert taken == sorted(live)  # service order: the waiters' own ordering
                assert len(q) == 0
                assert list(q.waiting()) == []
                kept = taken[:: op[1] + 1]
                # Drained, the waiters are out of the queue until restored.
                assert all(not q.withdraw(w) for w in taken)
                for w in taken:
                    if w not in kept:
                        w.future.cancel()  # granted, in the director
                q.restore(kept)
                live = kept
            assert len(q) == len(live)
            assert set(map(id, q.waiting())) == set(map(id, live))
            assert q.queued() == {p: sum(w.priority == p for w in live) for p in Priority}
        assert q.drain_in_order() == sorted(live)
    finally:
        loop.close()


def _serve_head(q: AdmissionQueue) -> Waiter:
    """A dispatch pass that grants the head waiter and keeps the rest."""
    order = q.drain_in_order()
    q.served(order[0])
    q.restore(order[1:])
    q.prune()
    return order[0]


async def test_a_long_request_is_not_passed_forever_by_new_tenants_short_ones() -> None:
    """The class clock follows the served finish tags: once the short requests' finish tags
    pass the long one's, it is served (each of 400 tenants arrives once, as end users behind
    one gateway key may) after about as many as its cost is theirs."""
    q = AdmissionQueue(64, lambda _t: 1.0)
    loop = asyncio.get_running_loop()
    long = AdmissionRequest("long", "m", list(range(3000)), 7, tenant="big")
    q.push(long, NO_MATCHES, 0.0, loop.create_future(), ("", ""), None)
    served = []
    for i in range(400):
        q.push(_req(f"s{i}", f"user-{i}"), NO_MATCHES, 0.0, loop.create_future(), ("", ""), None)
        served.append(_serve_head(q).request.request_id)
    # Its cost (3007) is about 300 short ones' (10 each): it waits for about that many.
    assert "long" in served
    assert served.index("long") <= 1 + 3007 // 10


async def test_tenants_served_once_are_forgotten() -> None:
    q = AdmissionQueue(64, lambda _t: 1.0)
    loop = asyncio.get_running_loop()
    for i in range(_TENANT_MEMORY + 1000):
        q.push(_req(f"r{i}", f"user-{i}"), NO_MATCHES, 0.0, loop.create_future(), ("", ""), None)
        _serve_head(q)
    assert len(q._tenant_finish) <= _TENANT_MEMORY + 1


async def test_tenants_of_an_emptied_class_are_forgotten() -> None:
    """Waiters withdrawn (callers gone), never served: the clock never passes their tags."""
    q = AdmissionQueue(_TENANT_MEMORY + 10, lambda _t: 1.0)
    loop = asyncio.get_running_loop()
    waiters = [
        q.push(_req(f"r{i}", f"user-{i}"), NO_MATCHES, 0.0, loop.create_future(), ("", ""), None)
        for i in range(_TENANT_MEMORY + 5)
    ]
    q.prune()
    assert len(q._tenant_finish) == _TENANT_MEMORY + 5  # all still waiting: all remembered
    for w in waiters:
        q.withdraw(w)
    q.prune()
    assert not q._tenant_finish


def _push(q: AdmissionQueue, rid: str, tenant: str, tokens: int) -> Waiter:
    req = AdmissionRequest(rid, "m", list(range(tokens)), 0, tenant=tenant)
    return q.push(req, NO_MATCHES, 0.0, asyncio.get_running_loop().create_future(), ("", ""), None)


async def test_a_tenant_whose_waiters_left_unserved_is_not_charged_for_them() -> None:
    """A's ten waiters time out (withdrawn, never served); A's next request, sent before B's
    five, is served first: A got no service to be charged for."""
    q = AdmissionQueue(64, lambda _t: 1.0)
    gone = [_push(q, f"a-old-{i}", "a", 10) for i in range(10)]
    for w in gone:
        assert q.withdraw(w)
    _push(q, "a-new", "a", 10)
    for i in range(5):
        _push(q, f"b{i}", "b", 10)
    assert q.drain_in_order()[0].request.request_id == "a-new"


async def test_a_tenants_queued_waiters_move_up_when_an_earlier_one_leaves_unserved() -> None:
    """A queued a1 then a2 (tags 0-100, 100-200), B b1 (0-150). a1 is evicted, refused or
    withdrawn: a2 takes its place (0-100) and goes before b1; a request A sends afterwards
    starts from the tag given back, not twice from it."""
    q = AdmissionQueue(64, lambda _t: 1.0)
    a1 = _push(q, "a1", "a", 100)
    _push(q, "a2", "a", 100)
    _push(q, "b1", "b", 150)
    assert q.withdraw(a1)
    _push(q, "a3", "a", 100)
    order = q.drain_in_order()
    assert [w.request.request_id for w in order] == ["a2", "b1", "a3"]
    assert [w.finish_tag for w in order] == [100.0, 150.0, 200.0]
    q.restore(order)
    drained = q.drain_in_order()
    for w in drained:  # refused after a drain (no replica, expected wait): given back too
        if w.request.request_id == "a2":
            q.unserved(w)
    q.restore([w for w in drained if w.request.request_id != "a2"])
    assert [w.finish_tag for w in q.drain_in_order()] == [100.0, 150.0]
