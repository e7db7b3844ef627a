"""The local actuator on real processes: tritonserver (emulator) replicas it starts and stops, a
real orchestrator (with a scale-from-zero pool), gateway and kv_registry. The actuator runs
in-process and is driven through its contract (`apply`, `observe`, `close`)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from bench.chaos import backend_stubs
from llmmesh.common import metric_names as names
from llmmesh.common.topology import TRITON_MODEL, PoolKey
from llmmesh.generated.gateway.v1 import gateway_pb2 as gw_pb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as pb
from llmmesh.localmesh import EMULATOR_REPOSITORY, MODEL_NAME
from services.autoscaler.actuators.contracts import ReplicaCounts
from services.autoscaler.actuators.local import LocalActuator, ReplicaPhase
from services.autoscaler.actuators.local_settings import LocalActuatorSettings, ManagedPool
from services.orchestrator.policy import Policy, ScaleFromZeroPolicy
from tests.integration.conftest import Mesh, eventually, metric, start_mesh

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

AUTO = PoolKey("auto", "v1")
COLD_ACTIVATION_S = 1.0  # the "cold" pool: declared scale-from-zero, never scaled up
STREAM_TOKENS = 400


@dataclass
class Rig:
    mesh: Mesh
    actuator: LocalActuator


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def rig(tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    workdir = tmp_path_factory.mktemp("actuator")
    policy = Policy(
        scale_from_zero={
            # Far longer than a replica's start on a loaded machine: the test scales it up.
            "auto": ScaleFromZeroPolicy(
                activation_timeout_s=600, model_version="v1", models=[TRITON_MODEL]
            ),
            "cold": ScaleFromZeroPolicy(
                activation_timeout_s=COLD_ACTIVATION_S,
                model_version="cold-v1",
                models=[TRITON_MODEL],
            ),
        }
    )
    policy_file = workdir / "policy.json"
    policy_file.write_text(policy.model_dump_json(include={"scale_from_zero"}))
    mesh = await start_mesh(
        tokenizer_path,
        replicas=0,
        workdir=workdir / "mesh",
        orchestrator_env={"LLMMESH_ORCHESTRATOR_POLICY_FILE": str(policy_file)},
    )
    actuator = LocalActuator(
        LocalActuatorSettings(
            orchestrator_address=mesh.mesh.services["orchestrator"].address,
            kv_registry_address=mesh.mesh.services["kv_registry"].address,
            engine_env={"LLMMESH_KV_BLOCK_SIZE": os.environ.get("LLMMESH_KV_BLOCK_SIZE", "32")},
            log_dir=workdir / "replicas",
            pools=[
                ManagedPool(
                    pool="auto",
                    model_version="v1",
                    model_repository=EMULATOR_REPOSITORY,
                    models=[TRITON_MODEL],
                )
            ],
        )
    )
    try:
        yield Rig(mesh, actuator)
    finally:
        await actuator.close()
        await mesh.close()
        await mesh.mesh.stop()


def admit(model_version: str) -> pb.AdmitRequest:
    return pb.AdmitRequest(
        request_id=f"admit-{model_version}",
        model=TRITON_MODEL,
        prompt_token_ids=[1, 2, 3, 4],
        max_tokens=8,
        model_version=model_version,
    )


async def replicas(rig: Rig) -> dict[str, pb.ReplicaStatus]:
    listed = await rig.mesh.orchestrator.ListReplicas(pb.ListReplicasRequest(), timeout=10)
    return {s.replica.id: s for s in listed.replicas}


async def counts(rig: Rig) -> ReplicaCounts:
    return (await rig.actuator.observe())[AUTO]


async def generate(rig: Rig, rid: str, max_tokens: int) -> gw_pb.GenerationComplete:
    """A whole stream through the gateway; its completion message."""
    request = gw_pb.GenerateRequest(
        model=MODEL_NAME,
        text=f"Stream {rid}",
        request_id=rid,
        sampling=gw_pb.SamplingParams(max_tokens=max_tokens),
    )
    tokens = 0
    complete: gw_pb.GenerationComplete | None = None
    async for msg in rig.mesh.gateway.Generate(request, timeout=240):
        if msg.HasField("delta"):
            tokens += len(msg.delta.token_ids)
        else:
            complete = msg.complete
    assert complete is not None, f"{rid}: stream ended without its completion"
    assert tokens == max_tokens == complete.usage.completion_tokens, rid
    assert complete.finish_reason == gw_pb.FINISH_REASON_LENGTH, rid
    return complete


@pytest.mark.timeout(60)
async def test_no_ready_replica_within_activation_timeout_is_unavailable(rig: Rig) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rig.mesh.orchestrator.Admit(admit("cold-v1"), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (
        f"pool 'cold' has no ready replica; none became ready within {COLD_ACTIVATION_S:g} s"
        in (info.value.details() or "")
    )


@pytest.mark.timeout(400)
async def test_scale_from_zero_admit_waits_then_routes_to_the_started_replica(rig: Rig) -> None:
    assert await counts(rig) == ReplicaCounts(ready=0)
    waiting = asyncio.ensure_future(rig.mesh.orchestrator.Admit(admit("v1"), timeout=300))

    async def queued() -> bool:
        listed = await rig.mesh.orchestrator.ListReplicas(pb.ListReplicasRequest(), timeout=10)
        return listed.queue_depth == 1

    await eventually(queued, what="the Admit waits for the empty scale-from-zero pool")
    orch = rig.mesh.mesh.services["orchestrator"]
    metrics_url = f"http://127.0.0.1:{orch.metrics_port}/metrics"
    assert metric(metrics_url, names.ORCH_POOL_QUEUE_DEPTH, pool="auto") == 1

    await rig.actuator.apply(AUTO, 1, "test: scale from zero")
    assert (await counts(rig)).starting == 1
    lease = await waiting
    (started,) = rig.actuator.replicas()
    assert lease.replica.id == started.id
    await rig.mesh.orchestrator.Complete(
        pb.CompleteRequest(lease_id=lease.lease_id, outcome=pb.OUTCOME_SUCCESS), timeout=10
    )
    await eventually(
        lambda: _counts_are(rig, ReplicaCounts(ready=1)), what="the actuator reports it ready"
    )
    status = (await replicas(rig))[started.id]
    assert (status.registered, status.healthy, status.draining) == (True, True, False)
    assert metric(metrics_url, names.ORCH_POOL_READY, pool="auto") == 1

    # The gateway's traffic goes to it too, and the same apply is a no-op.
    assert (await generate(rig, "after-scale-up", 16)).replica_id == started.id
    await rig.actuator.apply(AUTO, 1, "test: same count again")
    assert await counts(rig) == ReplicaCounts(ready=1)


async def _counts_are(rig: Rig, expected: ReplicaCounts) -> bool:
    return await counts(rig) == expected


@pytest.mark.timeout(300)
async def test_a_replica_whose_backend_stub_died_is_killed_and_replaced(rig: Rig) -> None:
    """Triton keeps reporting a replica ready after its Python-backend stub died: the actuator's
    liveness probe (one token through the model) catches it, kills it, and the next apply of the
    same count starts a replacement that serves."""
    (victim,) = [r for r in rig.actuator.replicas() if r.phase is ReplicaPhase.READY]
    assert victim.pid is not None
    stubs = backend_stubs(victim.pid)
    assert stubs, "no backend stub under the replica's tritonserver"
    for pid in stubs:
        os.kill(pid, signal.SIGKILL)

    async def gone() -> bool:
        await counts(rig)  # observe: probes liveness, notices the killed process
        return any(
            r.id == victim.id and r.phase is ReplicaPhase.STOPPED for r in rig.actuator.replicas()
        )

    await eventually(gone, timeout_s=60, what="the stubless replica killed and forgotten")
    await rig.actuator.apply(AUTO, 1, "test: replace the lost replica")
    await eventually(
        lambda: _counts_are(rig, ReplicaCounts(ready=1)),
        timeout_s=200,
        what="a replacement ready",
    )
    (fresh,) = [r for r in rig.actuator.replicas() if r.phase is ReplicaPhase.READY]
    assert fresh.id != victim.id
    assert (await generate(rig, "after-replacement", 8)).replica_id == fresh.id


@pytest.mark.timeout(500)
async def test_scale_down_drains_streams_before_stopping(rig: Rig) -> None:
    await rig.actuator.apply(AUTO, 2, "test: two replicas")
    await eventually(
        lambda: _counts_are(rig, ReplicaCounts(ready=2)),
        timeout_s=300,
        what="two ready replicas",
    )
    streams = [asyncio.ensure_future(generate(rig, f"long-{i}", STREAM_TOKENS)) for i in range(4)]

    async def both_busy() -> bool:
        return all(s.in_flight > 0 for s in (await replicas(rig)).values())

    await eventually(both_busy, what="streams on both replicas")
    await rig.actuator.apply(AUTO, 1, "test: scale down under load")
    (victim,) = [r for r in rig.actuator.replicas() if r.phase is ReplicaPhase.STOPPING]
    (keeper,) = [r for r in rig.actuator.replicas() if r.phase is ReplicaPhase.READY]
    assert await counts(rig) == ReplicaCounts(ready=1, draining=1)

    # The drain reaches the orchestrator from the actuator's background task (`apply` returns
    # once the replica left the ready phase); a replica already drained is deregistered.
    async def victim_draining() -> bool:
        status = (await replicas(rig)).get(victim.id)
        return status is None or status.draining

    await eventually(victim_draining, what="the orchestrator draining the victim")
    # New work goes to the other replica while the victim's streams finish.
    assert (await generate(rig, "during-drain", 8)).replica_id == keeper.id
    done = await asyncio.gather(*streams)
    assert {c.replica_id for c in done} == {victim.id, keeper.id}

    async def victim_stopped() -> bool:
        return any(
            r.id == victim.id and r.phase is ReplicaPhase.STOPPED for r in rig.actuator.replicas()
        )

    await eventually(victim_stopped, timeout_s=120, what="the drained replica stopped")
    (stopped,) = [r for r in rig.actuator.replicas() if r.id == victim.id]
    # Drained, then SIGTERM: Triton unloads the model and exits cleanly (no stream left open).
    assert stopped.exit_code == 0
    assert victim.id not in await replicas(rig)
    assert await counts(rig) == ReplicaCounts(ready=1)

    await rig.actuator.close()
    assert await counts(rig) == ReplicaCounts(ready=0)
    # Both of this test's replicas stopped cleanly (the one killed for its liveness is -9).
    assert {r.exit_code for r in rig.actuator.replicas() if r.id in (victim.id, keeper.id)} == {0}
    assert not await replicas(rig)
