"""KV-cache events, mirroring `llmmesh.kvregistry.v1.KvEvent` without depending on protobuf."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StoredBlock:
    block_hash: int
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class BlocksStored:
    """Consecutive blocks of one sequence; `parent_hash` is None when blocks[0] is a first block."""

    parent_hash: int | None
    blocks: tuple[StoredBlock, ...]


@dataclass(frozen=True, slots=True)
class BlocksRemoved:
    block_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KvEventData = BlocksStored | BlocksRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class KvEvent:
    """One event with its per-epoch sequence number (0, 1, 2, ... without gaps)."""

    sequence: int
    data: KvEventData
