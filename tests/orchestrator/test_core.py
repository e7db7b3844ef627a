from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from services.orchestrator.core import AdmissionRequest, Orchestrator, Outcome, Priority
from services.orchestrator.errors import BadAdmission, NoReplicaReady, QueueFull, QueueTimeout
from services.orchestrator.settings import OrchestratorSettings, ReplicaSpec


class FakeProbe:
    def __init__(self) -> None:
        self.ready_ids: set[str] = set()

    async def ready(self, replica: ReplicaSpec, models: Sequence[str], timeout_s: float) -> bool:
        return replica.id in self.ready_ids


def settings(n: int = 2, cap: int = 2, queue: int = 4) -> OrchestratorSettings:
    return OrchestratorSettings(
        replicas=[ReplicaSpec(id=f"r{i}", grpc_address=f"127.0.0.1:{9000 + i}") for i in range(n)],
        max_in_flight_per_replica=cap,
        max_queue=queue,
    )


def req(
    rid: str = "x", priority: Priority = Priority.STANDARD, model: str = "tensorrt_llm"
) -> AdmissionRequest:
    return AdmissionRequest(
        request_id=rid, model=model, prompt_token_ids=[1, 2, 3], max_tokens=4, priority=priority
    )


async def assert_queued(core: Orchestrator, depth: int) -> None:
    """One loop tick lets freshly created admit tasks reach the queue."""
    await asyncio.sleep(0)
    assert core.queue_depth == depth


async def ready_core(n: int = 2, cap: int = 2, queue: int = 4) -> tuple[Orchestrator, FakeProbe]:
    probe = FakeProbe()
    core = Orchestrator(settings(n, cap, queue), probe)
    probe.ready_ids = {f"r{i}" for i in range(n)}
    await core.probe_once()
    return core, probe


async def test_no_ready_replica_is_unavailable() -> None:
    core = Orchestrator(settings(), FakeProbe())
    await core.probe_once()
    with pytest.raises(NoReplicaReady):
        await core.admit(req(), 1.0)


@pytest.mark.parametrize(
    ("field", "request_"),
    [
        ("model", AdmissionRequest("x", "", [1], 4)),
        ("max_tokens", AdmissionRequest("x", "tensorrt_llm", [1], 0)),
    ],
)
async def test_bad_admission(field: str, request_: AdmissionRequest) -> None:
    core, _ = await ready_core()
    with pytest.raises(BadAdmission, match=field):
        await core.admit(request_, 1.0)


async def test_least_outstanding_spreads_load() -> None:
    core, _ = await ready_core(n=2, cap=4)
    leases = [await core.admit(req(str(i)), 1.0) for i in range(4)]
    assert sorted(lease.replica.id for lease in leases) == ["r0", "r0", "r1", "r1"]
    assert {st.spec.id: st.in_flight for st in core.replicas()} == {"r0": 2, "r1": 2}


async def test_complete_releases_and_is_idempotent() -> None:
    core, _ = await ready_core(n=1)
    lease = await core.admit(req(), 1.0)
    assert core.complete(lease.lease_id, Outcome.SUCCESS)
    assert not core.complete(lease.lease_id, Outcome.SUCCESS)
    assert core.replicas()[0].in_flight == 0


async def test_queue_waits_for_a_slot_then_grants() -> None:
    core, _ = await ready_core(n=1, cap=1)
    first = await core.admit(req("a"), 1.0)
    waiting = asyncio.create_task(core.admit(req("b"), 5.0))
    await assert_queued(core, 1)
    assert not waiting.done()
    core.complete(first.lease_id, Outcome.SUCCESS)
    second = await waiting
    assert second.replica.id == "r0"
    assert core.replicas()[0].in_flight == 1


async def test_priority_order_in_queue() -> None:
    core, _ = await ready_core(n=1, cap=1)
    first = await core.admit(req("a"), 1.0)
    batch = asyncio.create_task(core.admit(req("batch", Priority.BATCH), 5.0))
    await assert_queued(core, 1)
    interactive = asyncio.create_task(core.admit(req("int", Priority.INTERACTIVE), 5.0))
    await assert_queued(core, 2)
    core.complete(first.lease_id, Outcome.SUCCESS)
    granted = await interactive
    assert not batch.done()
    core.complete(granted.lease_id, Outcome.SUCCESS)
    await batch


async def test_queue_full_gives_retry_after() -> None:
    core, _ = await ready_core(n=1, cap=1, queue=1)
    await core.admit(req("a"), 1.0)
    queued = asyncio.create_task(core.admit(req("b"), 5.0))
    await assert_queued(core, 1)
    with pytest.raises(QueueFull) as info:
        await core.admit(req("c"), 1.0)
    assert info.value.retry_after_s is not None
    assert info.value.retry_after_s > 0
    queued.cancel()


async def test_queue_timeout_and_cancellation_leave_queue() -> None:
    core, _ = await ready_core(n=1, cap=1)
    await core.admit(req("a"), 1.0)
    with pytest.raises(QueueTimeout):
        await core.admit(req("b"), 0.01)
    assert core.queue_depth == 0
    task = asyncio.create_task(core.admit(req("c"), 5.0))
    await assert_queued(core, 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert core.queue_depth == 0


async def test_replica_error_marks_unhealthy_until_probe_passes() -> None:
    core, _ = await ready_core(n=2, cap=8)
    lease = await core.admit(req(), 1.0)
    core.complete(lease.lease_id, Outcome.REPLICA_ERROR)
    bad = lease.replica.id
    assert {st.spec.id: st.healthy for st in core.replicas()}[bad] is False
    for i in range(3):
        assert (await core.admit(req(str(i)), 1.0)).replica.id != bad
    await core.probe_once()
    assert all(st.healthy for st in core.replicas())


async def test_waiters_fail_when_last_replica_goes_down() -> None:
    core, probe = await ready_core(n=1, cap=1)
    await core.admit(req("a"), 1.0)
    waiting = asyncio.create_task(core.admit(req("b"), 5.0))
    await assert_queued(core, 1)
    probe.ready_ids.clear()
    await core.probe_once()
    with pytest.raises(NoReplicaReady):
        await waiting
    assert core.queue_depth == 0


async def test_unknown_model_is_unavailable() -> None:
    core, _ = await ready_core()
    with pytest.raises(NoReplicaReady):
        await core.admit(req(model="other"), 1.0)


async def test_sync_replicas_adds_and_drains_removed() -> None:
    core, probe = await ready_core(n=2, cap=4)
    lease = await core.admit(req(), 1.0)
    gone = lease.replica.id
    keep = next(st.spec for st in core.replicas() if st.spec.id != gone)
    new = ReplicaSpec(id="r9", grpc_address="127.0.0.1:9009")
    core.sync_replicas([keep, new])
    assert {st.spec.id for st in core.replicas()} == {keep.id, "r9"}
    probe.ready_ids.add("r9")
    await core.probe_once()
    for i in range(4):
        assert (await core.admit(req(str(i)), 1.0)).replica.id != gone
    # the removed replica's lease still completes cleanly
    assert core.complete(lease.lease_id, Outcome.SUCCESS)
