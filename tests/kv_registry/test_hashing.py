"""`llmmesh.kvblocks.block_hashes` (the fast path every component uses) equals the hash's
definition, a fold of `chain_hash` over the full blocks, bit for bit."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmmesh.kvblocks import (
    BlockConfig,
    ChunkedHashes,
    block_hashes,
    chain_hash,
    hash_bytes,
    hashes_from_bytes,
    hashes_from_le64,
    token_bytes,
)
from services.kv_registry.settings import KvRegistrySettings
from tests.kv_registry.support import make_registry


def reference(
    tokens: list[int], config: BlockConfig, salt: bytes = b"", limit: int | None = None
) -> list[int]:
    out: list[int] = []
    h, bs = config.hash_seed, config.block_size
    n = len(tokens) // bs if limit is None else min(len(tokens) // bs, max(0, limit))
    for i in range(n):
        h = chain_hash(h, tokens[i * bs : (i + 1) * bs], config.hash_seed, salt)
        out.append(h)
    return out


@pytest.mark.parametrize(
    ("tokens", "config", "salt", "limit"),
    [
        ([], BlockConfig(4, 0), b"", None),
        ([1, 2, 3], BlockConfig(4, 0), b"", None),  # partial block only: no hash
        (list(range(16)), BlockConfig(4, 0), b"", None),
        (list(range(18)), BlockConfig(4, 7), b"", None),
        (list(range(18)), BlockConfig(4, 2**64 - 1), b"", None),
        (list(range(64)), BlockConfig(32, 5), b"", None),
        (list(range(64)), BlockConfig(16, 5), b"lora:abc", None),
        (list(range(64)), BlockConfig(16, 5), b"", 2),
        (list(range(64)), BlockConfig(16, 5), b"", 0),
        (list(range(64)), BlockConfig(16, 5), b"", 100),
        ([2**32 - 1, 0, 2**31, 7], BlockConfig(2, 3), b"", None),
        (list(range(100_000, 100_000 + 4096)), BlockConfig(32, 11), b"", None),
    ],
)
def test_parity_with_kvblocks(
    tokens: list[int], config: BlockConfig, salt: bytes, limit: int | None
) -> None:
    assert block_hashes(tokens, config, salt, limit) == reference(tokens, config, salt, limit)


@given(
    st.lists(st.integers(0, 2**32 - 1), max_size=200),
    st.integers(1, 40),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=8),
)
def test_parity_property(tokens: list[int], block_size: int, seed: int, salt: bytes) -> None:
    config = BlockConfig(block_size, seed)
    assert block_hashes(tokens, config, salt) == reference(tokens, config, salt)


def test_bytes_entry_point() -> None:
    tokens = list(range(40))
    config = BlockConfig(8, 1)
    assert token_bytes(tokens) == b"".join(t.to_bytes(4, "little") for t in tokens)
    assert hashes_from_bytes(token_bytes(tokens), config) == reference(tokens, config)


def test_registry_hashes_a_prompt_once() -> None:
    config = BlockConfig(4, 2)
    settings = KvRegistrySettings(max_entries=10, max_events_per_request=10, hash_cache_size=2)
    reg = make_registry(config, settings)
    a, b, c = list(range(10)), list(range(10, 19)), list(range(3))
    first = reg.hash_tokens(a)
    assert list(first) == reference(a, config)
    assert reg.hash_tokens(a) is first  # cached
    assert reg.hash_tokens([*a, 99]) == first  # another trailing partial block: same blocks
    assert list(reg.hash_tokens(b)) == reference(b, config)
    assert reg.hash_tokens(c) == ()
    assert reg.hash_tokens(a) is not first  # evicted (2 prompts kept), hashed again
    assert reg.hash_tokens(a) == first


def test_the_prompt_cache_is_bounded_by_the_hashes_it_holds() -> None:
    """A few long prompts sent as token ids must not fill memory: past `hash_cache_blocks`
    the oldest prompts go, and a prompt longer than the bound is not kept at all."""
    config = BlockConfig(4, 2)
    settings = KvRegistrySettings(hash_cache_size=100, hash_cache_blocks=15)
    reg = make_registry(config, settings)
    a, b, c = (list(range(k * 1000, k * 1000 + 40)) for k in range(3))  # 10 blocks each
    first = reg.hash_tokens(a)
    assert reg.hash_tokens(a) is first  # kept
    reg.hash_tokens(b)  # 20 blocks in all: a goes
    assert reg.hash_tokens(a) is not first
    assert sum(len(h) for h in reg._hash_cache.values()) <= 15
    huge = list(range(80))  # 20 blocks: never kept
    assert reg.hash_tokens(huge) is not reg.hash_tokens(huge)
    assert len(reg.hash_tokens(c)) == 10


@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.lists(st.integers(0, 2**32 - 1), max_size=300)),
        min_size=1,
        max_size=12,
    ),
    st.integers(0, 2**64 - 1),
)
def test_chunked_hashes_equal_the_chain_whatever_was_cached(
    prompts: list[tuple[int, list[int]]], seed: int
) -> None:
    """Prompts of a few shared prefixes plus their own tails, hashed one after the other with a
    cache small enough to evict: each equals the plain chain."""
    config = BlockConfig(2, seed)  # a chunk: 64 blocks, 128 tokens
    prefixes = [list(range(k * 1000, k * 1000 + 128 * (k + 1) + k)) for k in range(4)]
    hashes = ChunkedHashes(config, max_chunks=3)
    for k, tail in prompts:
        body = token_bytes(prefixes[k] + tail)
        plain = hashes_from_bytes(body, config)
        assert hashes.le64(body) == hash_bytes(plain)
        assert list(hashes(body)) == plain


def test_a_chunk_after_another_parent_is_not_taken_from_the_cache() -> None:
    config = BlockConfig(2, 9)
    chunk = 2 * ChunkedHashes.CHUNK_BLOCKS  # tokens
    same = list(range(5000, 5000 + chunk))
    hashes = ChunkedHashes(config)
    for first in (list(range(chunk)), list(range(1, chunk + 1))):
        body = token_bytes(first + same)
        assert list(hashes(body)) == hashes_from_bytes(body, config)


@given(st.lists(st.integers(0, 2**64 - 1), max_size=64))
def test_hashes_travel_as_le64_and_read_back_as_they_were(hashes: list[int]) -> None:
    body = hash_bytes(hashes)
    assert len(body) == 8 * len(hashes)
    assert list(hashes_from_le64(body)) == hashes


def test_hashes_that_are_no_whole_uint64s_are_refused() -> None:
    with pytest.raises(ValueError, match="no whole number"):
        hashes_from_le64(b"\x00" * 12)
