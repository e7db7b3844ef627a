"""Orchestrator errors; gRPC mapping lives in llmmesh.common.errors."""

from llmmesh.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)


class QueueFull(ResourceExhausted):
    pass


class NoReplicaReady(Unavailable):
    pass


class QueueTimeout(DeadlineExceeded):
    pass


class BadAdmission(InvalidArgument):
    pass


class BadReplicaSpec(InvalidArgument):
    pass


class UnknownReplica(NotFound):
    pass


class ReplicaConflict(FailedPrecondition):
    """The call would change a replica it may not change (static or discovered; leases live)."""
