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

import re
import struct
import sys
import uuid
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import xxhash

# An engine lifetime's epoch (`new_epoch`): its start in Unix nanoseconds (20 digits), then a
# random part. One replica id's epochs order by start, so a registry keeps the latest lifetime's
# account and refuses an earlier lifetime's late batches (`epoch_precedes`); epochs without
# that prefix (another publisher's) do not order, and a new one replaces the last as before.
_EPOCH_START = re.compile(r"(\d{20})-")

_LE64 = struct.Struct("<Q").pack
_xxh3 = xxhash.xxh3_64_intdigest
_xxh3_128 = xxhash.xxh3_128_intdigest


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


def new_epoch(started_unix_ns: int) -> str:
    """The epoch of an engine lifetime that started at `started_unix_ns` (wall clock: lifetimes
    of one replica id follow each other across processes and hosts)."""
    return f"{started_unix_ns:020d}-{uuid.uuid4().hex}"


def epoch_precedes(epoch: str, other: str) -> bool:
    """`epoch` is an engine lifetime that started before `other` did (False when either does
    not carry its start, or both started in the same nanosecond)."""
    a, b = _EPOCH_START.match(epoch), _EPOCH_START.match(other)
    return a is not None and b is not None and int(a.group(1)) < int(b.group(1))


def full_blocks(num_tokens: int, block_size: int) -> int:
    """Number of full blocks in a sequence of `num_tokens` tokens."""
    return num_tokens // block_size


def chain_hash(
    parent: int, block_tokens: Sequence[int] | npt.NDArray[np.uint32], seed: int, salt: bytes = b""
) -> int:
    """Hash of one block given its parent's hash."""
    body = np.asarray(block_tokens, dtype="<u4").tobytes()
    return int(xxhash.xxh3_64_intdigest(parent.to_bytes(8, "little") + salt + body, seed=seed))


def token_bytes(tokens: Sequence[int] | npt.NDArray[np.uint32]) -> bytes:
    """Token ids as consecutive little-endian uint32: the bytes the block hash covers."""
    if isinstance(tokens, memoryview) and tokens.format == "I" and sys.byteorder == "little":
        return tokens.tobytes()  # `tokens_from_bytes`' view: the bytes themselves
    arr = array("I", [int(t) for t in tokens] if isinstance(tokens, np.ndarray) else tokens)
    if sys.byteorder != "little":  # pragma: no cover
        arr.byteswap()
    return arr.tobytes()


def _le_view(body: bytes, code: Literal["I", "Q"], what: str) -> Sequence[int]:
    """`body` as consecutive little-endian unsigned ints of array typecode `code`: a view
    without a copy on little-endian hosts. ValueError when `body` is no whole number of them."""
    size = array(code).itemsize
    if len(body) % size:
        raise ValueError(f"{len(body)} bytes are no whole number of uint{size * 8} {what}")
    if sys.byteorder == "little":
        return memoryview(body).cast(code)
    arr = array(code, body)  # pragma: no cover
    arr.byteswap()  # pragma: no cover
    return arr  # pragma: no cover


def tokens_from_bytes(body: bytes) -> Sequence[int]:
    """`token_bytes`' inverse without a copy on little-endian hosts (a uint32 view of `body`).
    ValueError when `body` is no whole number of tokens."""
    return _le_view(body, "I", "tokens")


def hash_bytes(hashes: Sequence[int]) -> bytes:
    """Block hashes as consecutive little-endian uint64: how a prompt's hashes travel."""
    return struct.pack(f"<{len(hashes)}Q", *hashes)


def hashes_from_le64(body: bytes) -> Sequence[int]:
    """`hash_bytes`' inverse without a copy on little-endian hosts (a uint64 view of `body`: a
    hash becomes an int only when read, and a lookup reads a few of a long prompt's).
    ValueError when `body` is no whole number of hashes."""
    return _le_view(body, "Q", "hashes")


def hashes_from_bytes(
    body: bytes,
    config: BlockConfig,
    salt: bytes = b"",
    limit: int | None = None,
    parent: int | None = None,
) -> list[int]:
    """Chained hashes of the full blocks of `body` (little-endian uint32 tokens); `parent`: the
    hash of the block before `body`'s first (None: `body` starts the prompt).

    Same result as folding `chain_hash` over the blocks, ~3x faster: the tokens are converted to
    bytes once and sliced per block (one xxh3 call per block is what remains)."""
    step = config.block_size * 4
    n = len(body) // step
    if limit is not None:
        n = min(n, limit)
    seed = config.hash_seed
    h = seed if parent is None else parent
    out: list[int] = []
    for off in range(0, n * step, step):
        h = _xxh3(_LE64(h) + salt + body[off : off + step], seed)
        out.append(h)
    return out


@dataclass(frozen=True, slots=True)
class PromptHashes:
    """A prompt's full blocks' chained hashes as its sender computed them, with `config`: equal
    to a receiver's own hashes of the prompt only when the receiver's config is `config`."""

    config: BlockConfig
    hashes: Sequence[int]

    def under(self, config: BlockConfig) -> Sequence[int] | None:
        """The hashes when `config` is the one they were computed with (else None)."""
        return self.hashes if self.config == config else None


class ChunkedHashes:
    """`hashes_from_bytes` (no salt) for prompts that share long prefixes, with bounded LRUs of
    chunks of `CHUNK_BLOCKS` full blocks and of sub-chunks of `SUB_BLOCKS`: a chunk seen before
    after the same parent hash costs one xxh3-128 of its bytes instead of a chain step per
    block; a chunk not seen before is taken by sub-chunks, so a prompt that differs from one
    seen before (its sub-chunks still cached) only in its last blocks chains the blocks from the
    sub-chunk the difference is in (fewer than 2 x `SUB_BLOCKS` with the blocks after the last
    whole sub-chunk, which are chained directly). Each LRU holds at most `max_chunks` pieces; a
    chunk found does not refresh its sub-chunks. A salt would have to be part of the
    key. A piece is keyed by (parent hash, xxh3-128 of its bytes): a false hit needs a 128-bit
    collision; xxh3 is not a cryptographic hash, so one crafted on purpose would only misname
    that prompt's blocks to its own caller (routing, not data). Pieces are kept as their
    hashes' le64 bytes, the form the hashes travel in. Results equal `hashes_from_bytes` bit
    for bit."""

    CHUNK_BLOCKS = 64
    SUB_BLOCKS = 8

    def __init__(self, config: BlockConfig, max_chunks: int = 4096) -> None:
        self._config = config
        self._chunk_bytes = self.CHUNK_BLOCKS * config.block_size * 4
        self._sub_bytes = self.SUB_BLOCKS * config.block_size * 4
        self._max_chunks = max_chunks
        # (parent, xxh3-128 of the piece) -> (its hashes as le64, its last hash)
        self._chunks: OrderedDict[tuple[int, int], tuple[bytes, int]] = OrderedDict()
        self._subs: OrderedDict[tuple[int, int], tuple[bytes, int]] = OrderedDict()

    @property
    def config(self) -> BlockConfig:
        return self._config

    def __call__(self, body: bytes) -> Sequence[int]:
        """The chained hashes of `body`'s full blocks."""
        return hashes_from_le64(self.le64(body))

    def le64(self, body: bytes) -> bytes:
        """The chained hashes of `body`'s full blocks as consecutive little-endian uint64s."""
        parts: list[bytes] = []
        parent = self._config.hash_seed
        chunk, sub = self._chunk_bytes, self._sub_bytes
        whole = len(body) // chunk * chunk
        for off in range(0, whole, chunk):
            parent = self._chunk(body[off : off + chunk], parent, parts)
        subs = whole + (len(body) - whole) // sub * sub
        for off in range(whole, subs, sub):
            parent = self._sub(body[off : off + sub], parent, parts)
        if len(body) - subs >= self._config.block_size * 4:
            parts.append(hash_bytes(hashes_from_bytes(body[subs:], self._config, parent=parent)))
        return b"".join(parts)

    def _chunk(self, piece: bytes, parent: int, parts: list[bytes]) -> int:
        return self._cached(self._chunks, piece, parent, parts, self._by_subs)

    def _sub(self, piece: bytes, parent: int, parts: list[bytes]) -> int:
        return self._cached(self._subs, piece, parent, parts, self._chained)

    def _by_subs(self, piece: bytes, parent: int) -> tuple[bytes, int]:
        """A chunk's hashes taken by its sub-chunks (each cached on its own)."""
        own: list[bytes] = []
        sub = self._sub_bytes
        for off in range(0, len(piece), sub):
            parent = self._sub(piece[off : off + sub], parent, own)
        return b"".join(own), parent

    def _chained(self, piece: bytes, parent: int) -> tuple[bytes, int]:
        hashes = hashes_from_bytes(piece, self._config, parent=parent)
        return hash_bytes(hashes), hashes[-1]

    def _cached(
        self,
        cache: OrderedDict[tuple[int, int], tuple[bytes, int]],
        piece: bytes,
        parent: int,
        parts: list[bytes],
        compute: Callable[[bytes, int], tuple[bytes, int]],
    ) -> int:
        """Append `piece`'s hashes after `parent` to `parts` from `cache` (LRU, at most
        `max_chunks`), computed on a miss; the piece's last hash."""
        key = (parent, _xxh3_128(piece))
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = compute(piece, parent)
            if len(cache) > self._max_chunks:
                cache.popitem(last=False)
        else:
            cache.move_to_end(key)
        parts.append(hit[0])
        return hit[1]


def block_hashes(
    tokens: Sequence[int] | npt.NDArray[np.uint32],
    config: BlockConfig,
    salt: bytes = b"",
    limit: int | None = None,
) -> list[int]:
    """Chained hashes of the full blocks of `tokens` (at most `limit` of them)."""
    if limit is not None:
        tokens = tokens[: max(0, limit) * config.block_size]
    return hashes_from_bytes(token_bytes(tokens), config, salt, limit)
