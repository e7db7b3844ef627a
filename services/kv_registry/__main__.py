"""`python -m services.kv_registry`: build settings and metrics once, wire core → servicer →
server."""

from __future__ import annotations

import asyncio
import contextlib
import time

import uvloop
from prometheus_client import REGISTRY

from llmmesh.common.server import ManagedServer, ServiceRegistration, run_until_signal
from llmmesh.common.settings import KvBlockSettings
from llmmesh.common.telemetry import setup_logging, setup_tracing, start_metrics_server
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2, kvregistry_pb2_grpc
from services.kv_registry.core import KvRegistry
from services.kv_registry.metrics import PrometheusMetrics
from services.kv_registry.servicer import KvRegistryServicer, run_maintenance
from services.kv_registry.settings import KvRegistrySettings

SERVICE = kvregistry_pb2.DESCRIPTOR.services_by_name["KvRegistryService"].full_name


async def main(settings: KvRegistrySettings, blocks: KvBlockSettings) -> None:
    setup_logging("kv_registry", settings.log_level, settings.log_json)
    provider = setup_tracing("kv_registry", settings.otlp_endpoint, settings.trace_sample_ratio)
    metrics = PrometheusMetrics(REGISTRY)
    core = KvRegistry(settings, blocks.block_config(), clock=time.monotonic, metrics=metrics)
    metrics.watch(core)
    servicer = KvRegistryServicer(core, settings.watch_backlog)
    server = ManagedServer(
        host=settings.host,
        port=settings.grpc_port,
        services=[
            ServiceRegistration(
                SERVICE,
                lambda s: kvregistry_pb2_grpc.add_KvRegistryServiceServicer_to_server(servicer, s),
            )
        ],
        drain_seconds=settings.drain_seconds,
    )
    metrics_port = start_metrics_server(settings.host, settings.metrics_port)
    await server.start()
    maintenance = asyncio.create_task(
        run_maintenance(core, settings.maintenance_interval_s, settings.maintenance_batch)
    )

    async def on_stop() -> None:
        maintenance.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await maintenance
        await servicer.applied()  # batches whose calls ended with the server
        provider.shutdown()

    await run_until_signal(
        server,
        service="kv_registry",
        metrics_port=metrics_port,
        ready_file=settings.ready_file,
        on_stop=on_stop,
        drain_with=(servicer.end_streams,),
    )


if __name__ == "__main__":
    uvloop.run(main(KvRegistrySettings(), KvBlockSettings()))
