"""Gateway errors; gRPC mapping lives in llmmesh.common.errors (HTTP status on each class)."""

from llmmesh.common.errors import InvalidArgument, NotFound, Unavailable


class InvalidRequest(InvalidArgument):
    pass


class ModelNotFound(NotFound):
    pass


class ReplicaFailed(Unavailable):
    """The replica serving the request failed mid-stream."""


class OrchestratorUnavailable(Unavailable):
    pass
