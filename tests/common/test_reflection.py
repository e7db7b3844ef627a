"""Server reflection under both `grpc.reflection.v1` and `grpc.reflection.v1alpha`
(llmmesh.common.reflection), over a real channel to a ManagedServer on port 0: for a bare server
and for the orchestrator, kv_registry and autoscaler with their real servicers (the gateway is
covered, with the real grpcurl binary, by tests/gateway/test_grpcurl.py).

The v1 calls use the v1 method path with grpcio-reflection's v1alpha message classes — the two
protos are wire-identical (`test_v1_file_is_v1alpha_renamed` checks that) — so they are exactly
what a v1-only client (grpcurl ≥ 1.9, Postman, grpcui) sends."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc
from prometheus_client import CollectorRegistry

from llmmesh.common.reflection import (
    V1_FILE_NAME,
    V1_SERVICE_NAME,
    V1ALPHA_SERVICE_NAME,
    derive_v1_file,
    v1_file_descriptor,
)
from llmmesh.common.server import ManagedServer, ServiceRegistration
from llmmesh.common.settings import KvBlockSettings
from llmmesh.generated.autoscaler.v1 import autoscaler_pb2, autoscaler_pb2_grpc
from llmmesh.generated.keda import externalscaler_pb2, externalscaler_pb2_grpc
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2, kvregistry_pb2_grpc
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from services.autoscaler.core import Autoscaler
from services.autoscaler.keda import KedaScalerServicer
from services.autoscaler.servicer import AutoscalerServicer
from services.autoscaler.settings import AutoscalerSettings
from services.kv_registry.core import KvRegistry
from services.kv_registry.metrics import PrometheusMetrics
from services.kv_registry.servicer import KvRegistryServicer
from services.kv_registry.settings import KvRegistrySettings
from services.orchestrator.director import Orchestrator
from services.orchestrator.servicer import OrchestratorServicer
from services.orchestrator.settings import OrchestratorSettings
from tests.autoscaler.fakes import FakeClock, FakeSource
from tests.orchestrator.test_core import FakeProbe

V1_METHOD = f"/{V1_SERVICE_NAME}/ServerReflectionInfo"
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION = {V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME}


def full_name(file: Any, service: str) -> str:
    name: str = file.DESCRIPTOR.services_by_name[service].full_name
    return name


ORCHESTRATOR = full_name(orchestrator_pb2, "OrchestratorService")
KV_REGISTRY = full_name(kvregistry_pb2, "KvRegistryService")
AUTOSCALER = full_name(autoscaler_pb2, "AutoscalerService")
KEDA = full_name(externalscaler_pb2, "ExternalScaler")


# -- the services as their __main__ registers them, over real servicers on in-memory cores ----
def orchestrator() -> list[ServiceRegistration]:
    servicer = OrchestratorServicer(Orchestrator(OrchestratorSettings(), FakeProbe()))
    return [
        ServiceRegistration(
            ORCHESTRATOR,
            lambda s: orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(servicer, s),
        )
    ]


def kv_registry() -> list[ServiceRegistration]:
    core = KvRegistry(
        KvRegistrySettings(),
        KvBlockSettings().block_config(),
        clock=time.monotonic,
        metrics=PrometheusMetrics(CollectorRegistry()),
    )
    servicer = KvRegistryServicer(core, KvRegistrySettings().watch_backlog)
    return [
        ServiceRegistration(
            KV_REGISTRY,
            lambda s: kvregistry_pb2_grpc.add_KvRegistryServiceServicer_to_server(servicer, s),
        )
    ]


def autoscaler() -> list[ServiceRegistration]:
    core = Autoscaler(AutoscalerSettings(), FakeSource(), clock=FakeClock())
    servicer, keda = AutoscalerServicer(core), KedaScalerServicer(core)
    return [
        ServiceRegistration(
            AUTOSCALER,
            lambda s: autoscaler_pb2_grpc.add_AutoscalerServiceServicer_to_server(servicer, s),
        ),
        ServiceRegistration(
            KEDA, lambda s: externalscaler_pb2_grpc.add_ExternalScalerServicer_to_server(keda, s)
        ),
    ]


@contextlib.asynccontextmanager
async def serving(services: Sequence[ServiceRegistration]) -> AsyncIterator[grpc.aio.Channel]:
    server = ManagedServer(host="127.0.0.1", port=0, services=services, drain_seconds=0)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop()


async def reflect(channel: grpc.aio.Channel, *, v1: bool, **request: Any) -> Any:
    """One ServerReflectionInfo exchange; `v1` picks the method path (same messages on the wire)."""
    call: grpc.aio.StreamStreamMultiCallable[Any, Any] = (
        channel.stream_stream(
            V1_METHOD,
            request_serializer=v1alpha_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=v1alpha_pb2.ServerReflectionResponse.FromString,
        )
        if v1
        else v1alpha_grpc.ServerReflectionStub(channel).ServerReflectionInfo
    )
    sent = v1alpha_pb2.ServerReflectionRequest(**request)
    (response,) = [r async for r in call(iter([sent]), timeout=10)]
    assert response.original_request == sent
    return response


async def listed(channel: grpc.aio.Channel, *, v1: bool) -> set[str]:
    response = await reflect(channel, v1=v1, list_services="")
    return {s.name for s in response.list_services_response.service}


async def files_for(
    channel: grpc.aio.Channel, symbol: str
) -> list[descriptor_pb2.FileDescriptorProto]:
    """The file declaring `symbol` (first) and its dependencies, asked over v1."""
    response = await reflect(channel, v1=True, file_containing_symbol=symbol)
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]


def fields(message: descriptor_pb2.DescriptorProto) -> list[tuple[str, int, int, int, str]]:
    """What decides a message's wire format, with type names relative to their package."""
    return [
        (f.name, f.number, f.type, f.label, f.type_name.rsplit(".", 1)[-1]) for f in message.field
    ]


def test_v1_file_is_v1alpha_renamed() -> None:
    v1alpha = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(v1alpha)
    derived = derive_v1_file(v1alpha_pb2.DESCRIPTOR)
    assert (derived.name, derived.package) == (V1_FILE_NAME, "grpc.reflection.v1")
    # Wire-identical: same messages, same fields (name, number, type, label, message type).
    assert [(m.name, fields(m)) for m in derived.message_type] == [
        (m.name, fields(m)) for m in v1alpha.message_type
    ]
    type_refs = [f.type_name for m in derived.message_type for f in m.field if f.type_name]
    type_refs += [x for m in derived.service[0].method for x in (m.input_type, m.output_type)]
    assert type_refs
    assert all(t.startswith(".grpc.reflection.v1.") for t in type_refs)
    # Scalar fields stay without a type name (a present "" would not build).
    assert not derived.message_type[0].field[0].HasField("type_name")


def test_v1_descriptor_is_added_once() -> None:
    first = v1_file_descriptor()
    assert v1_file_descriptor() is first
    pool = descriptor_pool.Default()
    assert pool.FindFileContainingSymbol(V1_SERVICE_NAME) is first
    request = pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest")
    assert [(f.name, f.number) for f in request.fields] == [
        (f.name, f.number) for f in v1alpha_pb2.ServerReflectionRequest.DESCRIPTOR.fields
    ]


@pytest.mark.parametrize("v1", [False, True], ids=["v1alpha", "v1"])
async def test_bare_server_lists_health_and_both_reflection_services(v1: bool) -> None:
    async with serving([]) as channel:
        assert await listed(channel, v1=v1) == {HEALTH, *REFLECTION}
        # Health is unchanged: "" is SERVING.
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_v1_describes_both_reflection_services_and_reports_unknown_symbols() -> None:
    async with serving([]) as channel:
        (v1_file,) = await files_for(channel, V1_SERVICE_NAME)
        assert (v1_file.name, v1_file.package) == (V1_FILE_NAME, "grpc.reflection.v1")
        [method] = v1_file.service[0].method
        assert method.input_type == ".grpc.reflection.v1.ServerReflectionRequest"
        assert method.client_streaming
        assert method.server_streaming
        (v1alpha_file,) = await files_for(channel, V1ALPHA_SERVICE_NAME)
        assert v1alpha_file.package == "grpc.reflection.v1alpha"
        by_name = await reflect(channel, v1=True, file_by_filename=V1_FILE_NAME)
        assert len(by_name.file_descriptor_response.file_descriptor_proto) == 1
        missing = await reflect(channel, v1=True, file_containing_symbol="no.such.Service")
        assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


@pytest.mark.parametrize(
    ("build", "names"),
    [
        (orchestrator, {ORCHESTRATOR}),
        (kv_registry, {KV_REGISTRY}),
        (autoscaler, {AUTOSCALER, KEDA}),
    ],
    ids=["orchestrator", "kv_registry", "autoscaler"],
)
async def test_services_reflect_over_v1_and_v1alpha(
    build: Callable[[], list[ServiceRegistration]], names: set[str]
) -> None:
    async with serving(build()) as channel:
        for v1 in (False, True):
            assert await listed(channel, v1=v1) == {*names, HEALTH, *REFLECTION}
        for name in names:
            files = await files_for(channel, name)
            assert name.rsplit(".", 1)[-1] in [s.name for s in files[0].service]
            assert files[0].package == name.rsplit(".", 1)[0]
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=name), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
