"""One arm of a comparison: a fresh LocalMesh (cold engines and caches) configured by environment
(`LLMMESH_ORCHESTRATOR_PROFILE`, a policy file, replica pools), one replay, then teardown."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from bench.calibrate import EngineShape
from bench.client import GatewayClient
from bench.replay import Progress, Result, replay
from bench.report import eprint
from bench.workloads import Request
from llmmesh.common.settings import KvBlockSettings, settings_of, to_env
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as orch_pb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2_grpc as orch_grpc
from llmmesh.localmesh import LocalMesh, MeshOptions
from services.orchestrator.settings import OrchestratorSettings

ROOT = Path(__file__).resolve().parents[1]
TRITON_STOP_GRACE_S = 3.0


@dataclass(frozen=True)
class Arm:
    name: str
    profile: str | None = None  # LLMMESH_ORCHESTRATOR_PROFILE; unset = the orchestrator's default
    policy: dict[str, Any] | None = None  # written as the policy YAML file when set
    replica_pools: list[str] | None = None


@dataclass(frozen=True)
class MeshSpec:
    replicas: int
    time_scale: float  # emulator TIME_SCALE
    shape: EngineShape = field(default_factory=EngineShape)
    context_length: int = 8192


@dataclass
class ArmRun:
    arm: Arm
    results: list[Result]
    wall_s: float
    workdir: str
    replica_status: list[dict[str, Any]]


async def wait_replicas_ready(address: str, expected: int, timeout_s: float = 60.0) -> None:
    """Poll the orchestrator until `expected` replicas are healthy (its probes run every 0.25 s
    in the local mesh), so the first requests do not meet UNAVAILABLE."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = orch_grpc.OrchestratorServiceStub(channel)
        deadline = time.monotonic() + timeout_s
        while True:
            resp = await stub.ListReplicas(orch_pb.ListReplicasRequest(), timeout=5)
            healthy = sum(1 for r in resp.replicas if r.healthy)
            if healthy >= expected:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{healthy}/{expected} replicas healthy after {timeout_s}s")
            await asyncio.sleep(0.1)  # polling a remote status; nothing to await instead


async def replica_status(address: str) -> list[dict[str, Any]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = orch_grpc.OrchestratorServiceStub(channel)
        resp = await stub.ListReplicas(orch_pb.ListReplicasRequest(), timeout=5)
        return [
            {
                "id": r.replica.id,
                "pool": r.replica.pool,
                "healthy": r.healthy,
                "completed": r.completed,
                "failures": r.failures,
            }
            for r in resp.replicas
        ]


def fresh_dir(path: Path) -> Path:
    """`path`, emptied of an earlier run's logs."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def mesh_options(arm: Arm, spec: MeshSpec, workdir: Path) -> MeshOptions:
    orch: dict[str, object] = {}
    if arm.profile is not None:
        orch["profile"] = arm.profile
    if arm.policy is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        policy_path = workdir / "policy.yaml"
        policy_path.write_text(yaml.safe_dump(arm.policy, sort_keys=False))
        orch["policy_file"] = policy_path
    return MeshOptions(
        replicas=spec.replicas,
        time_scale=spec.time_scale,
        workdir=workdir,
        emulator_env=spec.shape.env(),
        extra_env=to_env(settings_of(KvBlockSettings, block_size=spec.shape.block_size)),
        replica_pools=arm.replica_pools,
        orchestrator_env=to_env(settings_of(OrchestratorSettings, **orch)),
        context_length=spec.context_length,
    )


async def run_arm(
    arm: Arm,
    spec: MeshSpec,
    requests: Sequence[Request],
    *,
    label: str,
    workdir: Path,
    max_in_flight: int = 512,
    timeout_s: float = 600.0,
) -> ArmRun:
    mesh = LocalMesh(mesh_options(arm, spec, fresh_dir(workdir)))
    t0 = time.monotonic()
    try:
        await mesh.start()
        await wait_replicas_ready(mesh.services["orchestrator"].address, spec.replicas)
        eprint(f"[{label}] mesh up in {time.monotonic() - t0:.1f}s (logs: {workdir})")
        client = GatewayClient(mesh.services["gateway"].address, timeout_s=timeout_s)
        try:
            await client.wait_ready()
            start = time.monotonic()
            results = await replay(
                requests,
                client,
                max_in_flight=max_in_flight,
                progress=Progress(label, len(requests)),
                request_id_prefix=label.replace(" ", "_"),
            )
            wall = time.monotonic() - start
        finally:
            await client.close()
        status = await replica_status(mesh.services["orchestrator"].address)
    finally:
        t1 = time.monotonic()
        # After serving traffic an emulated replica does not finish unloading its model within
        # TritonServer.stop's 15 s grace (it is then killed anyway); the run's data is collected,
        # so give it TRITON_STOP_GRACE_S instead of waiting 15 s per replica set. Supervision
        # ends first: these exits are no crashes to restart.
        await mesh.supervisor.close()
        await asyncio.gather(
            *(t.stop(grace_s=TRITON_STOP_GRACE_S) for t in mesh.tritons if t.is_running),
            return_exceptions=True,
        )
        await mesh.stop()
        eprint(f"[{label}] mesh stopped in {time.monotonic() - t1:.1f}s")
    return ArmRun(arm, results, wall, str(workdir), status)
