"""The orchestrator's view of kv_registry: prefix lookups for routing, and the approximate-mode
loop (record each routing decision as predicted blocks; correct it with what the engine reports).

Every call degrades gracefully: a failed lookup routes prefix-blind, a failed record or report
only loses prediction quality. Prompts are hashed once here and sent as block hashes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from llmmesh.common.telemetry import inject_trace_metadata
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2 as pb
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2_grpc as pb_grpc
from llmmesh.kvblocks import BlockConfig, block_hashes

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PrefixMatches:
    prompt_blocks: int
    matched_blocks: dict[str, int]
    hashes: tuple[int, ...] = field(default=())

    def fraction(self, replica_id: str) -> float:
        if self.prompt_blocks == 0:
            return 0.0
        return self.matched_blocks.get(replica_id, 0) / self.prompt_blocks


NO_MATCHES = PrefixMatches(0, {})


class PrefixIndex(Protocol):
    async def lookup(self, token_ids: Sequence[int]) -> PrefixMatches: ...

    async def record_routing(self, replica_id: str, hashes: Sequence[int]) -> int:
        """Blocks the registry predicted the replica held before this routing."""
        ...

    async def report_reuse(
        self,
        replica_id: str,
        hashes: Sequence[int],
        reported: int,
        prompt_tokens: int,
        predicted: int,
    ) -> None: ...

    async def drop_replica(self, replica_id: str) -> None: ...


class RegistryPrefixIndex:
    def __init__(self, address: str, block_config: BlockConfig, timeout_s: float):
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = pb_grpc.KvRegistryServiceStub(self._channel)
        self._config = block_config
        self._timeout_s = timeout_s

    async def lookup(self, token_ids: Sequence[int]) -> PrefixMatches:
        hashes = tuple(block_hashes(token_ids, self._config))
        if not hashes:
            return NO_MATCHES
        try:
            resp = await self._stub.Lookup(
                pb.LookupRequest(block_hashes=hashes),
                timeout=self._timeout_s,
                metadata=tuple(inject_trace_metadata([])),
            )
        except grpc.aio.AioRpcError as err:
            log.debug("prefix lookup failed", extra={"error": err.code().name})
            return PrefixMatches(len(hashes), {}, hashes)
        return PrefixMatches(
            resp.prompt_blocks, {m.replica_id: m.matched_blocks for m in resp.matches}, hashes
        )

    async def record_routing(self, replica_id: str, hashes: Sequence[int]) -> int:
        try:
            resp = await self._stub.RecordRouting(
                pb.RecordRoutingRequest(replica_id=replica_id, block_hashes=hashes), timeout=1.0
            )
        except grpc.aio.AioRpcError as err:
            log.debug("record routing failed", extra={"error": err.code().name})
            return 0
        return int(resp.predicted_blocks)

    async def report_reuse(
        self,
        replica_id: str,
        hashes: Sequence[int],
        reported: int,
        prompt_tokens: int,
        predicted: int,
    ) -> None:
        try:
            await self._stub.ReportReuse(
                pb.ReportReuseRequest(
                    replica_id=replica_id,
                    block_hashes=hashes,
                    reported_reused_blocks=reported,
                    prompt_tokens=prompt_tokens,
                    predicted_blocks=predicted,
                ),
                timeout=1.0,
            )
        except grpc.aio.AioRpcError as err:
            log.debug("report reuse failed", extra={"error": err.code().name})

    async def drop_replica(self, replica_id: str) -> None:
        try:
            await self._stub.DropReplica(pb.DropReplicaRequest(replica_id=replica_id), timeout=1.0)
        except grpc.aio.AioRpcError as err:
            log.debug("drop replica failed", extra={"error": err.code().name})

    async def close(self) -> None:
        await self._channel.close(None)
