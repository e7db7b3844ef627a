"""`python -m services.autoscaler`: build settings once, wire core → servicer → server."""

from __future__ import annotations

import asyncio
import contextlib

import uvloop

from llmmesh.common.server import ManagedServer, ServiceRegistration, run_until_signal
from llmmesh.common.telemetry import setup_logging, setup_tracing, start_metrics_server
from llmmesh.common.topology import PoolKey
from llmmesh.generated.autoscaler.v1 import autoscaler_pb2, autoscaler_pb2_grpc
from llmmesh.generated.keda import externalscaler_pb2, externalscaler_pb2_grpc
from services.autoscaler.actuators.local import LocalActuator, ReplicaPhase
from services.autoscaler.core import Autoscaler
from services.autoscaler.keda import KedaScalerServicer
from services.autoscaler.promql import PromQLConfig, PromQLSource
from services.autoscaler.scrape import Discover, EngineTarget, ScrapeSource, target_discovery
from services.autoscaler.servicer import AutoscalerServicer
from services.autoscaler.settings import AutoscalerSettings
from services.autoscaler.signals import SignalSource

SERVICE = autoscaler_pb2.DESCRIPTOR.services_by_name["AutoscalerService"].full_name
KEDA_SERVICE = externalscaler_pb2.DESCRIPTOR.services_by_name["ExternalScaler"].full_name


def with_managed_replicas(base: Discover, actuator: LocalActuator) -> Discover:
    """`base` plus the engines the local actuator runs and the orchestrator routes to (ready
    ones: a starting or draining replica is not part of the pool's serving capacity)."""

    async def discover() -> list[EngineTarget]:
        managed = [
            EngineTarget(r.id, r.metrics_url, r.key)
            for r in actuator.replicas()
            if r.phase is ReplicaPhase.READY and r.metrics_url
        ]
        return [*await base(), *managed]

    return discover


def build_source(
    settings: AutoscalerSettings, actuator: LocalActuator | None = None
) -> SignalSource:
    if settings.source == "promql":
        assert settings.prometheus_url is not None  # AutoscalerSettings validates it
        return PromQLSource(
            PromQLConfig(
                base_url=settings.prometheus_url,
                timeout_s=settings.prometheus_timeout_s,
                rate_window_s=settings.rate_window_s,
                max_age_s=settings.signal_max_age_s,
                engine_selector=settings.promql_engine_selector,
                orchestrator_selector=settings.promql_orchestrator_selector,
                gateway_selector=settings.promql_gateway_selector,
            ),
            settings.pool_models(),
        )
    static = [
        EngineTarget(t.replica_id, t.metrics_url, PoolKey(t.pool, t.model_version), t.host_header)
        for t in settings.targets
    ]
    targets = target_discovery(static, settings.replica_dns)
    return ScrapeSource(
        targets=targets if actuator is None else with_managed_replicas(targets, actuator),
        counted=lambda: targets.complete,
        orchestrator_urls=settings.orchestrator_metrics_urls,
        gateway_url=settings.gateway_metrics_url,
        pool_models=settings.pool_models(),
        pools=[p.key for p in settings.pools]
        + [
            PoolKey(p.pool, p.model_version)
            for p in (settings.local_actuator.pools if settings.local_actuator else [])
        ],
        timeout_s=settings.scrape_timeout_s,
        rate_window_s=settings.rate_window_s,
        max_age_s=settings.signal_max_age_s,
    )


def build_actuator(settings: AutoscalerSettings) -> LocalActuator | None:
    if settings.local_actuator is None:
        return None
    return LocalActuator(settings.local_actuator)


async def main(settings: AutoscalerSettings) -> None:
    setup_logging("autoscaler", settings.log_level, settings.log_json)
    provider = setup_tracing("autoscaler", settings.otlp_endpoint, settings.trace_sample_ratio)
    actuator = build_actuator(settings)
    core = Autoscaler(settings, build_source(settings, actuator), actuator)
    servicer = AutoscalerServicer(core)
    keda = KedaScalerServicer(core)
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
        await core.close()
        provider.shutdown()

    await run_until_signal(
        server,
        service="autoscaler",
        metrics_port=metrics_port,
        ready_file=settings.ready_file,
        on_stop=on_stop,
        drain_with=(keda.drain,),
    )


if __name__ == "__main__":
    uvloop.run(main(AutoscalerSettings()))
