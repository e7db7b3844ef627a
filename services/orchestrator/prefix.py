"""Prefix overlap from kv_registry, for routing. Failures degrade to prefix-blind routing."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from llmmesh.kvregistry.v1 import kvregistry_pb2 as pb
from llmmesh.kvregistry.v1 import kvregistry_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PrefixMatches:
    prompt_blocks: int
    matched_blocks: dict[str, int]

    def fraction(self, replica_id: str) -> float:
        if self.prompt_blocks == 0:
            return 0.0
        return self.matched_blocks.get(replica_id, 0) / self.prompt_blocks


NO_MATCHES = PrefixMatches(0, {})


class PrefixIndex(Protocol):
    async def lookup(self, token_ids: Sequence[int]) -> PrefixMatches: ...


class RegistryPrefixIndex:
    def __init__(self, address: str, timeout_s: float):
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = pb_grpc.KvRegistryServiceStub(self._channel)
        self._timeout_s = timeout_s

    async def lookup(self, token_ids: Sequence[int]) -> PrefixMatches:
        try:
            resp = await self._stub.Lookup(
                pb.LookupRequest(token_ids=token_ids), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as err:
            log.debug("prefix lookup failed", extra={"error": err.code().name})
            return NO_MATCHES
        return PrefixMatches(
            resp.prompt_blocks, {m.replica_id: m.matched_blocks for m in resp.matches}
        )

    async def close(self) -> None:
        await self._channel.close(None)
