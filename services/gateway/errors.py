"""Gateway errors; gRPC mapping lives in llmmesh.common.errors (HTTP status on each class)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from llmmesh.common.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)

if TYPE_CHECKING:
    from services.gateway.limits import RateLimitSnapshot


class InvalidRequest(InvalidArgument):
    pass


class ContextLengthExceeded(InvalidRequest):
    """Prompt (plus max_tokens) does not fit the model's context window."""


class ModelNotFound(NotFound):
    pass


class ReplicaFailed(Unavailable):
    """The replica serving the request failed mid-stream."""


class OrchestratorUnavailable(Unavailable):
    """The orchestrator was not reached (UNAVAILABLE without a typed reason)."""


class OrchestratorTimedOut(OrchestratorUnavailable):
    """A call to the orchestrator had no answer within its deadline: the process is hung, or
    behind on its work (which its other answers tell apart: `OrchestratorSet`)."""


class NoReplica(Unavailable):
    """The orchestrator has no ready replica for the request (reason NO_REPLICA), or a
    scale-from-zero pool did not become ready in time (ACTIVATION_TIMEOUT)."""


class RateLimited(ResourceExhausted):
    """A tenant's requests/min, tokens/min or concurrency limit; `snapshot` (rate limits)
    feeds `x-ratelimit-*` headers."""

    def __init__(
        self,
        message: str,
        *,
        limit: str,
        retry_after_s: float | None = None,
        snapshot: RateLimitSnapshot | None = None,
    ):
        super().__init__(message, retry_after_s=retry_after_s)
        self.limit = limit  # "requests" | "tokens" | "concurrency"
        self.snapshot = snapshot


class PromptOverTokenLimit(RateLimited):
    """A prompt larger than the tenant's whole tokens-per-minute limit: no wait makes it fit
    (no retry-after; HTTP says `x-should-retry: false`, or OpenAI's clients would send it
    again)."""

    def __init__(self, message: str, *, snapshot: RateLimitSnapshot | None = None):
        super().__init__(message, limit="tokens", snapshot=snapshot)


class GatewayOverloaded(ResourceExhausted):
    """This gateway process holds `max_concurrent_streams` generations (limits.py)."""


class RequestIdConflict(ServiceError):
    """A client request id (idempotency key) reused for a different request body."""

    code = grpc.StatusCode.ALREADY_EXISTS
    http_status = 409


class ResumeStoreFull(ResourceExhausted):
    """The idempotency store cannot hold another keyed generation (services/gateway/resume.py)."""
