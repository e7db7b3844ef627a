"""Paged KV cache with prefix reuse, LRU eviction and a KV event stream.

Model (TensorRT-LLM's block manager with `enable_kv_cache_reuse`, `guaranteed_no_evict`):

- The cache has `num_blocks` blocks of `block_size` tokens. A sequence holds a list of blocks; the
  last one may be partial. A block that becomes full gets its chained hash
  (`llmmesh.kvblocks.chain_hash`, the registry's function) and is *stored*: indexed by hash so that
  other sequences can reuse it, and announced with a `BlocksStored` event.
- Admission matches the prompt's leading full blocks against stored blocks and references them
  (refcount) instead of recomputing. Like TensorRT-LLM, at most `(len(prompt) - 1) // block_size`
  blocks are reused: the last prompt token is always recomputed to produce the first output logits.
- When a stored block is filled again by another sequence (same hash), the sequence switches to
  the stored block and returns its own copy to the free pool (no duplicate is indexed).
- Admission reserves every block the sequence can ever need (prompt + max_new_tokens), so a running
  sequence never runs out of blocks; blocks are *allocated* lazily as tokens are appended.
- When the last reference to a stored block goes away it stays cached, unreferenced, and is evicted
  least-recently-used first when a new block is needed (`BlocksRemoved`). A sequence's blocks are
  released leaf first, so a prefix is never evicted before its extensions. Partial blocks are
  freed immediately.

Counts (TensorRT-LLM's KV cache stats): `used` = referenced blocks, `free` = `num_blocks - used`
(free includes cached-but-unreferenced blocks, which are reclaimable).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from llmmesh.emulator.events import (
    AllBlocksCleared,
    BlocksRemoved,
    BlocksStored,
    KvEvent,
    KvEventData,
    StoredBlock,
)
from llmmesh.kvblocks import BlockConfig, block_hashes, chain_hash


class _Block:
    __slots__ = ("block_hash", "depth", "parent_hash", "ref_count", "tokens")

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.tokens: list[int] = []
        self.ref_count = 1
        self.block_hash: int | None = None
        self.parent_hash: int | None = None


@dataclass(frozen=True, slots=True)
class SequenceBlocks:
    """Per-request KV statistics (TensorRT-LLM's `kv_cache_*_blocks` perf metrics)."""

    reused_blocks: int
    new_blocks: int

    @property
    def total_blocks(self) -> int:
        return self.reused_blocks + self.new_blocks


@dataclass(slots=True)
class _Sequence:
    blocks: list[_Block]
    num_tokens: int
    reserved: int
    reused: int
    new_blocks: int = 0


@dataclass(slots=True)
class _PendingStored:
    parent_hash: int | None
    blocks: list[StoredBlock] = field(default_factory=list)


class CacheCapacityError(RuntimeError):
    """A sequence needs a block it never reserved (appending beyond `max_new_tokens`)."""


class PagedKvCache:
    """Not thread-safe: the engine serialises every call."""

    def __init__(self, num_blocks: int, config: BlockConfig) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.config = config
        self.num_blocks = num_blocks
        self._empty = num_blocks
        self._referenced = 0
        self._reserved = 0
        self._by_hash: dict[int, _Block] = {}
        self._evictable: OrderedDict[int, _Block] = OrderedDict()
        self._seqs: dict[str, _Sequence] = {}
        self._pending: list[_PendingStored | list[int]] = []
        self._events: list[KvEvent] = []
        self._next_sequence = 0
        self.reused_blocks_total = 0

    # ----------------------------------------------------------------- capacity and stats
    @property
    def block_size(self) -> int:
        return self.config.block_size

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self._referenced

    @property
    def num_free(self) -> int:
        """Blocks not referenced by any sequence (empty or cached-unreferenced)."""
        return self.num_blocks - self._referenced

    @property
    def num_cached(self) -> int:
        """Stored (hash-indexed) blocks, referenced or not."""
        return len(self._by_hash)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    @property
    def num_reserved(self) -> int:
        """Blocks promised to running sequences but not allocated yet."""
        return self._reserved

    @property
    def next_sequence(self) -> int:
        return self._next_sequence

    def is_cached(self, block_hash: int) -> bool:
        return block_hash in self._by_hash

    def evictable_hashes(self) -> list[int]:
        """Unreferenced stored blocks, next to be evicted first."""
        return list(self._evictable)

    def sequence_blocks(self, seq_id: str) -> SequenceBlocks:
        s = self._seqs[seq_id]
        return SequenceBlocks(reused_blocks=s.reused, new_blocks=s.new_blocks)

    def prompt_hashes(self, prompt: Sequence[int]) -> list[int]:
        """Hashes of the prompt blocks admission may reuse: every full block but one holding the
        last prompt token (its logits must be computed). A pure function of the prompt: callers
        that try to admit the same prompt repeatedly compute it once."""
        return block_hashes(prompt, self.config, limit=max(0, (len(prompt) - 1) // self.block_size))

    def match_prefix(self, prompt: Sequence[int], hashes: Sequence[int] | None = None) -> list[int]:
        """Hashes of the leading prompt blocks admission would reuse (no side effects);
        `hashes` is `prompt_hashes(prompt)` when the caller has it."""
        out: list[int] = []
        for h in self.prompt_hashes(prompt) if hashes is None else hashes:
            if h not in self._by_hash:
                break
            out.append(h)
        return out

    # ----------------------------------------------------------------- sequence lifecycle
    def try_admit(
        self,
        seq_id: str,
        prompt: Sequence[int],
        max_new_tokens: int,
        hashes: Sequence[int] | None = None,
    ) -> SequenceBlocks | None:
        """Reuse the cached prefix, reserve blocks for the whole sequence and fill the prompt.
        Returns None (and changes nothing) when the blocks are not available now. `hashes` is
        `prompt_hashes(prompt)` when the caller has it."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already admitted")
        if not prompt:
            raise ValueError("prompt must not be empty")
        matched = [self._by_hash[h] for h in self.match_prefix(prompt, hashes)]
        need = self.blocks_for_tokens(len(prompt) + max_new_tokens) - len(matched)
        pinned = sum(1 for b in matched if b.ref_count == 0)
        if self._empty + len(self._evictable) - pinned - self._reserved < need:
            return None
        for b in matched:
            self._ref(b)
        reused_tokens = len(matched) * self.block_size
        seq = _Sequence(
            blocks=matched, num_tokens=reused_tokens, reserved=need, reused=len(matched)
        )
        self._seqs[seq_id] = seq
        self._reserved += need
        self.reused_blocks_total += len(matched)
        self._append(seq, prompt[reused_tokens:])
        self._flush()
        return SequenceBlocks(reused_blocks=seq.reused, new_blocks=seq.new_blocks)

    def append_token(self, seq_id: str, token: int) -> None:
        self._append(self._seqs[seq_id], (token,))
        self._flush()

    def append_tokens(self, seq_id: str, tokens: Sequence[int]) -> None:
        """`append_token` for each of `tokens`, in order (same blocks, events and counts)."""
        self._append(self._seqs[seq_id], tokens)
        self._flush()

    def release(self, seq_id: str) -> None:
        """Drop a finished or cancelled sequence: stored blocks stay cached (LRU), the rest is freed."""
        seq = self._seqs.pop(seq_id)
        self._reserved -= seq.reserved
        for b in reversed(seq.blocks):  # leaf first: evicted before its prefix
            b.ref_count -= 1
            if b.ref_count:
                continue
            self._referenced -= 1
            if b.block_hash is None:
                self._empty += 1
            else:
                self._evictable[b.block_hash] = b

    # ----------------------------------------------------------------- events
    def drain_events(self) -> list[KvEvent]:
        """Events since the last call, in order."""
        out, self._events = self._events, []
        return out

    def snapshot(self) -> list[KvEvent]:
        """A `cleared` event followed by a `stored` event per cached block (parents first), numbered
        after every event already emitted, so the stream stays gap-free from here on."""
        self._flush()
        data: list[KvEventData] = [AllBlocksCleared()]
        for b in sorted(self._by_hash.values(), key=lambda blk: blk.depth):
            assert b.block_hash is not None
            data.append(BlocksStored(b.parent_hash, (StoredBlock(b.block_hash, tuple(b.tokens)),)))
        return [self._number(d) for d in data]

    # ----------------------------------------------------------------- internals
    def _number(self, data: KvEventData) -> KvEvent:
        ev = KvEvent(self._next_sequence, data)
        self._next_sequence += 1
        return ev

    def _flush(self) -> None:
        for p in self._pending:
            if isinstance(p, _PendingStored):
                self._events.append(self._number(BlocksStored(p.parent_hash, tuple(p.blocks))))
            else:
                self._events.append(self._number(BlocksRemoved(tuple(p))))
        self._pending.clear()

    def _ref(self, b: _Block) -> None:
        if b.ref_count == 0:
            assert b.block_hash is not None
            del self._evictable[b.block_hash]
            self._referenced += 1
        b.ref_count += 1

    def _allocate(self, seq: _Sequence) -> _Block:
        if seq.reserved > 0:
            seq.reserved -= 1
            self._reserved -= 1
        elif self._empty + len(self._evictable) - self._reserved <= 0:
            raise CacheCapacityError("sequence grew beyond its reservation and the cache is full")
        if self._empty > 0:
            self._empty -= 1
        else:
            h, victim = self._evictable.popitem(last=False)
            del self._by_hash[h]
            victim.block_hash = None
            last = self._pending[-1] if self._pending else None
            if isinstance(last, list):
                last.append(h)
            else:
                self._pending.append([h])
        self._referenced += 1
        seq.new_blocks += 1
        block = _Block(depth=len(seq.blocks))
        seq.blocks.append(block)
        return block

    def _append(self, seq: _Sequence, tokens: Sequence[int]) -> None:
        bs = self.block_size
        pos = 0
        while pos < len(tokens):
            block = self._allocate(seq) if seq.num_tokens % bs == 0 else seq.blocks[-1]
            take = min(bs - len(block.tokens), len(tokens) - pos)
            block.tokens.extend(int(t) for t in tokens[pos : pos + take])
            seq.num_tokens += take
            pos += take
            if len(block.tokens) == bs:
                self._store(seq, block)

    def _store(self, seq: _Sequence, block: _Block) -> None:
        idx = len(seq.blocks) - 1
        parent = seq.blocks[idx - 1].block_hash if idx > 0 else None
        assert idx == 0 or parent is not None, "a full block's parent is always stored"
        h = chain_hash(
            self.config.hash_seed if parent is None else parent, block.tokens, self.config.hash_seed
        )
        existing = self._by_hash.get(h)
        if existing is not None:
            # Same content already stored: share it and give our copy back.
            self._ref(existing)
            seq.blocks[idx] = existing
            self._referenced -= 1
            self._empty += 1
            return
        block.block_hash = h
        block.parent_hash = parent
        self._by_hash[h] = block
        last = self._pending[-1] if self._pending else None
        if (
            isinstance(last, _PendingStored)
            and last.blocks
            and last.blocks[-1].block_hash == parent
        ):
            last.blocks.append(StoredBlock(h, tuple(block.tokens)))
        else:
            self._pending.append(_PendingStored(parent, [StoredBlock(h, tuple(block.tokens))]))
