"""ManagedServer (llmmesh.common.server) over a real channel on port 0: the request size bound;
the bound on a call's wait for the loop to take it; run_until_signal's drain."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmmesh.common import server as server_module
from llmmesh.common.server import MAX_MESSAGE_BYTES, ManagedServer, run_until_signal
from tests.helpers import eventually


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


async def test_a_failed_drain_still_stops_and_a_second_signal_cuts_a_slow_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A front whose drain raised skipped `on_stop` (the gateway's usage log and lease reports
    with it); a second signal did nothing while a drain took its whole bound (300 s for the
    gateway)."""
    monkeypatch.setattr(server_module, "REPEAT_SIGNAL_S", 0.0)  # any second signal counts
    monkeypatch.setattr(server_module, "HURRIED_CLEANUP_S", 0.0)  # `slow` never ends
    server = ManagedServer(host="127.0.0.1", port=0, services=[], drain_seconds=30)
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    stopped: list[str] = []
    slow_started = asyncio.Event()

    async def failing() -> None:
        raise RuntimeError("the HTTP front broke on its way down")

    async def slow() -> None:
        slow_started.set()
        await asyncio.sleep(3600)  # a drain waiting on a stream that never ends

    async def on_stop() -> None:
        stopped.append("on_stop")

    async def hurry() -> None:
        stopped.append("hurried")

    ready = tmp_path / "ready.json"
    run = asyncio.create_task(
        run_until_signal(
            server,
            service="t",
            metrics_port=0,
            ready_file=ready,
            on_stop=on_stop,
            drain_with=(failing, slow),
            hurry_with=(hurry,),
        )
    )

    async def is_ready() -> bool:
        return ready.exists()

    await eventually(is_ready, what="ready file")  # written once the signals are handled
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(slow_started.wait(), 10)
    assert not run.done()  # draining
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(run, 10)
    assert stopped == ["hurried", "on_stop"]
    loop = asyncio.get_running_loop()  # the tests' one loop: no handler of the run left on it
    assert not loop.remove_signal_handler(signal.SIGTERM)
    assert not loop.remove_signal_handler(signal.SIGINT)
    # The call the gRPC drain was waiting for (up to 30 s) was cancelled before on_stop ran.
    with pytest.raises(grpc.aio.AioRpcError):
        await asyncio.wait_for(read_to_the_end(watch), 10)
    await channel.close(None)


async def read_to_the_end(call: Any) -> None:
    """Reads until the call ends: raises its error, or returns at its clean end."""
    while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
        pass


@pytest.mark.parametrize(("max_unaccepted_s", "cancelled"), [(1, True), (10, False)])
async def test_a_call_the_busy_loop_takes_late_is_cancelled_only_past_max_unaccepted(
    max_unaccepted_s: float, cancelled: bool
) -> None:
    """Calls sent while the loop is busy wait in gRPC until the loop takes them; gRPC ends
    those still waiting after the bound CANCELLED, unseen by the service. The loop is held busy
    here (`time.sleep` in it: the condition, not a synchronisation) past the 1 s bound and
    within the 10 s one while another thread's client sends calls: the 1 s case shows the
    option reaches gRPC (one it did not know would leave gRPC's 30 s)."""
    server = ManagedServer(
        host="127.0.0.1",
        port=0,
        services=[],
        drain_seconds=0,
        max_unaccepted_s=max_unaccepted_s,
    )
    port = await server.start()
    sent = threading.Event()

    def client() -> list[grpc.StatusCode]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            check = health_pb2_grpc.HealthStub(channel).Check
            calls = [check.future(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(4)]
            sent.set()
            return [call.code() for call in calls]

    codes = asyncio.get_running_loop().run_in_executor(None, client)
    try:
        assert sent.wait(timeout=10)
        time.sleep(3)  # the loop busy: no call is taken meanwhile  # noqa: ASYNC251
        result = await codes
    finally:
        await server.stop()
        await asyncio.wait([codes])  # the client's thread ended (its calls too)
    # The first call may be matched to the take already waiting in gRPC: the others wait.
    assert (grpc.StatusCode.CANCELLED in result) is cancelled, result
    assert set(result) <= {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED}
