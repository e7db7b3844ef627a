"""Fault classification (services/gateway/faults.py), table-driven. The in-stream texts marked
"observed" are what the real tritonserver 2.51 (nvidia-pytriton) answered on ModelStreamInfer:
after its Python-backend stub was killed, for a model it does not serve, and what our engines
answer for invalid or oversized requests."""

from __future__ import annotations

import grpc
import pytest

from llmmesh.common.errors import ResourceExhausted
from services.gateway.errors import InvalidRequest, ReplicaFailed
from services.gateway.faults import (
    Fault,
    FaultKind,
    FaultReason,
    attempt_error,
    classify_message,
    classify_status,
)
from services.gateway.triton_stream import TritonStreamError

R, B, Q = FaultKind.REPLICA, FaultKind.BACK_PRESSURE, FaultKind.REQUEST

MESSAGES = [
    # observed, Triton 2.51 Python backend after its stub process was SIGKILLed
    ("Stub process 'tensorrt_llm_0_0' is not healthy.", R, FaultReason.BACKEND_DEAD),
    # newer Python backends
    ("Stub process 'm_0_0' is unhealthy and it will be restarted.", R, FaultReason.BACKEND_DEAD),
    ("Failed to restart the stub process: x", R, FaultReason.BACKEND_DEAD),
    # observed, Triton core for a model it does not serve
    ("Request for unknown model: 'tensorrt_llm' is not found", R, FaultReason.MODEL_UNAVAILABLE),
    (
        "Request for unknown model: 'tensorrt_llm' has no available versions",
        R,
        FaultReason.MODEL_UNAVAILABLE,
    ),
    (
        "Request for unknown model: 'tensorrt_llm' version 1 is not at ready state",
        R,
        FaultReason.MODEL_UNAVAILABLE,
    ),
    # shutting down: our engines, Triton, TensorRT-LLM
    ("engine is stopping", R, FaultReason.ENGINE_STOPPING),
    ("Server is stopping", R, FaultReason.ENGINE_STOPPING),
    ("Executor is shutting down", R, FaultReason.ENGINE_STOPPING),
    # our engines' catch-all for a failure that is not the request's
    ("internal error: RuntimeError('boom')", R, FaultReason.ENGINE_INTERNAL),
    ("CUDA error: an illegal memory access was encountered", R, FaultReason.ENGINE_INTERNAL),
    # back-pressure: CPU engine, TensorRT-LLM executor
    (
        "RESOURCE_EXHAUSTED: 9 requests already wait for a batch slot (max_queue_size=8); "
        "retry later",
        B,
        FaultReason.QUEUE_FULL,
    ),
    (
        "Maximum queue size of 128 has been reached, please try again later",
        B,
        FaultReason.QUEUE_FULL,
    ),
    # Triton's own scheduler queue, bounded by the same max_queue_size
    ("Exceeds maximum queue size", B, FaultReason.QUEUE_FULL),
    # the client's bad input: observed from the emulator behind Triton 2.51
    ("input_ids must hold at least one token", Q, FaultReason.REQUEST_REFUSED),
    (
        "prompt (3) + request_output_len (1000000000) tokens need 31250001 KV blocks of 32 "
        "tokens, the cache holds 12800",
        Q,
        FaultReason.INVALID_REQUEST,
    ),
    (
        "prompt of 9000 tokens exceeds max_num_tokens=8192 (chunked context is not enabled)",
        Q,
        FaultReason.INVALID_REQUEST,
    ),
    (
        "unexpected shape for input 'input_ids' for model 'tensorrt_llm'",
        Q,
        FaultReason.REQUEST_REFUSED,
    ),
    # the CPU engine's limits
    ("prompt of 9000 tokens exceeds max_prefill_tokens=4096", Q, FaultReason.INVALID_REQUEST),
    (
        "prompt (100) + request_output_len (9000) exceeds max_seq_len=8192",
        Q,
        FaultReason.INVALID_REQUEST,
    ),
    (
        "prompt + request_output_len (9100 tokens) exceeds kv_token_budget=8192",
        Q,
        FaultReason.INVALID_REQUEST,
    ),
    ("something nobody listed", Q, FaultReason.REQUEST_REFUSED),
]


@pytest.mark.parametrize(("message", "kind", "reason"), MESSAGES)
def test_in_stream_errors(message: str, kind: FaultKind, reason: FaultReason) -> None:
    fault = classify_message(message)
    assert (fault.kind, fault.reason) == (kind, reason)
    assert fault.replica_fault == (kind is R)
    err = TritonStreamError(message, fault)
    assert err.replica_fault == (kind is R)


STATUSES = [
    (grpc.StatusCode.UNAVAILABLE, R),
    (grpc.StatusCode.INTERNAL, R),
    (grpc.StatusCode.UNKNOWN, R),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, B),
    (grpc.StatusCode.CANCELLED, R),  # a reset by the peer (ours never gets here)
    (grpc.StatusCode.INVALID_ARGUMENT, Q),
    (grpc.StatusCode.NOT_FOUND, Q),
    (grpc.StatusCode.FAILED_PRECONDITION, Q),
    (grpc.StatusCode.UNIMPLEMENTED, Q),
]


@pytest.mark.parametrize(("code", "kind"), STATUSES)
def test_status_codes(code: grpc.StatusCode, kind: FaultKind) -> None:
    assert classify_status(code).kind is kind


def test_callers_that_only_know_whose_fault_it_is() -> None:
    assert TritonStreamError("stalled", replica_fault=True).replica_fault
    assert not TritonStreamError("bad", replica_fault=False).replica_fault


def test_a_full_engine_reaches_the_client_as_resource_exhausted_with_retry_after() -> None:
    busy = attempt_error(classify_message("Exceeds maximum queue size"), "r0", "full")
    assert isinstance(busy, ResourceExhausted)
    assert busy.retry_after_s is not None
    assert busy.retry_after_s > 0
    dead = attempt_error(classify_message("Stub process 'm_0_0' is not healthy."), "r0", "dead")
    assert isinstance(dead, ReplicaFailed)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, FaultReason.INVALID_REQUEST),
        (grpc.StatusCode.OUT_OF_RANGE, FaultReason.INVALID_REQUEST),
        # a proxy's refusal (mesh policy, an older server) says nothing of the input
        (grpc.StatusCode.PERMISSION_DENIED, FaultReason.REQUEST_REFUSED),
        (grpc.StatusCode.UNIMPLEMENTED, FaultReason.REQUEST_REFUSED),
        (grpc.StatusCode.NOT_FOUND, FaultReason.REQUEST_REFUSED),
    ],
)
def test_only_statuses_that_blame_the_input_say_so(
    code: grpc.StatusCode, reason: FaultReason
) -> None:
    assert classify_status(code) == Fault(FaultKind.REQUEST, reason)


def test_the_engine_refusing_the_clients_input_is_invalid_argument_not_unavailable() -> None:
    """A 503 would be retried by the client (OpenAI SDKs retry twice), each retry refused."""
    text = "prompt of 9000 tokens exceeds max_num_tokens=8192 (chunked context is not enabled)"
    bad = attempt_error(classify_message(text), "r0", text)
    assert isinstance(bad, InvalidRequest)
    assert (bad.code, bad.http_status) == (grpc.StatusCode.INVALID_ARGUMENT, 400)
    unnamed = attempt_error(classify_message("something nobody listed"), "r0", "?")
    assert isinstance(unnamed, ReplicaFailed)  # may be the replica's: not blamed on the input
    # A continuation's input is the prompt and what was generated: not the client's to fix.
    continued = attempt_error(classify_message(text), "r0", text, clients_input=False)
    assert isinstance(continued, ReplicaFailed)
