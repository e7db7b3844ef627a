"""Error hierarchy base and its one mapping to gRPC status.

Each service raises subclasses of `ServiceError`; servicers never build statuses by hand. The
mapping below (and `http_status`, for HTTP fronts) is the only place a domain error becomes a
wire status.
"""

from __future__ import annotations

import enum
import math
from typing import ClassVar, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

RETRY_AFTER_KEY = "retry-after"
# The standard rich-error trailer (google.rpc.Status), as grpcio-status and grpcurl read it.
STATUS_DETAILS_KEY = "grpc-status-details-bin"
ERROR_DOMAIN = "llmmesh"
# A method refused as such, not this request: a peer older than the method (UNIMPLEMENTED) or a
# mesh policy that does not allow it yet (PERMISSION_DENIED). Callers fall back to an older way.
NOT_OFFERED: frozenset[grpc.StatusCode] = frozenset(
    {grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED}
)


class Reason(enum.StrEnum):
    """Why a call failed, for callers that act on it: sent as `google.rpc.ErrorInfo.reason`
    (domain `llmmesh`) in the status details, so nobody parses message text."""

    NO_REPLICA = "NO_REPLICA"  # no ready replica serves the model, version and prompt length
    QUEUE_FULL = "QUEUE_FULL"  # the admission queue is at its bound
    QUEUE_TIMEOUT = "QUEUE_TIMEOUT"  # no replica slot before the call's deadline
    ACTIVATION_TIMEOUT = "ACTIVATION_TIMEOUT"  # a scale-from-zero pool did not become ready
    # This orchestrator process cannot handle calls as fast as they come: another may.
    BUSY = "BUSY"
    # The orchestrator's gRPC ended the call unanswered (CANCELLED, not the caller's cancel):
    # held unstarted too long, or the process is stopping. Another may answer.
    DROPPED = "DROPPED"


class ServiceError(Exception):
    """A request-level failure with a status the client can act on."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500
    # The typed reason this class always carries (None: the status code says enough).
    default_reason: ClassVar[Reason | None] = None

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        retry_after_s: float | None = None,
        reason: Reason | None = None,
    ):
        self.field = field
        # A wait that never ends (inf) or is not a number says nothing a client can act on: it
        # is no retry-after (a header or trailer of "inf" would break the answer).
        finite = retry_after_s is not None and math.isfinite(retry_after_s)
        self.retry_after_s = retry_after_s if finite else None
        self.reason = reason or self.default_reason
        super().__init__(f"{field}: {message}" if field else message)


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED
    http_status = 499


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 400


class Internal(ServiceError):
    code = grpc.StatusCode.INTERNAL
    http_status = 500


_FROM_GRPC: dict[grpc.StatusCode, type[ServiceError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        Unauthenticated,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        FailedPrecondition,
    )
}


def trailing_metadata(err: ServiceError) -> tuple[tuple[str, str | bytes], ...]:
    out: list[tuple[str, str | bytes]] = []
    if err.retry_after_s is not None:
        out.append((RETRY_AFTER_KEY, f"{err.retry_after_s:.3f}"))
    if err.reason is not None:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.ErrorInfo(reason=err.reason.value, domain=ERROR_DOMAIN))
        status = status_pb2.Status(code=err.code.value[0], message=str(err), details=[detail])
        out.append((STATUS_DETAILS_KEY, status.SerializeToString()))
    return tuple(out)


def _reason(value: object) -> Reason | None:
    """The llmmesh ErrorInfo reason in a serialized google.rpc.Status, if any."""
    if not isinstance(value, bytes):
        return None
    status = status_pb2.Status()
    try:
        status.ParseFromString(value)
    except Exception:  # a malformed trailer carries no reason
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
            return _reason_named(info.reason)
    return None


async def abort(context: grpc.aio.ServicerContext[object, object], err: ServiceError) -> None:
    """Terminate the RPC with the error's status; retry-after travels as trailing metadata."""
    context.set_trailing_metadata(trailing_metadata(err))
    await context.abort(err.code, str(err))


_CODES: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def code_number(code: grpc.StatusCode) -> int:
    """The status code's number (google.rpc.Code), as a message field carries it."""
    return int(code.value[0])


def status_code(number: int) -> grpc.StatusCode:
    """The status code numbered `number`; UNKNOWN for a number gRPC does not define."""
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)


def from_fields(
    code: grpc.StatusCode, message: str, reason: str = "", retry_after_s: float | None = None
) -> ServiceError:
    """A refusal carried as message fields (a stream's answer, not a call's status) as the
    domain error the same status, reason and retry-after map to (`from_rpc_error`)."""
    return _FROM_GRPC.get(code, Unavailable)(
        message, retry_after_s=retry_after_s, reason=_reason_named(reason)
    )


def _reason_named(name: str) -> Reason | None:
    try:
        return Reason(name) if name else None
    except ValueError:  # a reason this version does not know: no reason
        return None


def from_rpc_error(err: grpc.aio.AioRpcError, what: str) -> ServiceError:
    """Re-raise a downstream RPC failure as a domain error, keeping its status and retry-after."""
    cls = _FROM_GRPC.get(err.code(), Unavailable)
    retry: float | None = None
    reason: Reason | None = None
    for item in err.trailing_metadata() or ():
        key, value = cast(tuple[str, str | bytes], item)
        if key == RETRY_AFTER_KEY:
            try:
                retry = float(value)
            except (TypeError, ValueError):
                retry = None
        elif key == STATUS_DETAILS_KEY:
            reason = _reason(value)
    return cls(f"{what}: {err.details()}", retry_after_s=retry, reason=reason)
