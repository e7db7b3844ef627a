"""kv_registry errors; gRPC mapping lives in llmmesh.common.errors."""

from llmmesh.common.errors import InvalidArgument


class BlockConfigMismatch(InvalidArgument):
    """An engine publishes with a block size or hash seed that differs from the registry's."""


class BatchTooLarge(InvalidArgument):
    pass
