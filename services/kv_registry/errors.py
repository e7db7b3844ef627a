"""kv_registry errors; gRPC mapping lives in llmmesh.common.errors."""

from llmmesh.common.errors import FailedPrecondition, InvalidArgument


class BlockConfigMismatch(InvalidArgument):
    """An engine publishes with a block size or hash seed that differs from the registry's."""


class BatchTooLarge(InvalidArgument):
    pass


class SupersededEpoch(FailedPrecondition):
    """A batch of an engine lifetime that started before the one the registry keeps for the
    replica id (a replaced engine's late batch, or a second engine publishing under the id):
    not applied, so it cannot wipe the later lifetime's account."""
