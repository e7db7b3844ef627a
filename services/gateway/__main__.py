"""`python -m services.gateway`: build settings once, wire one core → gRPC servicer and OpenAI
HTTP front → both servers, which start together and drain together on SIGTERM."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import uvloop

from llmmesh.common.discovery import resolve_ipv4
from llmmesh.common.server import ManagedServer, ServiceRegistration, run_until_signal
from llmmesh.common.settings import KvBlockSettings
from llmmesh.common.telemetry import setup_logging, setup_tracing, start_metrics_server
from llmmesh.generated.gateway.v1 import gateway_pb2
from llmmesh.kvblocks import ChunkedHashes
from services.gateway.auth import Authenticator
from services.gateway.core import GatewayCore
from services.gateway.http import OpenAIHttpFront
from services.gateway.models import ServedModel
from services.gateway.orchestrator_client import OrchestratorClient
from services.gateway.orchestrators import Member, OrchestratorSet
from services.gateway.servicer import GatewayServicer, add_to_server
from services.gateway.settings import GatewaySettings
from services.gateway.triton_stream import TritonPool
from services.gateway.usage import UsageLog

SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
log = logging.getLogger(__name__)


async def main(settings: GatewaySettings, blocks: KvBlockSettings) -> None:
    setup_logging("gateway", settings.log_level, settings.log_json)
    provider = setup_tracing("gateway", settings.otlp_endpoint, settings.trace_sample_ratio)
    if not settings.models:
        raise SystemExit("gateway: no models configured (set LLMMESH_GATEWAY_MODELS)")
    models = [ServedModel.load(m) for m in settings.models]
    auth = Authenticator.from_settings(settings)
    if auth is None:
        log.warning("authentication is off (no LLMMESH_GATEWAY_TENANTS_FILE)")
    else:
        log.info("authentication on", extra={"tenants": sorted(auth.tenants)})
    usage = (
        None
        if settings.usage_log_path is None
        else UsageLog(settings.usage_log_path, settings.usage_queue_size)
    )
    if usage is not None:
        await usage.start()
        log.info("usage log on", extra={"path": str(settings.usage_log_path)})
    orchestrator = orchestrators(settings, ChunkedHashes(blocks.block_config()))
    await orchestrator.start()
    triton = TritonPool()
    core = GatewayCore(
        settings,
        models,
        orchestrator,
        triton,
        blocks.block_size,
        auth,
        usage,
    )
    servicer = GatewayServicer(core)
    server = ManagedServer(
        host=settings.host,
        port=settings.grpc_port,
        services=[
            ServiceRegistration(
                SERVICE,
                lambda s: add_to_server(servicer, s),
            )
        ],
        drain_seconds=settings.drain_seconds,
        max_receive_bytes=settings.grpc_max_request_bytes,
        # A call waiting for a busy loop to take it waits as long as its deadline may be.
        max_unaccepted_s=settings.max_request_timeout_s,
    )
    http = OpenAIHttpFront(core, settings)
    metrics_port = start_metrics_server(settings.host, settings.metrics_port)
    await server.start()
    await http.start()

    async def on_stop() -> None:
        # Fronts drained: end what only the idempotency store still runs, then write out
        # every usage record (fsync) before the process exits, whatever the rest does.
        async with contextlib.AsyncExitStack() as stack:  # each runs whatever the others do
            stack.callback(provider.shutdown)
            stack.push_async_callback(orchestrator.close)
            stack.push_async_callback(triton.close)
            if usage is not None:
                stack.push_async_callback(usage.close)
            await core.close()

    # Both fronts stop accepting at once and drain their in-flight streams in parallel.
    await run_until_signal(
        server,
        service="gateway",
        metrics_port=metrics_port,
        ready_file=settings.ready_file,
        on_stop=on_stop,
        extra_ports={"http_port": http.port},
        drain_with=[http.stop],
        hurry_with=[http.stop_now],
    )


def orchestrators(settings: GatewaySettings, hasher: ChunkedHashes) -> OrchestratorSet:
    """Every orchestrator as one admission client: the pods behind `orchestrator_dns` (dialled
    at their IPs with the Service's host:port as :authority), else `orchestrator_addresses`,
    else `orchestrator_address`. `hasher` (shared: its chunk cache serves every orchestrator's
    client) hashes the prompts of the Admits sent on an AdmitStream."""

    def make(
        factory: Callable[[str], Member],
        addresses: list[str],
        discover: Callable[[], Awaitable[list[str]]] | None = None,
    ) -> OrchestratorSet:
        return OrchestratorSet(
            factory,
            addresses,
            discover=discover,
            degraded_mode=settings.degraded_mode,
            view_max_age_s=settings.degraded_view_max_age_s,
            retry_after_s=settings.orchestrator_retry_after_s,
            refresh_interval_s=settings.orchestrator_refresh_interval_s,
            status_timeout_s=settings.readiness_timeout_s,
        )

    target = settings.orchestrator_dns

    def dial(address: str) -> Member:
        return OrchestratorClient.connect(
            address,
            authority=target or "",
            admit_stream=settings.orchestrator_admit_stream,
            hasher=hasher,
        )

    if target:
        host, _, port = target.rpartition(":")

        async def discover() -> list[str]:
            return [f"{ip}:{port}" for ip in await resolve_ipv4(host, int(port))]

        return make(dial, [], discover)
    return make(dial, settings.orchestrator_addresses or [settings.orchestrator_address])


if __name__ == "__main__":
    uvloop.run(main(GatewaySettings(), KvBlockSettings()))
