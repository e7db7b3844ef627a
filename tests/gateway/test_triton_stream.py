"""The Triton tensor wire format the gateway writes and reads (per-token path, no numpy), and
which channels its Triton pool keeps."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from llmmesh.kvblocks import token_bytes, tokens_from_bytes
from llmmesh.netutil import free_port
from services.gateway.faults import FaultKind
from services.gateway.triton_stream import (
    EngineRequest,
    TritonPool,
    TritonStreamError,
    build_request,
    parse_response,
)


def _inputs(req: service_pb2.ModelInferRequest) -> dict[str, tuple[str, list[int], object]]:
    dtypes = {"INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_, "UINT64": np.uint64}
    out: dict[str, tuple[str, list[int], object]] = {}
    for t, raw in zip(req.inputs, req.raw_input_contents, strict=True):
        values = np.frombuffer(raw, dtype=np.dtype(dtypes[t.datatype]).newbyteorder("<"))
        out[t.name] = (t.datatype, list(t.shape), values.tolist())
    return out


def test_build_request_encodes_every_input_little_endian() -> None:
    er = EngineRequest("r1", "m", [1, 70000, 2**31 - 1], 17, 2, 0.5, 0.9, 40, 2**64 - 1)
    req = build_request(er)
    assert (req.model_name, req.id) == ("m", "r1")
    assert _inputs(req) == {
        "input_ids": ("INT32", [1, 3], [1, 70000, 2**31 - 1]),
        "input_lengths": ("INT32", [1, 1], [3]),
        "request_output_len": ("INT32", [1, 1], [17]),
        "streaming": ("BOOL", [1, 1], [True]),
        "end_id": ("INT32", [1, 1], [2]),
        "pad_id": ("INT32", [1, 1], [2]),
        "temperature": ("FP32", [1, 1], [0.5]),
        "runtime_top_p": ("FP32", [1, 1], [pytest.approx(0.9)]),
        "runtime_top_k": ("INT32", [1, 1], [40]),
        "seed": ("UINT64", [1, 1], [2**64 - 1]),
        "return_perf_metrics": ("BOOL", [1, 1], [True]),
    }
    assert [o.name for o in req.outputs] == ["output_ids", "kv_cache_reused_blocks"]
    assert req.parameters["triton_enable_empty_final_response"].bool_param


def test_ids_held_as_uint32_bytes_are_sent_as_the_same_tensor() -> None:
    """A prompt the gateway holds as uint32 bytes (`kvblocks.tokens_from_bytes`' view) goes
    as those bytes: the tensor a list of the same ids makes."""
    ids = [0, 1, 70000, 2**31 - 1]
    as_list = build_request(EngineRequest("r", "m", ids, 1, 2, 1.0, 1.0, 0, None))
    held = tokens_from_bytes(token_bytes(ids))
    as_bytes = build_request(EngineRequest("r", "m", held, 1, 2, 1.0, 1.0, 0, None))
    assert as_bytes == as_list
    assert _inputs(as_bytes)["input_ids"] == ("INT32", [1, 4], ids)


@pytest.mark.parametrize(("temperature", "top_p", "top_k"), [(0.0, 0.9, 40), (0.7, 0.5, 1)])
def test_greedy_is_sent_as_top_k_1(temperature: float, top_p: float, top_k: int) -> None:
    """Temperature 0 (or top_k 1) is greedy: TensorRT-LLM's greedy is top_k 1, and a
    temperature of 0 is not sent (its sampler divides the logits by it)."""
    req = build_request(EngineRequest("r", "m", [5], 1, 2, temperature, top_p, top_k, None))
    got = _inputs(req)
    assert [got[k][2] for k in ("temperature", "runtime_top_p", "runtime_top_k")] == [
        [1.0],
        [1.0],
        [1],
    ]


def test_build_request_without_seed_sends_none() -> None:
    req = build_request(EngineRequest("r", "m", [5], 1, 2, 1.0, 1.0, 0, None))
    assert "seed" not in _inputs(req)


def _response(
    tokens: list[int] | None, reused: int | None, final: bool | None
) -> service_pb2.ModelInferResponse:
    resp = service_pb2.ModelInferResponse()
    if tokens is not None:
        resp.outputs.add().name = "output_ids"
        resp.raw_output_contents.append(np.asarray(tokens, dtype="<i4").tobytes())
    if reused is not None:
        resp.outputs.add().name = "kv_cache_reused_blocks"
        resp.raw_output_contents.append(np.asarray([reused], dtype="<i4").tobytes())
    if final is not None:
        resp.parameters["triton_final_response"].bool_param = final
    return resp


@pytest.mark.parametrize(
    ("tokens", "reused", "final"),
    [
        ([7], None, False),
        ([-3], 4, None),
        ([1, 2, 2**31 - 1], 0, True),
        ([], None, True),
        (None, 9, False),
    ],
)
def test_parse_response(tokens: list[int] | None, reused: int | None, final: bool | None) -> None:
    chunk = parse_response(_response(tokens, reused, final))
    assert chunk.token_ids == (tokens or [])
    assert chunk.kv_cache_reused_blocks == reused
    assert chunk.final is bool(final)


def test_parse_response_ignores_outputs_without_contents() -> None:
    resp = _response([5], None, False)
    resp.outputs.add().name = "kv_cache_reused_blocks"  # declared, no raw contents
    assert parse_response(resp).kv_cache_reused_blocks is None


REQUEST = EngineRequest("r", "m", [5], 1, 2, 1.0, 1.0, 0, None)


def nowhere() -> str:
    """An address nothing listens on: a stream there fails at once (UNAVAILABLE)."""
    return f"127.0.0.1:{free_port()}"


class ClockedPool:
    """A TritonPool (channels idle 10 s are closed) on a clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pool = TritonPool(idle_close_s=10.0, clock=lambda: self.now)

    async def failed(self, address: str) -> None:
        """One stream to `address`, which fails: what is under test is which channels stay."""
        with pytest.raises(TritonStreamError):
            async for _ in self.pool.stream(address, "", REQUEST, timeout_s=30.0):
                pass


async def test_after_a_rollout_the_old_channels_go_as_streams_on_the_new_ones_end() -> None:
    # No new address comes after the rollout: the sweep as a stream ends closes the old ones.
    p = ClockedPool()
    old, new = nowhere(), nowhere()
    try:
        await p.failed(old)
        await p.failed(new)
        p.now = 9.0
        await p.failed(new)
        assert len(p.pool) == 2  # old idle 9 s
        p.now = 12.0
        await p.failed(new)
        assert len(p.pool) == 1  # old idle 12 s: closed as that stream ended
    finally:
        await p.pool.close()


async def test_the_pool_closes_channels_idle_for_long_once_another_address_is_used() -> None:
    p = ClockedPool()
    a, b, c = nowhere(), nowhere(), nowhere()
    try:
        await p.failed(a)
        p.now = 5.0
        await p.failed(b)
        assert len(p.pool) == 2  # a idle for 5 s only
        await p.failed(a)  # reused: a's idle time starts again
        p.now = 14.0
        await p.failed(c)
        assert len(p.pool) == 3  # a and b last used at 5 s: neither idle 10 s yet
        p.now = 15.5
        await p.failed(a)
        p.now = 30.0
        await p.failed(nowhere())
        assert len(p.pool) == 1  # a, b and c idle for 14.5 s or more: closed
    finally:
        await p.pool.close()
    assert len(p.pool) == 0


class HangingTriton(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Reads a stream's request and answers nothing until `release`, then fails the call."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def ModelStreamInfer(self, requests: Any, context: Any) -> None:
        async for _ in requests:
            self.started.set()
            await self.release.wait()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")


async def test_the_pool_never_closes_a_channel_a_stream_is_using() -> None:
    triton = HangingTriton()
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(triton, server)
    busy = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    p = ClockedPool()
    try:
        running = asyncio.ensure_future(p.failed(busy))
        await asyncio.wait_for(triton.started.wait(), 10)
        p.now = 100.0  # the busy channel was made 100 s ago
        await p.failed(nowhere())  # a new address: a sweep
        assert len(p.pool) == 2  # kept: its stream is open
        triton.release.set()
        await asyncio.wait_for(running, 10)  # the stream it kept still ends normally
        p.now = 200.0
        await p.failed(nowhere())
        assert len(p.pool) == 1  # both idle 100 s by then: closed
    finally:
        await p.pool.close()
        await server.stop(None)


class ResetByPeer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """A server (or a proxy in front of it) that resets every stream with CANCELLED."""

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> Any:
        async for _ in request_iterator:
            await context.abort(grpc.StatusCode.CANCELLED, "stream reset by the peer")
        yield  # an async generator, as the streaming handler must be


async def stream_error(triton: service_pb2_grpc.GRPCInferenceServiceServicer) -> TritonStreamError:
    """The error a pool's stream to a replica served by `triton` ends with."""
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(triton, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    pool = TritonPool()
    try:
        with pytest.raises(TritonStreamError) as info:
            async for _ in pool.stream(f"127.0.0.1:{port}", "", REQUEST, timeout_s=30.0):
                pass
        return info.value
    finally:
        await pool.close()
        await server.stop(None)


async def test_a_cancelled_status_from_the_peer_is_a_broken_stream_not_ours() -> None:
    err = await stream_error(ResetByPeer())
    assert err.fault.kind is FaultKind.REPLICA  # migrated, not passed on as CANCELLED


class Malformed(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """A replica that answers with an output_ids tensor of 3 bytes (no whole INT32)."""

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> Any:
        async for _ in request_iterator:
            resp = service_pb2.ModelStreamInferResponse()
            resp.infer_response.outputs.add().name = "output_ids"
            resp.infer_response.raw_output_contents.append(b"\x01\x02\x03")
            yield resp


async def test_a_malformed_response_is_the_replicas_fault_not_an_unknown_error() -> None:
    """A replica sending what no INT32 tensor is fails its stream as broken (the request is
    migrated), not with a ValueError that would reach the client as UNKNOWN."""
    err = await stream_error(Malformed())
    assert err.fault.kind is FaultKind.REPLICA
    assert "malformed response" in str(err)
