"""Token streaming from one Triton replica through the TensorRT-LLM tensor interface.

Uses the gRPC stubs that tritonclient ships (`tritonclient.grpc.service_pb2_grpc`) on our own
grpc.aio channels: tritonclient's aio `stream_infer` cannot set the reserved request parameter
`triton_enable_empty_final_response`, which is how a decoupled stream's end is signalled.
"""

from __future__ import annotations

import array
import asyncio
import logging
import struct
import sys
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from llmmesh.common.channels import RECONNECT_OPTIONS
from llmmesh.common.errors import ServiceError, from_rpc_error
from llmmesh.common.server import MAX_MESSAGE_BYTES
from llmmesh.kvblocks import token_bytes
from services.gateway.faults import (
    REPLICA_FAULT,
    REQUEST_FAULT,
    STREAM_BROKEN,
    Fault,
    classify_message,
    classify_status,
)

# Seconds to wait for a finished stream's end of stream (it follows the final response at once).
END_OF_STREAM_TIMEOUT_S = 5.0


class TritonStreamError(Exception):
    """The replica reported an error or the stream broke; `fault` says whose fault it is
    (`services.gateway.faults`, the one place that decides)."""

    def __init__(
        self, message: str, fault: Fault | None = None, *, replica_fault: bool | None = None
    ):
        super().__init__(message)
        if fault is None:  # callers that only know whether the replica is to blame
            fault = REPLICA_FAULT if replica_fault else REQUEST_FAULT
        self.fault = fault

    @property
    def replica_fault(self) -> bool:
        """The replica cannot serve: the orchestrator counts it toward ejection."""
        return self.fault.replica_fault


class EngineCallStopped(Exception):
    """The call ended on our side (its deadline, or a cancellation), not by a replica fault;
    `error` is the status to pass on to the client."""

    def __init__(self, error: ServiceError):
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True, slots=True)
class EngineRequest:
    request_id: str
    model: str
    input_ids: Sequence[int]
    max_tokens: int
    end_id: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None


@dataclass(frozen=True, slots=True)
class EngineChunk:
    token_ids: list[int]
    final: bool
    kv_cache_reused_blocks: int | None = None


# Scalar inputs: (name, Triton datatype, struct format). Little-endian, as Triton reads them.
_INT32, _FP32, _BOOL, _UINT64 = ("INT32", "<i"), ("FP32", "<f"), ("BOOL", "<?"), ("UINT64", "<Q")


def _scalar(
    req: service_pb2.ModelInferRequest, name: str, kind: tuple[str, str], value: object
) -> None:
    t = req.inputs.add()
    t.name = name
    t.datatype = kind[0]
    t.shape.extend((1, 1))
    req.raw_input_contents.append(struct.pack(kind[1], value))


def build_request(er: EngineRequest) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=er.model, id=er.request_id)
    n = len(er.input_ids)
    t = req.inputs.add()
    t.name = "input_ids"
    t.datatype = "INT32"
    t.shape.extend((1, n))
    # `token_bytes`' uint32 encoding is the INT32 tensor's: an id is below the vocabulary
    # size, far under 2**31 (a view of packed ids, `StreamState.continuation`'s, is its bytes).
    req.raw_input_contents.append(token_bytes(er.input_ids))
    _scalar(req, "input_lengths", _INT32, n)
    _scalar(req, "request_output_len", _INT32, er.max_tokens)
    _scalar(req, "streaming", _BOOL, True)
    _scalar(req, "end_id", _INT32, er.end_id)
    _scalar(req, "pad_id", _INT32, er.end_id)
    if er.temperature == 0.0 or er.top_k == 1:
        # Greedy, as TensorRT-LLM takes it: top-k 1 (its sampler divides the logits by the
        # temperature; at 0, top_k 0 and top_p 1 it is not documented as greedy).
        temperature, top_p, top_k = 1.0, 1.0, 1
    else:
        temperature, top_p, top_k = er.temperature, er.top_p, er.top_k
    _scalar(req, "temperature", _FP32, temperature)
    _scalar(req, "runtime_top_p", _FP32, top_p)
    _scalar(req, "runtime_top_k", _INT32, top_k)
    if er.seed is not None:
        _scalar(req, "seed", _UINT64, er.seed)
    _scalar(req, "return_perf_metrics", _BOOL, True)
    for name in ("output_ids", "kv_cache_reused_blocks"):
        req.outputs.add().name = name
    req.parameters["triton_enable_empty_final_response"].bool_param = True
    return req


def _int32s(raw: bytes) -> list[int]:
    """Little-endian INT32 tensor bytes as ints."""
    if len(raw) == 4:  # one token: the streaming case
        return [int.from_bytes(raw, "little", signed=True)]
    values = array.array("i", raw)
    if sys.byteorder != "little":
        values.byteswap()
    return values.tolist()


def parse_response(resp: service_pb2.ModelInferResponse) -> EngineChunk:
    """One streamed response (on the per-token path: no numpy, one pass over the outputs)."""
    tokens: list[int] = []
    reused: int | None = None
    raws = resp.raw_output_contents
    for out, raw in zip(resp.outputs, raws, strict=False):
        name = out.name
        if name == "output_ids":
            tokens = _int32s(raw)
        elif name == "kv_cache_reused_blocks" and raw:
            reused = int.from_bytes(raw[:4], "little", signed=True)
    final_param = resp.parameters.get("triton_final_response")
    final = final_param is not None and final_param.bool_param
    return EngineChunk(tokens, final, reused)


class EngineClient(Protocol):
    """Streams one request's tokens from one replica (TritonPool in production). Failures are
    `TritonStreamError` (the replica's) or `EngineCallStopped` (our deadline or cancellation);
    no transport exception reaches the caller."""

    def stream(
        self,
        address: str,
        authority: str,
        request: EngineRequest,
        *,
        timeout_s: float | None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> AsyncGenerator[EngineChunk, None]: ...


log = logging.getLogger(__name__)

# A channel no stream has used for this long is closed: pods come and go with their addresses
# (rollouts, autoscaling), and a channel kept to a gone one would redial it for the life of the
# process (or reach whichever pod reuses the address).
IDLE_CHANNEL_CLOSE_S = 300.0


@dataclass(slots=True)
class _Channel:
    channel: grpc.aio.Channel
    stub: service_pb2_grpc.GRPCInferenceServiceStub
    streams: int = 0  # open streams on it
    used_at: float = 0.0  # when its last stream ended (or it was made)


class TritonPool:
    """One channel per (replica address, authority), reused across requests. The authority is
    the headless Service host in Kubernetes, so the mesh applies that Service's policies while
    the connection still goes to the pod the orchestrator picked. A channel idle for
    `idle_close_s` is closed by the next sweep: one when a channel to a new address is made,
    and one as a stream ends at most every `idle_close_s / 4` (so after a rollout the old pods'
    channels go without waiting for another new address). The pool holds the addresses in use,
    not every address ever used."""

    def __init__(
        self,
        idle_close_s: float = IDLE_CHANNEL_CLOSE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._idle_close_s = idle_close_s
        self._clock = clock
        self._channels: dict[tuple[str, str], _Channel] = {}
        self._swept_at = clock()
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False  # `close` was called: nothing is swept any more

    def __len__(self) -> int:
        return len(self._channels)

    def _channel(self, address: str, authority: str) -> _Channel:
        """The channel for (address, authority), made (after a sweep) if there is none."""
        entry = self._channels.get((address, authority))
        if entry is not None:
            return entry
        now = self._clock()
        self._sweep(now)
        # A restarted replica on the same address is reached again within a second.
        options: list[tuple[str, str | int]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            *RECONNECT_OPTIONS,
        ]
        if authority:
            options.append(("grpc.default_authority", authority))
        channel = grpc.aio.insecure_channel(address, options=options)
        entry = _Channel(channel, service_pb2_grpc.GRPCInferenceServiceStub(channel), used_at=now)
        self._channels[(address, authority)] = entry
        return entry

    def _sweep(self, now: float) -> None:
        """Close the channels no stream has used for `idle_close_s` (in the background: a
        close waits for the channel's calls, and it has none)."""
        self._swept_at = now
        if self._closed:
            return
        idle = [
            key
            for key, c in self._channels.items()
            if c.streams == 0 and now - c.used_at >= self._idle_close_s
        ]
        for key in idle:
            task = asyncio.get_running_loop().create_task(
                self._channels.pop(key).channel.close(None)
            )
            self._closing.add(task)
            task.add_done_callback(self._closed_one)

    def _closed_one(self, task: asyncio.Task[None]) -> None:
        self._closing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("closing an idle Triton channel failed", exc_info=task.exception())

    async def stream(
        self,
        address: str,
        authority: str,
        request: EngineRequest,
        *,
        timeout_s: float | None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> AsyncGenerator[EngineChunk, None]:
        """Yields chunks until the final one. Closing the iterator cancels the Triton request."""
        entry = self._channel(address, authority)
        call = entry.stub.ModelStreamInfer(timeout=timeout_s, metadata=tuple(metadata))
        entry.streams += 1
        try:
            await call.write(build_request(request))
            await call.done_writing()
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:  # type: ignore[attr-defined]
                    raise TritonStreamError(
                        f"replica {address}: stream ended before the final response",
                        STREAM_BROKEN,
                    )
                if msg.error_message:
                    # An error response ends the request (our engines, TensorRT-LLM and Triton
                    # send it final): read the stream's end rather than cancel it (see
                    # `_read_to_end`), or every refusal by a full engine queue leaks a stream.
                    await _read_to_end(call)
                    raise TritonStreamError(msg.error_message, classify_message(msg.error_message))
                try:
                    chunk = parse_response(msg.infer_response)
                except ValueError as err:  # not whole INT32 tensors: the replica is broken
                    raise TritonStreamError(
                        f"replica {address}: malformed response: {err}", STREAM_BROKEN
                    ) from err
                if chunk.final:
                    await _read_to_end(call)
                    yield chunk
                    return
                yield chunk
        except grpc.aio.AioRpcError as err:
            code = err.code()
            task = asyncio.current_task()
            # Ours: the call's deadline, or a cancel from this side (the pool closing, the
            # caller cancelled). A CANCELLED the peer sent (a proxy's or the server's reset)
            # is a broken stream, migrated as any other.
            ours = code is grpc.StatusCode.DEADLINE_EXCEEDED or (
                code is grpc.StatusCode.CANCELLED
                and (self._closed or (task is not None and task.cancelling() > 0))
            )
            if ours:
                raise EngineCallStopped(from_rpc_error(err, f"replica {address}")) from err
            raise TritonStreamError(
                f"replica {address}: {code.name}: {err.details()}", classify_status(code)
            ) from err
        finally:
            if not call.done():
                call.cancel()
            entry.streams -= 1
            entry.used_at = now = self._clock()
            if now - self._swept_at >= self._idle_close_s / 4:
                self._sweep(now)

    async def close(self) -> None:
        # Taken first: streams cancelled by these closes end (and would sweep) meanwhile.
        self._closed = True
        entries, self._channels = list(self._channels.values()), {}
        for entry in entries:
            await entry.channel.close(None)
        if self._closing:
            await asyncio.wait(set(self._closing))


async def _read_to_end(call: grpc.aio.StreamStreamCall[Any, Any]) -> None:
    """Read a finished stream's end of stream and status instead of cancelling it.

    Invariant: a stream is never cancelled after its final response. Triton 2.51's gRPC frontend
    leaks the state of a decoupled stream cancelled in that window (its cancellation callback
    never comes), which keeps the model loaded at shutdown: the server then waits out its exit
    timeout and exits 1. `done_writing` was sent with the request, so the stream ends at once;
    the bound only guards a misbehaving replica (then `stream`'s cleanup cancels it)."""
    try:
        async with asyncio.timeout(END_OF_STREAM_TIMEOUT_S):
            while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                pass
            await call.code()
    except (TimeoutError, grpc.aio.AioRpcError):
        pass
