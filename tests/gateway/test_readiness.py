"""ReadinessCheck: ready only with a replica that can take a lease; one orchestrator call shared
by concurrent checks; a check whose caller went away does not cancel the shared call."""

from __future__ import annotations

import asyncio

from services.gateway.admission import AdmissionStatus
from services.gateway.errors import OrchestratorUnavailable
from services.gateway.readiness import ReadinessCheck
from tests.gateway.conftest import MODEL, FakeAdmission


async def test_ready_needs_a_model_and_a_ready_replica() -> None:
    orch = FakeAdmission()
    orch.view = AdmissionStatus(replicas=2, ready_replicas=1, queue_depth=0)
    assert (await ReadinessCheck(orch, [MODEL], 1.0).check()).ready
    none = await ReadinessCheck(orch, [], 1.0).check()
    assert (none.ready, none.reason) == (False, "no model configured")
    orch.view = AdmissionStatus(replicas=2, ready_replicas=0, queue_depth=5)
    r = await ReadinessCheck(orch, [MODEL], 1.0).check()
    assert (r.ready, r.reason, r.status) == (False, "no ready replica (2 known)", orch.view)
    orch.view = OrchestratorUnavailable("orchestrator: UNAVAILABLE: refused")
    r = await ReadinessCheck(orch, [MODEL], 1.0).check()
    assert not r.ready
    assert r.status is None
    assert r.reason == "orchestrator unreachable: orchestrator: UNAVAILABLE: refused"


async def test_concurrent_checks_share_one_call_and_survive_a_cancelled_caller() -> None:
    orch = FakeAdmission()
    orch.status_gate = asyncio.Event()
    check = ReadinessCheck(orch, [MODEL], 5.0)
    checks = [asyncio.ensure_future(check.check()) for _ in range(20)]
    leaving = asyncio.ensure_future(check.check())
    # The shared call was scheduled by the first check, after all 21 were: once it reached
    # the fake, every check has joined it.
    await orch.status_entered.wait()
    leaving.cancel()
    orch.status_gate.set()
    results = await asyncio.gather(*checks)
    assert all(r.ready for r in results)
    assert orch.status_calls == 1
    assert (await check.check()).ready  # a later check asks again
    assert orch.status_calls == 2


async def test_an_orchestrator_that_does_not_answer_is_not_ready_within_the_timeout() -> None:
    orch = FakeAdmission()
    orch.status_gate = asyncio.Event()  # never set
    r = await ReadinessCheck(orch, [MODEL], 0.01).check()
    assert not r.ready
    assert r.reason == "orchestrator unreachable: no answer within the readiness timeout"
