"""ManagedServer (llmmesh.common.server) over a real channel on port 0: the request size bound."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmmesh.common.server import MAX_MESSAGE_BYTES, ManagedServer


@pytest.mark.parametrize(
    ("limit", "name_chars", "code"),
    [
        (1024, 10, grpc.StatusCode.NOT_FOUND),  # parsed, answered: no such service
        (1024, 4096, grpc.StatusCode.RESOURCE_EXHAUSTED),  # refused before parsing
        (MAX_MESSAGE_BYTES, 4096, grpc.StatusCode.NOT_FOUND),  # the internal ports' default
    ],
)
async def test_a_request_larger_than_the_servers_bound_is_refused(
    limit: int, name_chars: int, code: grpc.StatusCode
) -> None:
    server = ManagedServer(
        host="127.0.0.1", port=0, services=[], drain_seconds=0, max_receive_bytes=limit
    )
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Check(health_pb2.HealthCheckRequest(service="s" * name_chars))
        assert info.value.code() == code
    finally:
        await server.stop()
