"""Orchestrator errors; gRPC mapping lives in llmmesh.common.errors."""

from llmmesh.common.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable


class QueueFull(ResourceExhausted):
    pass


class NoReplicaReady(Unavailable):
    pass


class QueueTimeout(DeadlineExceeded):
    pass


class BadAdmission(InvalidArgument):
    pass
