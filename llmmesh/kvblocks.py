"""KV-cache block identity shared by the engine emulator and the KV registry.

Invariant: the engine and the registry call the same function with the same `BlockConfig`, so an
engine's `stored` event and a registry lookup name the same block. A prompt is split into full
blocks of `block_size` tokens; a trailing partial block has no identity and is never indexed.

    h(-1) = seed
    h(i)  = xxh3_64(le64(h(i-1)) || salt || le32(tokens[i*B:(i+1)*B]), seed)

`salt` carries anything that makes equal tokens produce different KV (a LoRA adapter, a
per-tenant cache salt); it is empty for the base model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import xxhash


@dataclass(frozen=True, slots=True)
class BlockConfig:
    """Block size in tokens and hash seed; must be equal on engine and registry."""

    block_size: int
    hash_seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if not 0 <= self.hash_seed < 2**64:
            raise ValueError(f"hash_seed must fit in 64 unsigned bits, got {self.hash_seed}")


def full_blocks(num_tokens: int, block_size: int) -> int:
    """Number of full blocks in a sequence of `num_tokens` tokens."""
    return num_tokens // block_size


def chain_hash(
    parent: int, block_tokens: Sequence[int] | npt.NDArray[np.uint32], seed: int, salt: bytes = b""
) -> int:
    """Hash of one block given its parent's hash."""
    body = np.asarray(block_tokens, dtype="<u4").tobytes()
    return int(xxhash.xxh3_64_intdigest(parent.to_bytes(8, "little") + salt + body, seed=seed))


def block_hashes(
    tokens: Sequence[int] | npt.NDArray[np.uint32],
    config: BlockConfig,
    salt: bytes = b"",
    limit: int | None = None,
) -> list[int]:
    """Chained hashes of the full blocks of `tokens` (at most `limit` of them)."""
    arr = np.asarray(tokens, dtype="<u4")
    n = full_blocks(len(arr), config.block_size)
    if limit is not None:
        n = min(n, limit)
    out: list[int] = []
    parent = config.hash_seed
    bs = config.block_size
    for i in range(n):
        parent = chain_hash(parent, arr[i * bs : (i + 1) * bs], config.hash_seed, salt)
        out.append(parent)
    return out
