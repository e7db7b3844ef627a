"""A call's wait at its server, from the caller's timeout and the server-side deadline: parsing,
and gRPC's behaviour the measure rests on (the deadline runs while a busy server has not started
the call), on a real server on an ephemeral port."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from llmmesh.common.sojourn import SENT_AT_KEY, TIMEOUT_KEY, call_metadata, server_sojourn

METHOD = "/test.Sojourn/Wait"
BUSY_S = 0.3


NOW = 1_700_000_000.0


def md(timeout_s: float | None = None, sent_at: float | None = None) -> list[tuple[str, str]]:
    out = []
    if timeout_s is not None:
        out.append((TIMEOUT_KEY, f"{timeout_s:.6f}"))
    if sent_at is not None:
        out.append((SENT_AT_KEY, f"{sent_at:.6f}"))
    return out


@pytest.mark.parametrize(
    ("metadata", "remaining", "expected"),
    [
        (md(10.0), 9.75, 0.25),  # the deadline's reading alone
        (md(sent_at=NOW - 0.25), None, 0.25),  # the wall clock's alone
        (md(10.0, NOW - 0.25), 9.75, 0.25),  # both agree
        (md(600.0, NOW - 0.25), 34.75, 0.25),  # a proxy cut the deadline to 35 s: ignored
        (md(10.0, NOW - 5.0), 9.75, 0.25),  # the caller's clock is behind: ignored
        (md(10.0, NOW + 5.0), 9.75, 0.0),  # ahead: the wait reads shorter, never negative
        ([("traceparent", "x"), *md(2.0)], 2.0, 0.0),
        (md(1.0), 1.0005, 0.0),  # the wire's rounding: never negative
        (md(10.0), None, None),  # no deadline, no send time
        ([], 5.0, None),  # the caller did not say
        (None, 5.0, None),
        ([(TIMEOUT_KEY, "soon")], 5.0, None),
        ([(TIMEOUT_KEY, "nan"), (SENT_AT_KEY, "inf")], 5.0, None),
        ([(TIMEOUT_KEY, "-3")], 5.0, None),
        ([(TIMEOUT_KEY, b"3.5")], 3.0, 0.5),
    ],
)
def test_server_sojourn(
    metadata: list[tuple[str, str | bytes]] | None, remaining: float | None, expected: float | None
) -> None:
    got = server_sojourn(metadata, remaining, NOW)
    if expected is None:
        assert got is None
    else:
        assert got is not None
        assert math.isclose(got, expected, abs_tol=1e-6)


@pytest.fixture
async def address() -> AsyncIterator[str]:
    """A server whose handler answers the call's sojourn; a request body b"busy" first holds
    the event loop for BUSY_S, as a process with more work than CPU does."""

    async def wait(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        sojourn = server_sojourn(
            context.invocation_metadata(), context.time_remaining(), time.time()
        )
        if request == b"busy":
            end = time.perf_counter() + BUSY_S
            while time.perf_counter() < end:
                pass
        return repr(sojourn).encode()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Sojourn", {"Wait": grpc.unary_unary_rpc_method_handler(wait)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def test_a_call_behind_a_busy_handler_reports_the_time_it_waited(address: str) -> None:
    """Both readings see the wait (the smaller is taken): the deadline ran, and time passed."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        alone = float(await call(b"", timeout=10, metadata=call_metadata(10, time.time())))
        busy, behind = await asyncio.gather(
            call(b"busy", timeout=10, metadata=call_metadata(10, time.time())),
            call(b"", timeout=10, metadata=call_metadata(10, time.time())),
        )
    assert alone < BUSY_S / 2
    assert float(busy) < BUSY_S / 2  # started at once: its own work is not a wait
    assert float(behind) >= BUSY_S / 2  # its deadline ran while the loop was held
