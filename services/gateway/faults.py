"""Fault classification: the one place that decides whether a failed engine call says the
replica cannot serve (a replica fault: the orchestrator counts it toward ejection), that the
replica is overloaded (back-pressure: try elsewhere or later, never a fault), or that the request
itself was bad (never the replica's fault). Our own deadline or cancellation is none of these;
`triton_stream` reports it as `EngineCallStopped` before classification.

In-stream errors (a `ModelStreamInfer` response with `error_message`) carry no status code, only
text, so they are matched against the table below; the texts are those Triton 2.51 and its
Python backend answer (observed on the real tritonserver: `tests/gateway/test_faults.py` lists
them), the TensorRT-LLM executor's, and our engines' (emulator, CPU engine). An in-stream error
no rule matches is a request error, as before: a client's bad input must never eject a replica.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

import grpc

from llmmesh.common.errors import Reason, ResourceExhausted, ServiceError
from services.gateway.errors import InvalidRequest, ReplicaFailed

# retry-after of an engine's queue-full refusal passed on to the client: the engine reports no
# drain rate; about one decode pass of a full batch frees its head.
ENGINE_BUSY_RETRY_AFTER_S = 1.0


class FaultKind(StrEnum):
    REPLICA = "replica"  # the replica cannot serve: counts toward its ejection
    BACK_PRESSURE = "back_pressure"  # the replica is full now: not a fault
    REQUEST = "request"  # the request was refused: never the replica's fault


class FaultReason(StrEnum):
    STREAM_BROKEN = "stream_broken"  # EOF before the final response
    TRANSPORT = "transport"  # gRPC UNAVAILABLE / INTERNAL / UNKNOWN
    BACKEND_DEAD = "backend_dead"  # the Python-backend stub (or engine worker) is gone
    MODEL_UNAVAILABLE = "model_unavailable"  # model unknown, unloaded, not ready
    ENGINE_STOPPING = "engine_stopping"  # the engine or server is shutting down
    ENGINE_INTERNAL = "engine_internal"  # the engine failed on its own side
    QUEUE_FULL = "queue_full"  # the engine's waiting queue is full
    # The client's own input: INVALID_ARGUMENT / OUT_OF_RANGE, or an engine's validation text.
    INVALID_REQUEST = "invalid_request"
    # A refusal that names no cause: an in-stream error no rule matches, another gRPC status.
    REQUEST_REFUSED = "request_refused"


@dataclass(frozen=True, slots=True)
class Fault:
    kind: FaultKind
    reason: FaultReason

    @property
    def replica_fault(self) -> bool:
        return self.kind is FaultKind.REPLICA

    @property
    def replica_wide(self) -> bool:
        """The replica cannot serve the stream's model (not just this stream): every other
        stream on it for that model (`model_scoped`), or for any (the server stops), is waiting
        for tokens that will not come, and should move on now."""
        return self.kind is FaultKind.REPLICA and self.reason in _REPLICA_WIDE

    @property
    def model_scoped(self) -> bool:
        """The fault is one model's on its replica (its backend stub died, it is unloaded):
        the replica's other models still serve."""
        return self.reason in _MODEL_SCOPED


_MODEL_SCOPED = frozenset({FaultReason.BACKEND_DEAD, FaultReason.MODEL_UNAVAILABLE})
_REPLICA_WIDE = _MODEL_SCOPED | {FaultReason.ENGINE_STOPPING}

# Status codes of a failed ModelStreamInfer call (DEADLINE_EXCEEDED, and a CANCELLED from this
# side, are ours and never get here). Any code not listed is a request error: the client's own
# input for INVALID_ARGUMENT and OUT_OF_RANGE, else a refusal that names no cause (NOT_FOUND,
# PERMISSION_DENIED or UNIMPLEMENTED from a proxy, ...): the client is not told its input was bad.
_STATUS: dict[grpc.StatusCode, Fault] = {
    grpc.StatusCode.INVALID_ARGUMENT: Fault(FaultKind.REQUEST, FaultReason.INVALID_REQUEST),
    grpc.StatusCode.OUT_OF_RANGE: Fault(FaultKind.REQUEST, FaultReason.INVALID_REQUEST),
    grpc.StatusCode.UNAVAILABLE: Fault(FaultKind.REPLICA, FaultReason.TRANSPORT),
    grpc.StatusCode.INTERNAL: Fault(FaultKind.REPLICA, FaultReason.TRANSPORT),
    grpc.StatusCode.UNKNOWN: Fault(FaultKind.REPLICA, FaultReason.TRANSPORT),
    grpc.StatusCode.RESOURCE_EXHAUSTED: Fault(FaultKind.BACK_PRESSURE, FaultReason.QUEUE_FULL),
    # From the peer: a proxy's or the server's reset of the stream.
    grpc.StatusCode.CANCELLED: Fault(FaultKind.REPLICA, FaultReason.STREAM_BROKEN),
}

# In-stream error texts, first match wins (case-insensitive). Back-pressure rules come first: a
# queue-full message may also say "RESOURCE_EXHAUSTED" or "try again", never a fault.
_MESSAGES: tuple[tuple[re.Pattern[str], Fault], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), Fault(kind, reason))
    for pattern, kind, reason in (
        # Engine queue full: our engines, emulator and CPU engine ("RESOURCE_EXHAUSTED: N
        # requests already wait for a batch slot (max_queue_size=M); retry later"), the
        # TensorRT-LLM executor ("Maximum queue size of N has been reached, please try again
        # later"), Triton's own scheduler queue bounded by the same `max_queue_size` ("Exceeds
        # maximum queue size").
        (r"^RESOURCE_EXHAUSTED\b", FaultKind.BACK_PRESSURE, FaultReason.QUEUE_FULL),
        (r"maximum queue size .* reached", FaultKind.BACK_PRESSURE, FaultReason.QUEUE_FULL),
        (r"exceeds maximum queue size", FaultKind.BACK_PRESSURE, FaultReason.QUEUE_FULL),
        (r"\bqueue (is )?full\b", FaultKind.BACK_PRESSURE, FaultReason.QUEUE_FULL),
        # Triton Python backend, stub process dead: "Stub process 'tensorrt_llm_0_0' is not
        # healthy." (2.51, observed); "... is unhealthy and it will be restarted" (newer).
        (r"stub process\b.*\b(not healthy|unhealthy)", FaultKind.REPLICA, FaultReason.BACKEND_DEAD),
        (r"failed to (re)?start the stub process", FaultKind.REPLICA, FaultReason.BACKEND_DEAD),
        (r"\bstub process\b.*\b(exited|died|crashed)", FaultKind.REPLICA, FaultReason.BACKEND_DEAD),
        # Triton core, model not served: "Request for unknown model: 'm' is not found"
        # (observed), "... has no available versions", "... version N is not at ready state".
        # The gateway asks for the model the replica is registered to serve, so this is the
        # replica's fault (unloaded, failed to load), not the client's.
        (r"request for unknown model", FaultKind.REPLICA, FaultReason.MODEL_UNAVAILABLE),
        (r"is not at ready state", FaultKind.REPLICA, FaultReason.MODEL_UNAVAILABLE),
        (
            r"\bmodel\b.*\b(is not ready|unavailable|is unloading|unloaded)",
            FaultKind.REPLICA,
            FaultReason.MODEL_UNAVAILABLE,
        ),
        # Shutting down: our engines ("engine is stopping"), Triton ("Server is stopping" /
        # "Server is not ready"), TensorRT-LLM ("... shutting down", "Shutdown called").
        (r"\bengine is stopping\b", FaultKind.REPLICA, FaultReason.ENGINE_STOPPING),
        (r"\bserver is (stopping|not ready)\b", FaultKind.REPLICA, FaultReason.ENGINE_STOPPING),
        (r"\bshutting down\b|\bshutdown called\b", FaultKind.REPLICA, FaultReason.ENGINE_STOPPING),
        # An engine failure that is not about the request: our engines' catch-all ("internal
        # error: ..."), CUDA failures, executor failures.
        (r"^internal error\b", FaultKind.REPLICA, FaultReason.ENGINE_INTERNAL),
        (
            r"\bCUDA (error|runtime error)\b|out of memory",
            FaultKind.REPLICA,
            FaultReason.ENGINE_INTERNAL,
        ),
        (r"executor worker\b.*\b(died|exited|failed)", FaultKind.REPLICA, FaultReason.BACKEND_DEAD),
        # The request's size, which no replica of this deployment takes: our engines' limits
        # on prompt and output lengths (emulator: "prompt of N tokens exceeds max_num_tokens=M
        # (chunked context is not enabled)", "prompt (P) + request_output_len (O) tokens need B
        # KV blocks of 32 tokens, the cache holds C"; CPU engine: "... exceeds
        # max_prefill_tokens=M", "... exceeds max_seq_len=M", "... exceeds kv_token_budget=M").
        # Not what the gateway builds itself (an empty prompt, a tensor's shape: the gateway
        # refuses the one and sends the other; a replica refusing them does not match this
        # gateway, and the request is retried elsewhere).
        (
            r"\bexceeds (max_num_tokens|max_prefill_tokens|max_seq_len|kv_token_budget)=",
            FaultKind.REQUEST,
            FaultReason.INVALID_REQUEST,
        ),
        (r"\btokens need \d+ KV blocks\b", FaultKind.REQUEST, FaultReason.INVALID_REQUEST),
    )
)

STREAM_BROKEN = Fault(FaultKind.REPLICA, FaultReason.STREAM_BROKEN)
_REFUSED = Fault(FaultKind.REQUEST, FaultReason.REQUEST_REFUSED)
# For callers that only know whose fault it is (e.g. the gateway's stall timeout).
REPLICA_FAULT = Fault(FaultKind.REPLICA, FaultReason.STREAM_BROKEN)
REQUEST_FAULT = _REFUSED


def classify_status(code: grpc.StatusCode) -> Fault:
    """The fault a ModelStreamInfer call that ended with `code` (not DEADLINE_EXCEEDED, nor a
    CANCELLED from this side: those are our own) stands for."""
    return _STATUS.get(code, _REFUSED)


def classify_message(message: str) -> Fault:
    """The fault an in-stream error message stands for; unmatched text is a request error."""
    for pattern, fault in _MESSAGES:
        if pattern.search(message):
            return fault
    return _REFUSED


def attempt_error(
    fault: Fault, replica_id: str, detail: str, *, clients_input: bool = True
) -> ServiceError:
    """What the client gets for a failed attempt that is not retried: back-pressure (a full
    engine queue) is RESOURCE_EXHAUSTED with a retry-after, like the orchestrator's own queue,
    never UNAVAILABLE (the replica is healthy, only full); the engine refusing the client's own
    input (`INVALID_REQUEST`, the attempt's input being the client's prompt: `clients_input`,
    not a continuation the gateway built after tokens were generated) INVALID_ARGUMENT (HTTP
    400: a client retrying it, as SDKs retry a 503, would only be refused again); anything
    else `ReplicaFailed` (a refusal no rule names may be a replica's)."""
    if fault.reason is FaultReason.INVALID_REQUEST and clients_input:
        return InvalidRequest(f"replica {replica_id} refused the request: {detail}")
    message = f"replica {replica_id} failed: {detail}"
    if fault.kind is FaultKind.BACK_PRESSURE:
        return ResourceExhausted(
            message, retry_after_s=ENGINE_BUSY_RETRY_AFTER_S, reason=Reason.QUEUE_FULL
        )
    return ReplicaFailed(message)
