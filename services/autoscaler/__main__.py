"""`python -m services.autoscaler`: build settings once, wire core → servicer → server."""

from __future__ import annotations

import asyncio
import contextlib

import uvloop

from llmmesh.autoscaler.v1 import autoscaler_pb2, autoscaler_pb2_grpc
from llmmesh.common.server import ManagedServer, ServiceRegistration, run_until_signal
from llmmesh.common.telemetry import setup_logging, setup_tracing, start_metrics_server
from llmmesh.keda import externalscaler_pb2, externalscaler_pb2_grpc
from services.autoscaler.core import Autoscaler
from services.autoscaler.keda import KedaScalerServicer
from services.autoscaler.servicer import AutoscalerServicer
from services.autoscaler.settings import AutoscalerSettings

SERVICE = autoscaler_pb2.DESCRIPTOR.services_by_name["AutoscalerService"].full_name
KEDA_SERVICE = externalscaler_pb2.DESCRIPTOR.services_by_name["ExternalScaler"].full_name


async def main(settings: AutoscalerSettings) -> None:
    setup_logging("autoscaler", settings.log_level, settings.log_json)
    provider = setup_tracing("autoscaler", settings.otlp_endpoint, settings.trace_sample_ratio)
    core = Autoscaler(settings)
    servicer = AutoscalerServicer(core)
    keda = KedaScalerServicer(core, settings)
    server = ManagedServer(
        host=settings.host,
        port=settings.grpc_port,
        services=[
            ServiceRegistration(
                SERVICE,
                lambda s: autoscaler_pb2_grpc.add_AutoscalerServiceServicer_to_server(servicer, s),
            ),
            ServiceRegistration(
                KEDA_SERVICE,
                lambda s: externalscaler_pb2_grpc.add_ExternalScalerServicer_to_server(keda, s),
            ),
        ],
        drain_seconds=settings.drain_seconds,
    )
    metrics_port = start_metrics_server(settings.host, settings.metrics_port)
    await server.start()
    loop_task = asyncio.create_task(core.run())

    async def on_stop() -> None:
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
        provider.shutdown()

    await run_until_signal(
        server,
        service="autoscaler",
        metrics_port=metrics_port,
        ready_file=settings.ready_file,
        on_stop=on_stop,
    )


if __name__ == "__main__":
    uvloop.run(main(AutoscalerSettings()))
