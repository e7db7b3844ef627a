"""`python -m services.gateway`: build settings once, wire one core → gRPC servicer and OpenAI
HTTP front → both servers, which start together and drain together on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path

import grpc
import uvloop

from llmmesh.common.server import ManagedServer, ServiceRegistration
from llmmesh.common.settings import KvBlockSettings
from llmmesh.common.telemetry import setup_logging, setup_tracing, start_metrics_server
from llmmesh.gateway.v1 import gateway_pb2
from llmmesh.orchestrator.v1 import orchestrator_pb2_grpc
from services.gateway.auth import Authenticator
from services.gateway.core import GatewayCore
from services.gateway.http import OpenAIHttpFront
from services.gateway.models import ServedModel
from services.gateway.servicer import GatewayServicer, add_to_server
from services.gateway.settings import GatewaySettings
from services.gateway.triton_stream import TritonPool

SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
log = logging.getLogger(__name__)


def write_ready_file(path: Path, ports: dict[str, int]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ports))
    tmp.replace(path)


async def main(settings: GatewaySettings, blocks: KvBlockSettings) -> None:
    setup_logging("gateway", settings.log_level, settings.log_json)
    provider = setup_tracing("gateway", settings.otlp_endpoint, settings.trace_sample_ratio)
    if not settings.models:
        raise SystemExit("gateway: no models configured (set LLMMESH_GATEWAY_MODELS)")
    models = [ServedModel.load(m) for m in settings.models]
    auth = None if settings.tenants_file is None else Authenticator.from_file(settings.tenants_file)
    if auth is None:
        log.warning("authentication is off (no LLMMESH_GATEWAY_TENANTS_FILE)")
    else:
        log.info("authentication on", extra={"tenants": sorted(auth.tenants)})
    channel = grpc.aio.insecure_channel(settings.orchestrator_address)
    triton = TritonPool()
    core = GatewayCore(
        settings,
        models,
        orchestrator_pb2_grpc.OrchestratorServiceStub(channel),
        triton,
        blocks.block_size,
        auth,
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
    )
    http = OpenAIHttpFront(core, settings)
    metrics_port = start_metrics_server(settings.host, settings.metrics_port)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    await server.start()
    await http.start()
    ports = {"grpc_port": server.port, "http_port": http.port, "metrics_port": metrics_port}
    if settings.ready_file is not None:
        write_ready_file(settings.ready_file, ports)
    log.info("serving", extra=ports)
    await stop_requested.wait()
    # Both fronts stop accepting at once and drain their in-flight streams in parallel.
    log.info("draining", extra={"service": "gateway"})
    await asyncio.gather(server.stop(), http.stop())
    await core.drain_background()
    await triton.close()
    await channel.close(None)
    provider.shutdown()
    log.info("stopped")


if __name__ == "__main__":
    uvloop.run(main(GatewaySettings(), KvBlockSettings()))
