"""An orchestrator core served on an ephemeral port, with a stub over a real channel."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from llmmesh.common.discovery import DnsTarget
from llmmesh.common.server import ManagedServer, ServiceRegistration
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from services.orchestrator.director import Orchestrator
from services.orchestrator.discovery import discover
from services.orchestrator.servicer import OrchestratorServicer
from services.orchestrator.settings import OrchestratorSettings, ReplicaSpec
from tests.orchestrator.test_core import FakeProbe


@contextlib.asynccontextmanager
async def served(
    core: Orchestrator, servicer: OrchestratorServicer | None = None
) -> AsyncIterator[str]:
    """The core's OrchestratorService (through `servicer` when given) on an ephemeral port;
    yields its address."""
    service = OrchestratorServicer(core) if servicer is None else servicer
    server = ManagedServer(
        host="127.0.0.1",
        port=0,
        services=[
            ServiceRegistration(
                "llmmesh.orchestrator.v1.OrchestratorService",
                lambda s: pb_grpc.add_OrchestratorServiceServicer_to_server(service, s),
            )
        ],
        drain_seconds=0,
    )
    port = await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def serve(
    core: Orchestrator, servicer: OrchestratorServicer | None = None
) -> AsyncIterator[pb_grpc.OrchestratorServiceAsyncStub]:
    async with served(core, servicer) as address, grpc.aio.insecure_channel(address) as channel:
        yield pb_grpc.OrchestratorServiceStub(channel)


async def dns_discovered(target: DnsTarget) -> tuple[Orchestrator, ReplicaSpec]:
    """A core whose one replica was discovered through `target` (resolving to one address) and
    probed ready. The target's port is only written into addresses; nothing dials it."""
    cfg = OrchestratorSettings(replica_dns=[target])
    probe = FakeProbe()
    core = Orchestrator(cfg, probe)
    discovered = await discover(cfg)
    core.sync_replicas(discovered)
    probe.ready_ids = {s.id for s in discovered}
    await core.probe_once()
    (spec,) = discovered
    return core, spec
