"""The whole loop on real processes: a pool at zero replicas, run by the autoscaler service with
the local actuator. A request waits in the orchestrator (activator), the autoscaler sees the
queued demand and scales from zero, the new replica serves the request; once idle, the pool
goes back to zero and its Triton process exits cleanly."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from llmmesh.generated.autoscaler.v1 import autoscaler_pb2 as as_pb
from llmmesh.generated.autoscaler.v1 import autoscaler_pb2_grpc as as_grpc
from llmmesh.generated.gateway.v1 import gateway_pb2 as gw_pb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as orch_pb
from llmmesh.localmesh import MODEL_NAME, AutoscaledPool
from tests.integration.conftest import Mesh, eventually, start_mesh

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

POOL, VERSION = "auto", "v1"
IDLE_S = 3.0


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mesh(tokenizer_path: Path) -> AsyncIterator[Mesh]:
    m = await start_mesh(
        tokenizer_path,
        replicas=0,
        autoscaled_pools=[
            AutoscaledPool(
                pool=POOL,
                min_replicas=0,
                max_replicas=1,
                initial_replicas=0,
                # Far longer than a replica's start on a loaded machine.
                activation_timeout_s=300.0,
                policy={
                    "scale_to_zero_idle_s": IDLE_S,
                    "cooldown_s": 0.0,
                    "scale_down_window_s": 0.0,
                },
            )
        ],
        extra_env={"LLMMESH_AUTOSCALER_RATE_WINDOW_S": "5"},
    )
    yield m
    await m.close()
    await m.mesh.stop()


async def decisions(mesh: Mesh, changes_only: bool = True) -> list[as_pb.PoolRecommendation]:
    async with grpc.aio.insecure_channel(mesh.mesh.services["autoscaler"].address) as ch:
        resp = await as_grpc.AutoscalerServiceStub(ch).ListDecisions(
            as_pb.ListDecisionsRequest(
                pool=POOL, model_version=VERSION, changes_only=changes_only, limit=1024
            ),
            timeout=5,
        )
    return list(resp.decisions)


async def latest(mesh: Mesh) -> as_pb.PoolRecommendation | None:
    async with grpc.aio.insecure_channel(mesh.mesh.services["autoscaler"].address) as ch:
        resp = await as_grpc.AutoscalerServiceStub(ch).GetRecommendations(
            as_pb.GetRecommendationsRequest(), timeout=5
        )
    return next((p for p in resp.pools if (p.pool, p.model_version) == (POOL, VERSION)), None)


async def test_scale_from_zero_serves_then_back_to_zero(mesh: Mesh) -> None:
    async def at_zero() -> bool:
        rec = await latest(mesh)
        return (
            rec is not None
            and rec.desired_replicas == 0
            and (rec.ready_replicas, rec.starting_replicas, rec.draining_replicas) == (0, 0, 0)
        )

    await eventually(at_zero, timeout_s=60, what="the pool starts at zero replicas")
    listed = await mesh.orchestrator.ListReplicas(orch_pb.ListReplicasRequest(), timeout=5)
    assert not listed.replicas

    req = gw_pb.GenerateRequest(
        model=MODEL_NAME,
        token_ids=gw_pb.TokenIds(ids=list(range(500, 540))),
        sampling=gw_pb.SamplingParams(max_tokens=16),
    )
    msgs = [m async for m in mesh.gateway.Generate(req, timeout=300)]
    done = msgs[-1].complete
    assert done.usage.completion_tokens == 16
    assert done.replica_id  # served by the replica the actuator started

    causes = [d.cause for d in await decisions(mesh)]
    assert "from_zero" in causes

    async def ttft_seen() -> bool:
        # More requests until one's TTFT lands between two of the autoscaler's gateway reads (a
        # series' first sample carries no increase, as in Prometheus).
        again = [m async for m in mesh.gateway.Generate(req, timeout=300)]
        assert again[-1].complete.usage.completion_tokens == 16
        history = await decisions(mesh, changes_only=False)
        return any(d.signals.HasField("ttft_p90_seconds") for d in history)

    await eventually(ttft_seen, timeout_s=120, what="the gateway's TTFT reached the decisions")

    await eventually(at_zero, timeout_s=120, what="the idle pool went back to zero")
    assert "to_zero" in [d.cause for d in await decisions(mesh)]
    # While it ran, the replica the actuator started was scraped (engine gauges).
    history = await decisions(mesh, changes_only=False)
    assert any(d.signals.reporting_replicas == 1 for d in history)
    listed = await mesh.orchestrator.ListReplicas(orch_pb.ListReplicasRequest(), timeout=5)
    assert done.replica_id not in [r.replica.id for r in listed.replicas]
