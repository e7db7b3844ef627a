"""Rate-based ejection (Envoy's failure-percentage outlier detection) and the load penalty of
recent failures, table-driven on a virtual clock: outcomes are (seconds later, failed)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from services.orchestrator.director import Orchestrator
from services.orchestrator.domain import Outcome
from services.orchestrator.health import Health
from services.orchestrator.policy import HealthPolicy, Policy
from services.orchestrator.replicas import ReplicaSet
from services.orchestrator.settings import ReplicaSpec
from tests.helpers import ManualClock
from tests.orchestrator.test_core import FakeProbe, req, settings

POLICY = HealthPolicy(
    consecutive_errors=100,  # out of the way: these cases are about the rate
    failure_percentage=50.0,
    failure_min_requests=4,
    failure_window_requests=10,
    failure_window_s=10.0,
    max_ejection_percent=50.0,
)
OK, ERR = False, True

CASES: list[tuple[str, Sequence[tuple[float, bool]], bool]] = [
    ("too few requests to judge", [(0, ERR), (0, ERR), (0, ERR)], False),
    ("half failed, enough requests", [(0, OK), (0, ERR), (0, OK), (0, ERR)], True),
    ("below the share", [(0, OK), (0, OK), (0, OK), (0, ERR), (0, OK), (0, ERR)], False),
    ("alternating errors never reach consecutive, the rate ejects", [(0, OK), (0, ERR)] * 2, True),
    (
        "old failures leave the time window",
        [(0, ERR), (0, ERR), (0, ERR), (11, OK), (0, OK), (0, OK), (0, ERR)],
        False,
    ),
    (
        "old failures leave the count window",
        [(0, ERR)] * 3 + [(0, OK)] * 10 + [(0, ERR)],
        False,
    ),
    ("failures spread within the window", [(3, ERR), (3, OK), (3, ERR), (0.5, OK)], False),
    (
        "failures spread within the window, last one ejects",
        [(3, ERR), (3, OK), (3, OK), (0.5, ERR)],
        True,
    ),
]


@pytest.mark.parametrize(("name", "outcomes", "ejected"), CASES, ids=[c[0] for c in CASES])
def test_failure_share_ejects(
    name: str, outcomes: Sequence[tuple[float, bool]], ejected: bool
) -> None:
    clock = ManualClock(1000.0)
    replicas = ReplicaSet(
        [ReplicaSpec(id=f"r{i}", grpc_address=f"127.0.0.1:{i + 1}") for i in range(2)]
    )
    health = Health(POLICY, replicas, FakeProbe(), 1.0, clock)
    st = replicas.known("r0")
    st.ready = True
    for later, failed in outcomes:
        clock.t += later
        if failed:
            health.record_error(st, reason="test")
        else:
            health.record_success(st)
    assert st.ejected(clock.t) is ejected
    if ejected:
        assert st.ejected_until == clock.t + POLICY.base_ejection_seconds
        assert not st.outcomes  # an ejection starts a fresh window


def test_recent_failures_expire_with_the_virtual_clock() -> None:
    clock = ManualClock(1000.0)
    replicas = ReplicaSet([ReplicaSpec(id="r0", grpc_address="127.0.0.1:1")])
    health = Health(POLICY, replicas, FakeProbe(), 1.0, clock)
    st = replicas.known("r0")
    health.record_error(st, reason="test")
    clock.t += 5.0
    health.record_error(st, reason="test")
    assert health.recent_failures(st, clock.t) == 2
    clock.t += 5.5
    assert health.recent_failures(st, clock.t) == 1
    clock.t += 5.0
    assert health.recent_failures(st, clock.t) == 0


def test_a_passed_probe_does_not_erase_request_failures() -> None:
    """Triton answers ready while its backend stub is dead: the re-probe after each failed
    request passes, and must not reset the count that would eject the replica."""
    clock = ManualClock(1000.0)
    replicas = ReplicaSet(
        [ReplicaSpec(id=f"r{i}", grpc_address=f"127.0.0.1:{i + 1}") for i in range(2)]
    )
    policy = HealthPolicy(consecutive_errors=3, max_ejection_percent=50)
    health = Health(policy, replicas, FakeProbe(), 1.0, clock)
    st = replicas.known("r0")
    health.set_ready(st, True)
    for _ in range(3):
        health.record_error(st, reason="test")
        health.set_ready(st, True)  # the re-probe passes
    assert st.ejected(clock.t)


def test_a_replica_back_to_ready_starts_over() -> None:
    clock = ManualClock(1000.0)
    replicas = ReplicaSet(
        [ReplicaSpec(id=f"r{i}", grpc_address=f"127.0.0.1:{i + 1}") for i in range(2)]
    )
    policy = HealthPolicy(consecutive_errors=3, max_ejection_percent=50)
    health = Health(policy, replicas, FakeProbe(), 1.0, clock)
    st = replicas.known("r0")
    health.set_ready(st, False)
    health.set_ready(st, False)
    health.set_ready(st, True)
    health.record_error(st, reason="test")
    assert not st.ejected(clock.t)


async def test_a_replica_failing_fast_stops_attracting_traffic_before_ejection() -> None:
    """Its failures count as load: with no leases on either replica, the one that just failed
    loses to the one that did not, long before any ejection."""
    clock, probe = ManualClock(1000.0), FakeProbe()
    policy = Policy(
        health=HealthPolicy(
            consecutive_errors=100, failure_min_requests=100, max_ejection_percent=50
        )
    )
    core = Orchestrator(settings(n=2, cap=8), probe, policy, clock=clock)
    probe.ready_ids = {"r0", "r1"}
    await core.probe_once()
    first = await core.admit(req("a"), timeout_s=1)
    core.complete(first.lease_id, Outcome.REPLICA_ERROR)
    picks = []
    for _ in range(10):
        lease = await core.admit(req("b"), timeout_s=1)
        picks.append(lease.replica.id)
        core.complete(lease.lease_id, Outcome.SUCCESS)
    assert first.replica.id not in picks
    failed = next(st for st in core.replicas() if st.spec.id == first.replica.id)
    assert not failed.ejected(clock.t)
    clock.t += policy.health.failure_window_s + 1  # the penalty passes with the window
    lease = await core.admit(req("c"), timeout_s=1)
    core.complete(lease.lease_id, Outcome.SUCCESS)


def test_a_replica_back_from_not_ready_is_routable_at_once() -> None:
    """A restarted replica fails its probes (and is ejected for them), then passes one: its
    ejection ends there, as Envoy un-ejects a host that passes an active health check."""
    clock = ManualClock(1000.0)
    replicas = ReplicaSet(
        [ReplicaSpec(id=f"r{i}", grpc_address=f"127.0.0.1:{i + 1}") for i in range(2)]
    )
    health = Health(HealthPolicy(consecutive_errors=3), replicas, FakeProbe(), 1.0, clock)
    st = replicas.known("r0")
    replicas.known("r1").ready = True
    health.set_ready(st, True)
    for _ in range(3):
        clock.t += 1
        health.set_ready(st, False)
    assert st.ejected(clock.t)
    clock.t += 1
    health.set_ready(st, True)
    assert st.routable(clock.t)
    assert st.consecutive_errors == 0
    # A replica that stayed ready keeps a request-driven ejection through passed probes.
    for _ in range(3):
        health.record_error(st, reason="stub dead")
    assert st.ejected(clock.t)
    health.set_ready(st, True)
    assert st.ejected(clock.t)


class HeldProbe(FakeProbe):
    """Counts the probes; each waits for `release` once `hold` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.hold = False
        self.release = asyncio.Event()

    async def ready(self, replica: ReplicaSpec, models: Sequence[str], timeout_s: float) -> bool:
        self.calls += 1
        if self.hold:
            await self.release.wait()
        return await super().ready(replica, models, timeout_s)


async def test_a_replica_failing_many_requests_at_once_is_probed_once_at_a_time() -> None:
    """A crashed replica's leases come back in one CompleteBatch: one probe of it, not one per
    lease, and one more after it (its answer may predate the failures reported meanwhile); a
    failure after those ended starts the next."""
    probe = HeldProbe()
    core = Orchestrator(settings(n=1, cap=8, queue=8), probe)
    probe.ready_ids = {"r0"}
    await core.probe_once()
    leases = [await core.admit(req(f"x{i}"), 1.0) for i in range(8)]
    probe.calls, probe.hold = 0, True
    core.complete_many((lease.lease_id, Outcome.REPLICA_ERROR, None) for lease in leases[:6])
    await asyncio.sleep(0)  # the probe task starts
    assert probe.calls == 1
    probe.release.set()
    while core._reprobes:
        await asyncio.wait(core._reprobes.values())
    assert probe.calls == 2
    core.complete(leases[6].lease_id, Outcome.REPLICA_ERROR)
    while core._reprobes:
        await asyncio.wait(core._reprobes.values())
    assert probe.calls == 3
