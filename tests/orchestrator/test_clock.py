"""The director and its components run on the injected clock alone: lease reclamation, ejection
expiry and retry-after advance when the clock does, without any real time passing."""

from __future__ import annotations

from services.orchestrator.director import Orchestrator
from services.orchestrator.domain import Outcome
from services.orchestrator.policy import HealthPolicy, Policy
from services.orchestrator.settings import OrchestratorSettings
from tests.helpers import ManualClock
from tests.orchestrator.test_core import FakeProbe, req, settings


async def ready_on_manual_clock(cfg: OrchestratorSettings) -> tuple[Orchestrator, ManualClock]:
    """A core on a manual clock, every replica of `cfg` probed ready."""
    clock, probe = ManualClock(1000.0), FakeProbe()
    core = Orchestrator(cfg, probe, clock=clock)
    probe.ready_ids = {r.id for r in cfg.replicas}
    await core.probe_once()
    return core, clock


async def test_leases_are_reclaimed_when_the_virtual_clock_passes_the_timeout() -> None:
    cfg = settings(n=1, cap=1)
    cfg.lease_timeout_s = 60.0
    core, clock = await ready_on_manual_clock(cfg)
    lease = await core.admit(req("a"), timeout_s=1)
    assert lease.granted_at == clock.t
    clock.t += 59.0
    core.tick()
    assert core.replicas()[0].in_flight == 1
    clock.t += 2.0
    core.tick()
    assert core.replicas()[0].in_flight == 0
    assert not core.complete(lease.lease_id, Outcome.SUCCESS)  # already ended, exactly once


async def test_ejection_lasts_exactly_its_virtual_duration() -> None:
    clock, probe = ManualClock(1000.0), FakeProbe()
    policy = Policy(
        health=HealthPolicy(
            consecutive_errors=1, base_ejection_seconds=30.0, max_ejection_percent=50
        )
    )
    core = Orchestrator(settings(n=2, cap=4), probe, policy, clock=clock)
    probe.ready_ids = {"r0", "r1"}
    await core.probe_once()
    lease = await core.admit(req("a"), timeout_s=1)
    core.complete(lease.lease_id, Outcome.REPLICA_ERROR)
    bad = next(st for st in core.replicas() if st.spec.id == lease.replica.id)
    assert bad.ejected(clock.t)
    assert bad.ejected_until == clock.t + 30.0
    clock.t += 30.0
    assert not bad.ejected(clock.t)


async def test_drain_rate_and_retry_after_follow_the_virtual_service_time() -> None:
    core, clock = await ready_on_manual_clock(settings(n=1, cap=4))
    assert core.drain_rate() is None
    assert core.retry_after_s() == 1.0  # nothing completed yet: unknown
    for i in range(4):
        lease = await core.admit(req(str(i)), timeout_s=1)
        clock.t += 2.0  # each lease runs 2 virtual seconds
        core.complete(lease.lease_id, Outcome.SUCCESS)
    # 4 slots (no engine sample: the configured cap) freed every 2 s
    assert core.drain_rate() == 2.0
    lease = await core.admit(req("x"), timeout_s=1)
    core.complete(lease.lease_id, Outcome.REPLICA_ERROR)  # failures do not count
    assert core.drain_rate() == 2.0
