"""`python -m services.orchestrator`: build settings once, wire core → servicer → server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import uvloop

from llmmesh.common.server import ManagedServer, ServiceRegistration, run_until_signal
from llmmesh.common.settings import KvBlockSettings
from llmmesh.common.telemetry import setup_logging, setup_tracing, start_metrics_server
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from services.orchestrator.director import Orchestrator
from services.orchestrator.discovery import Discovery
from services.orchestrator.policy import load_policy
from services.orchestrator.prefix import registry_index
from services.orchestrator.probe import HttpMetrics, TritonProbe
from services.orchestrator.servicer import OrchestratorServicer
from services.orchestrator.settings import OrchestratorSettings


async def every(interval_s: float, step: Callable[[], Awaitable[None]]) -> None:
    """Start `step` every `interval_s` (at once again when a step took longer), forever: the
    service's periodic upkeep. The director sleeps only within a round, to spread the round's
    calls to the replicas (`ROUND_SPREAD`)."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        try:
            await step()
        except Exception:  # one round's fault: the upkeep goes on (and says so)
            log.exception("periodic upkeep failed", extra={"step": getattr(step, "__name__", "")})
        await asyncio.sleep(max(0.0, interval_s - (loop.time() - start)))


# Share of the interval over which a health or metrics round starts its calls to the replicas:
# all at once, their answers (and their parsing) would hold up the Admits behind them.
ROUND_SPREAD = 0.5


log = logging.getLogger(__name__)

SERVICE = orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name


async def main(settings: OrchestratorSettings, blocks: KvBlockSettings) -> None:
    setup_logging("orchestrator", settings.log_level, settings.log_json)
    provider = setup_tracing("orchestrator", settings.otlp_endpoint, settings.trace_sample_ratio)
    policy = load_policy(settings.policy_file)
    probe = TritonProbe()
    pages = HttpMetrics()
    prefix = registry_index(settings, blocks.block_config())
    core = Orchestrator(
        settings,
        probe,
        policy,
        prefix,
        fetch_metrics=pages,
        kv_block_size=blocks.block_size,
    )
    servicer = OrchestratorServicer(core)
    server = ManagedServer(
        host=settings.host,
        port=settings.grpc_port,
        services=[
            ServiceRegistration(
                SERVICE,
                lambda s: orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(
                    servicer, s
                ),
            )
        ],
        drain_seconds=settings.drain_seconds,
    )
    metrics_port = start_metrics_server(settings.host, settings.metrics_port)
    await server.start()
    health_s, metrics_s = settings.health_interval_s, settings.metrics_interval_s
    health_task = asyncio.create_task(
        every(health_s, lambda: core.probe_once(health_s * ROUND_SPREAD))
    )
    metrics_task = asyncio.create_task(
        every(metrics_s, lambda: core.scrape_once(metrics_s * ROUND_SPREAD))
    )
    discovery_task: asyncio.Task[None] | None = None
    registry_dns_task: asyncio.Task[None] | None = None
    if prefix is not None and settings.kv_registry_dns:
        registry_dns_task = asyncio.create_task(
            every(settings.kv_registry_dns_interval_s, prefix.refresh)
        )
    if settings.replica_dns:
        discover = Discovery(settings)

        async def rediscover() -> None:
            core.sync_replicas(await discover())

        discovery_task = asyncio.create_task(every(settings.dns_interval_s, rediscover))

    async def on_stop() -> None:
        for task in (health_task, metrics_task, discovery_task, registry_dns_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await probe.close()
        await pages.close()
        if prefix is not None:
            await prefix.close()
        provider.shutdown()

    await run_until_signal(
        server,
        service="orchestrator",
        metrics_port=metrics_port,
        ready_file=settings.ready_file,
        on_stop=on_stop,
        drain_with=(servicer.drain,),
    )


if __name__ == "__main__":
    uvloop.run(main(OrchestratorSettings(), KvBlockSettings()))
