"""A call's wait at its server from the caller's send time: reading the metadata, taking out the
caller's clock offset (its baseline), and, on a real server on an ephemeral port, the wait of a
call behind a handler that holds the event loop."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from llmmesh.common.sojourn import (
    CALLER_KEY,
    MAX_READING_S,
    SENT_AT_KEY,
    CallerBaselines,
    call_metadata,
    read_call,
)

METHOD = "/test.Sojourn/Wait"
BUSY_S = 0.3
NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (call_metadata("gw-1", NOW - 0.25), ("gw-1", 0.25)),
        (call_metadata("gw-1", NOW + 0.25), ("gw-1", -0.25)),  # its clock is ahead: an offset
        ([("traceparent", "x"), (SENT_AT_KEY, b"1699999999.5"), (CALLER_KEY, "g")], ("g", 0.5)),
        ([(SENT_AT_KEY, f"{NOW}")], None),  # no caller
        ([(CALLER_KEY, "g")], None),  # no send time
        ([(CALLER_KEY, ""), (SENT_AT_KEY, f"{NOW}")], None),
        ([(CALLER_KEY, "g"), (SENT_AT_KEY, "soon")], None),
        ([(CALLER_KEY, "g"), (SENT_AT_KEY, "nan")], None),
        ([(CALLER_KEY, "g"), (SENT_AT_KEY, "inf")], None),
        ([(CALLER_KEY, "g"), (SENT_AT_KEY, "1")], None),  # decades off: no offset or wait
        (call_metadata("g", NOW - MAX_READING_S - 1), None),
        ([], None),
        (None, None),
    ],
)
def test_read_call(
    metadata: list[tuple[str, str | bytes]] | None, expected: tuple[str, float] | None
) -> None:
    got = read_call(metadata, NOW)
    if expected is None:
        assert got is None
    else:
        assert got is not None
        assert got[0] == expected[0]
        assert math.isclose(got[1], expected[1], abs_tol=1e-6)


def test_a_caller_s_clock_offset_is_its_baseline_and_the_wait_what_comes_on_top() -> None:
    b = CallerBaselines(window_s=60)
    offset = 0.75  # the caller's clock is 0.75 s behind: every reading 0.75 s high
    assert b.sojourn("g", offset + 0.001, 0.0) == 0.0  # the first call is its own baseline
    assert b.sojourn("g", offset, 1.0) == 0.0
    assert math.isclose(b.sojourn("g", offset + 0.2, 2.0), 0.2)
    assert math.isclose(b.sojourn("h", -0.5 + 0.05, 2.0), 0.0)  # each caller its own
    assert math.isclose(b.sojourn("h", -0.5, 3.0), 0.0)
    assert math.isclose(b.sojourn("h", -0.5 + 0.05, 4.0), 0.05)
    assert math.isclose(b.sojourn("g", offset + 0.2, 5.0), 0.2)


def test_a_step_of_the_services_own_clock_is_no_wait() -> None:
    """The service's wall clock jumps 0.5 s forward (a time sync): every reading is 0.5 s
    higher from then on. Its baselines kept the old readings, so every call of every caller
    read 0.5 s of wait, far above the shedding target, for up to a whole window."""
    b = CallerBaselines(window_s=60)
    wall = 1_000_000.0  # the service's wall clock at monotonic 0
    for t in range(5):
        assert b.sojourn("g", 0.2, float(t), wall + t) == 0.0
        assert b.sojourn("h", -0.1, float(t), wall + t) == 0.0
    wall += 0.5
    # The first reading after the step shows it (one reading alone may be a thread switch
    # between the two clocks' reads); from the second on it is followed.
    assert math.isclose(b.sojourn("g", 0.7, 5.0, wall + 5), 0.5)
    for t in range(6, 40):
        assert b.sojourn("g", 0.7, float(t), wall + t) == 0.0
        assert b.sojourn("h", 0.4, float(t), wall + t) == 0.0
    assert math.isclose(b.sojourn("g", 0.75, 40.0, wall + 40), 0.05)  # a real wait still shows
    wall -= 2.0  # and back: h's reading shows it first, g's confirms it
    assert b.sojourn("h", -1.6, 41.0, wall + 41) == 0.0
    assert b.sojourn("g", -1.3, 42.0, wall + 42) == 0.0
    # h's first reading in the new clock did not enter its baseline before the move did.
    assert b.sojourn("h", -1.6, 43.0, wall + 43) == 0.0
    assert math.isclose(b.sojourn("h", -1.5, 43.5, wall + 43.5), 0.1)
    # The two clocks read 5 ms apart once (a thread switch): no step, no baseline moved.
    assert math.isclose(b.sojourn("g", -1.3 + 0.005, 44.0, wall + 44 + 0.005), 0.005)
    assert b.sojourn("g", -1.3, 45.0, wall + 45) == 0.0


def test_a_baseline_is_kept_one_window_then_forgotten() -> None:
    b = CallerBaselines(window_s=60)
    b.sojourn("g", 0.0, 0.0)
    # The clock was stepped back by 1 s at 10 s: every call reads 1 s late ...
    assert math.isclose(b.sojourn("g", 1.0, 10.0), 1.0)
    assert math.isclose(b.sojourn("g", 1.0, 40.0), 1.0)  # next half-window: still remembered
    assert math.isclose(b.sojourn("g", 1.0, 59.0), 1.0)
    assert b.sojourn("g", 1.0, 75.0) == 0.0  # ... until the step leaves the window
    # A caller silent for a whole window starts afresh.
    assert b.sojourn("g", 3.0, 200.0) == 0.0


def test_callers_are_bounded_and_the_least_recently_heard_forgotten() -> None:
    b = CallerBaselines(max_callers=3)
    b.sojourn("active", 0.5, 0.0)  # its baseline: 0.5
    for i in range(10):
        b.sojourn(f"g{i}", 0.0, float(i))
        b.sojourn("active", 0.6, float(i))  # heard all along: kept
    assert len(b) == 3
    assert math.isclose(b.sojourn("active", 0.6, 10.0), 0.1)


@pytest.fixture
async def address() -> AsyncIterator[str]:
    """A server whose handler answers the call's sojourn; a request body b"busy" first holds
    the event loop for BUSY_S, as a process with more work than CPU does."""
    baselines = CallerBaselines()

    async def wait(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        call = read_call(context.invocation_metadata(), time.time())
        assert call is not None
        sojourn = baselines.sojourn(*call, time.monotonic())
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
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        alone = float(await call(b"", timeout=10, metadata=call_metadata("t", time.time())))
        busy, behind = await asyncio.gather(
            call(b"busy", timeout=10, metadata=call_metadata("t", time.time())),
            call(b"", timeout=10, metadata=call_metadata("t", time.time())),
        )
    assert alone == 0.0  # the caller's first call: its baseline
    assert float(busy) < BUSY_S / 2  # started at once: its own work is not a wait
    assert float(behind) >= BUSY_S / 2  # it waited while the loop was held
