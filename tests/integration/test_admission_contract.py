"""The gateway↔orchestrator contract end to end: the real orchestrator core and servicer on an
ephemeral port, the gateway's real `OrchestratorClient` over a real channel. Every `Replica`
field the orchestrator knows must reach the gateway's lease; in Kubernetes the `authority` is
what makes the sidecar apply the headless Service's mTLS policy to the Triton stream."""

from __future__ import annotations

import dataclasses
import time

from llmmesh.common.discovery import DnsTarget
from llmmesh.common.errors import Reason, ResourceExhausted
from llmmesh.common.topology import TRITON_MODEL, Priority, ReplicaAddress
from services.gateway.admission import AdmissionRequest, LeaseReport, Outcome
from services.gateway.orchestrator_client import OrchestratorClient
from services.orchestrator.domain import Outcome as DomainOutcome
from services.orchestrator.shedding import MIN_SAMPLES
from tests.orchestrator.serving import dns_discovered, served
from tests.orchestrator.test_clock import ready_on_manual_clock
from tests.orchestrator.test_core import settings


def admission(request_id: str, priority: Priority, model_version: str = "") -> AdmissionRequest:
    return AdmissionRequest(
        request_id=request_id,
        model=TRITON_MODEL,
        prompt_token_ids=[1, 2, 3],
        max_tokens=4,
        priority=priority,
        tenant="t",
        model_version=model_version,
    )


async def test_gateway_lease_carries_every_field_of_a_dns_discovered_replica() -> None:
    target = DnsTarget(host="localhost", port=18001, pool="long", model_version="v7")
    core, spec = await dns_discovered(target)
    request = admission("contract-1", Priority.INTERACTIVE, "v7")

    async with served(core) as address:
        client = OrchestratorClient.connect(address)
        try:
            ready = await client.status(timeout_s=5)
            assert (ready.replicas, ready.ready_replicas, ready.queue_depth) == (1, 1, 0)
            assert [k.replica.id for k in ready.known] == [spec.id]
            lease = await client.admit(request, timeout_s=5)
            assert spec.id in {st.spec.id for st in core.replicas() if st.in_flight == 1}
            client.complete(
                LeaseReport(
                    lease_id=lease.lease_id,
                    outcome=Outcome.SUCCESS,
                    prompt_tokens=3,
                    completion_tokens=4,
                    kv_cache_reused_blocks=0,
                    ttft_ms=1.0,
                )
            )
            await client.drain()
        finally:
            await client.close()

    expected = ReplicaAddress(
        id=spec.id,
        grpc_address="127.0.0.1:18001",
        pool="long",
        model_version="v7",
        authority="localhost:18001",
    )
    assert lease.replica == expected
    # Every field of the domain address is set: a field added later must be carried too.
    assert all(getattr(lease.replica, f.name) for f in dataclasses.fields(ReplicaAddress))
    assert [st.in_flight for st in core.replicas()] == [0]


async def test_an_orchestrator_behind_on_its_calls_refuses_the_gateway_with_busy() -> None:
    """The shedding's wiring end to end, on the orchestrator's manual clock: the gateway's
    client stamps its id and send time, the orchestrator reads each Admit's wait from them less
    the caller's baseline (its first call) and, behind, refuses with BUSY and its retry-after,
    which the client keeps."""
    cfg = settings(n=1, cap=64)
    cfg.shed_after_s = 0.0
    core, clock = await ready_on_manual_clock(cfg)
    sent_late_by = 0.0  # how long before now the client's stamps say it sent

    def request(i: int) -> AdmissionRequest:
        return admission(f"busy-{i}", Priority.STANDARD)

    async with served(core) as address:
        client = OrchestratorClient.connect(address, wall_clock=lambda: time.time() - sent_late_by)
        try:
            core.complete(
                (await client.admit(request(0), timeout_s=5)).lease_id, DomainOutcome.SUCCESS
            )
            sent_late_by = 0.5  # from now on every Admit waited half a second
            refusal = None
            for window in range(1, 20):  # from the 5th window (level 0.4) in proportion
                clock.t += cfg.shed_window_s
                for i in range(MIN_SAMPLES):
                    try:
                        lease = await client.admit(request(window * 10 + i), timeout_s=5)
                    except ResourceExhausted as err:
                        refusal = err
                        break
                    core.complete(lease.lease_id, DomainOutcome.SUCCESS)
                if refusal is not None:
                    break
        finally:
            await client.close()
    assert refusal is not None
    assert refusal.reason is Reason.BUSY
    assert refusal.retry_after_s == cfg.shed_retry_after_s
    assert 5 <= window <= 8  # at the 8th (level 0.7) every standard request is refused
    assert core.queue_depth == 0
