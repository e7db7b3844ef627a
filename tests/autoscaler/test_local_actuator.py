"""The local actuator without processes: replicas whose start never ran, lease counts."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc

from llmmesh.common.topology import PoolKey
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as orch_pb
from llmmesh.localmesh import EMULATOR_REPOSITORY
from services.autoscaler.actuators.contracts import ReplicaCounts
from services.autoscaler.actuators.local import LocalActuator
from services.autoscaler.actuators.local_settings import LocalActuatorSettings, ManagedPool

KEY = PoolKey("auto", "v1")


def settings(log_dir: Path) -> LocalActuatorSettings:
    return LocalActuatorSettings(
        orchestrator_address="127.0.0.1:9",  # never reached: no start runs in these tests
        log_dir=log_dir,
        pools=[
            ManagedPool(
                pool=KEY.pool,
                model_version=KEY.model_version,
                model_repository=EMULATOR_REPOSITORY,
                models=["tensorrt_llm"],
            )
        ],
    )


async def test_replicas_cancelled_before_their_start_ran_leave_the_pool(tmp_path: Path) -> None:
    actuator = LocalActuator(settings(tmp_path))
    try:
        # Up then down with nothing in between that lets the start tasks run (as one round's
        # observe then apply): cancelled before they ran, they never reach their own cleanup.
        await actuator.apply(KEY, 2, "up")
        await actuator.apply(KEY, 0, "down")
        for _ in range(3):
            await asyncio.sleep(0)
        assert (await actuator.observe())[KEY] == ReplicaCounts(ready=0)
    finally:
        await actuator.close()


async def test_lease_counts_are_asked_of_every_orchestrator_at_once(tmp_path: Path) -> None:
    # One orchestrator hangs; the other is asked while it does (one after the other, a scale-down
    # waited a whole timeout per orchestrator that does not answer), and its counts are used.
    hung_entered, hung_done, release = asyncio.Event(), asyncio.Event(), asyncio.Event()
    overlapped: list[bool] = []

    async def hung(request: orch_pb.ListReplicasRequest, context: object) -> object:
        hung_entered.set()
        try:
            await release.wait()
            return orch_pb.ListReplicasResponse()
        finally:
            hung_done.set()

    async def answering(request: orch_pb.ListReplicasRequest, context: object) -> object:
        await asyncio.wait_for(hung_entered.wait(), 10)
        overlapped.append(not hung_done.is_set())
        status = orch_pb.ReplicaStatus(in_flight=3)
        status.replica.id = "r-1"
        return orch_pb.ListReplicasResponse(replicas=[status])

    servers, addresses = [], []
    for handler in (hung, answering):
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "llmmesh.orchestrator.v1.OrchestratorService",
                    {
                        "ListReplicas": grpc.unary_unary_rpc_method_handler(
                            handler,
                            request_deserializer=orch_pb.ListReplicasRequest.FromString,
                            response_serializer=orch_pb.ListReplicasResponse.SerializeToString,
                        )
                    },
                ),
            )
        )
        addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
        await server.start()
        servers.append(server)
    actuator = LocalActuator(
        settings(tmp_path).model_copy(
            update={"orchestrator_address": addresses[0], "orchestrator_addresses": addresses}
        )
    )
    try:
        assert await actuator._in_flight() == {"r-1": 3}
        assert overlapped == [True]
    finally:
        release.set()
        await actuator.close()
        for server in servers:
            await server.stop(None)


class _Crashed:
    """A tritonserver that passed readiness and registration, then died (SIGABRT)."""

    grpc_address = "127.0.0.1:1"
    metrics_url = "http://127.0.0.1:1/metrics"
    pid = None
    is_running = False
    returncode = -6

    async def stop(self, grace_s: float = 0.0) -> int:
        return -6


async def test_a_replica_that_crashes_once_ready_is_not_replaced_in_a_loop(
    tmp_path: Path,
) -> None:
    """Each replacement passes readiness and dies: its pool waits before the next start (the
    autoscaler asks for the count every round), and says why."""
    actuator = LocalActuator(settings(tmp_path).model_copy(update={"retry_backoff_s": 30.0}))
    launches: list[str] = []

    async def launch(pool: object, r: Any) -> None:
        launches.append(r.id)
        r.server = _Crashed()

    actuator._launch = launch  # type: ignore[method-assign]
    try:
        for _ in range(6):  # autoscaler rounds, their interval skipped
            await actuator.observe()
            await actuator.apply(KEY, 1, "min_replicas")
            for _ in range(5):
                await asyncio.sleep(0)
        assert len(launches) == 1  # its replacement waits (30 s, twice that after the next)
        error = actuator.last_error(KEY)
        assert error is not None
        assert "exited with -6" in error
    finally:
        await actuator.close()
