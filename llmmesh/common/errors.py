"""Error hierarchy base and its one mapping to gRPC status.

Each service raises subclasses of `ServiceError`; servicers never build statuses by hand. The
mapping below (and `http_status`, for HTTP fronts) is the only place a domain error becomes a
wire status.
"""

from __future__ import annotations

from typing import cast

import grpc

RETRY_AFTER_KEY = "retry-after"


class ServiceError(Exception):
    """A request-level failure with a status the client can act on."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500

    def __init__(
        self, message: str, *, field: str | None = None, retry_after_s: float | None = None
    ):
        self.field = field
        self.retry_after_s = retry_after_s
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


def trailing_metadata(err: ServiceError) -> tuple[tuple[str, str], ...]:
    if err.retry_after_s is None:
        return ()
    return ((RETRY_AFTER_KEY, f"{err.retry_after_s:.3f}"),)


async def abort(context: grpc.aio.ServicerContext[object, object], err: ServiceError) -> None:
    """Terminate the RPC with the error's status; retry-after travels as trailing metadata."""
    context.set_trailing_metadata(trailing_metadata(err))
    await context.abort(err.code, str(err))


def from_rpc_error(err: grpc.aio.AioRpcError, what: str) -> ServiceError:
    """Re-raise a downstream RPC failure as a domain error, keeping its status and retry-after."""
    cls = _FROM_GRPC.get(err.code(), Unavailable)
    retry: float | None = None
    for item in err.trailing_metadata() or ():
        key, value = cast(tuple[str, str], item)
        if key == RETRY_AFTER_KEY:
            try:
                retry = float(value)
            except (TypeError, ValueError):
                retry = None
    return cls(f"{what}: {err.details()}", retry_after_s=retry)
