"""The gateway↔orchestrator contract end to end: the real orchestrator core and servicer on an
ephemeral port, the gateway's real `OrchestratorClient` over a real channel. Every `Replica`
field the orchestrator knows must reach the gateway's lease; in Kubernetes the `authority` is
what makes the sidecar apply the headless Service's mTLS policy to the Triton stream."""

from __future__ import annotations

import asyncio
import dataclasses

from llmmesh.common.discovery import DnsTarget
from llmmesh.common.errors import Reason, ResourceExhausted
from llmmesh.common.topology import TRITON_MODEL, Priority, ReplicaAddress
from services.gateway.admission import AdmissionRequest, LeaseReport, Outcome
from services.gateway.orchestrator_client import OrchestratorClient
from services.orchestrator.director import Orchestrator
from services.orchestrator.domain import Outcome as DomainOutcome
from tests.orchestrator.serving import dns_discovered, served
from tests.orchestrator.test_core import FakeProbe, settings


async def test_gateway_lease_carries_every_field_of_a_dns_discovered_replica() -> None:
    target = DnsTarget(host="localhost", port=18001, pool="long", model_version="v7")
    core, spec = await dns_discovered(target)
    request = AdmissionRequest(
        request_id="contract-1",
        model=TRITON_MODEL,
        prompt_token_ids=[1, 2, 3],
        max_tokens=4,
        priority=Priority.INTERACTIVE,
        tenant="t",
        model_version="v7",
    )

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
    """The shedding's wiring end to end: the gateway's client sends its id and send time,
    the orchestrator reads each Admit's wait from them and, behind (rounds of 50 Admits at once
    against a 1 ms target: each round's later calls wait behind its earlier ones), refuses with
    BUSY and its retry-after, which the client keeps."""
    probe = FakeProbe()
    cfg = settings(n=1, cap=64)
    cfg.shed_sojourn_s, cfg.shed_window_s, cfg.shed_after_s = 0.001, 0.001, 0.005
    core = Orchestrator(cfg, probe)
    probe.ready_ids = {"r0"}
    await core.probe_once()

    def request(i: int) -> AdmissionRequest:
        return AdmissionRequest(
            request_id=f"busy-{i}",
            model=TRITON_MODEL,
            prompt_token_ids=[1, 2, 3],
            max_tokens=4,
            priority=Priority.STANDARD,
            tenant="t",
            model_version="",
        )

    refusals: list[ResourceExhausted] = []
    async with served(core) as address:
        client = OrchestratorClient.connect(address)
        try:
            for round_ in range(40):
                results = await asyncio.gather(
                    *(client.admit(request(round_ * 50 + i), timeout_s=5) for i in range(50)),
                    return_exceptions=True,
                )
                for r in results:
                    if isinstance(r, ResourceExhausted):
                        refusals.append(r)
                    elif isinstance(r, BaseException):
                        raise r
                    else:
                        core.complete(r.lease_id, DomainOutcome.SUCCESS)
                if refusals:
                    break
        finally:
            await client.close()
    assert refusals
    assert all(r.reason is Reason.BUSY for r in refusals)
    assert all(r.retry_after_s == cfg.shed_retry_after_s for r in refusals)
    assert core.queue_depth == 0
