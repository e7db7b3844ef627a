"""gRPC adapter: protobuf ↔ registry core."""

from __future__ import annotations

import grpc

from llmmesh.common.errors import ServiceError, abort
from llmmesh.kvblocks import BlockConfig
from llmmesh.kvregistry.v1 import kvregistry_pb2 as pb
from llmmesh.kvregistry.v1 import kvregistry_pb2_grpc as pb_grpc
from services.kv_registry.core import Cleared, Event, KvRegistry, Removed, Stored
from services.kv_registry.errors import BlockConfigMismatch

Ctx = grpc.aio.ServicerContext[object, object]


def event_from_pb(ev: pb.KvEvent) -> Event:
    kind = ev.WhichOneof("kind")
    if kind == "stored":
        parent = ev.stored.parent_hash if ev.stored.HasField("parent_hash") else None
        return Stored(ev.sequence, tuple(b.block_hash for b in ev.stored.blocks), parent)
    if kind == "removed":
        return Removed(ev.sequence, tuple(ev.removed.block_hashes))
    if kind == "cleared":
        return Cleared(ev.sequence)
    raise BlockConfigMismatch(f"event {ev.sequence} has no kind", field="events")


class KvRegistryServicer(pb_grpc.KvRegistryServiceServicer):
    def __init__(self, core: KvRegistry):
        self._core = core

    async def PublishEvents(
        self, request: pb.PublishEventsRequest, context: Ctx
    ) -> pb.PublishEventsResponse:
        try:
            if request.block_size == 0:
                raise BlockConfigMismatch("must be positive", field="block_size")
            cfg = BlockConfig(request.block_size, request.hash_seed)
            events = [event_from_pb(e) for e in request.events]
            res = self._core.ingest(request.replica_id, request.epoch, cfg, events)
        except ServiceError as err:
            await abort(context, err)
            raise
        return pb.PublishEventsResponse(
            next_sequence=res.next_sequence, resync_required=res.resync_required
        )

    async def Lookup(self, request: pb.LookupRequest, context: Ctx) -> pb.LookupResponse:
        res = self._core.lookup(request.token_ids)
        bs = self._core.block_config.block_size
        return pb.LookupResponse(
            block_size=bs,
            prompt_blocks=res.prompt_blocks,
            matches=[
                pb.ReplicaMatch(
                    replica_id=m.replica_id,
                    matched_blocks=m.matched_blocks,
                    matched_tokens=m.matched_blocks * bs,
                )
                for m in res.matches
            ],
        )
