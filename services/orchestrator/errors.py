"""Orchestrator errors; gRPC mapping lives in llmmesh.common.errors."""

from llmmesh.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Reason,
    ResourceExhausted,
    Unavailable,
)


class QueueFull(ResourceExhausted):
    default_reason = Reason.QUEUE_FULL


class Busy(ResourceExhausted):
    """Shed before any work: this process is behind on its calls (`shedding.py`)."""

    default_reason = Reason.BUSY


class NoReplicaReady(Unavailable):
    default_reason = Reason.NO_REPLICA


class ActivationTimeout(NoReplicaReady):
    """A scale-from-zero pool had no ready replica within its activation timeout."""

    default_reason = Reason.ACTIVATION_TIMEOUT


class QueueTimeout(DeadlineExceeded):
    default_reason = Reason.QUEUE_TIMEOUT


class BadAdmission(InvalidArgument):
    pass


class BadReplicaSpec(InvalidArgument):
    pass


class UnknownReplica(NotFound):
    pass


class ReplicaConflict(FailedPrecondition):
    """The call would change a replica it may not change (static or discovered; leases live)."""


class StreamFull(Busy):
    """An AdmitStream already holds its bound of unanswered Admits: this process is behind on
    that caller's Admits (another orchestrator may not be)."""


class Draining(Unavailable):
    """The orchestrator is stopping: it reads no more Admits (no reason: another orchestrator
    takes them, as a call the stopping server refused)."""
