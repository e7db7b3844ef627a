"""The admission queue alone: pure ordering (priority, then tenant-fair finish tags), bounds."""

from __future__ import annotations

import asyncio

from services.orchestrator.admission_queue import AdmissionQueue
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
