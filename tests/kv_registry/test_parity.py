"""Hash parity engine ↔ registry: the emulator's paged KV cache publishes events (converted to
protobuf and back, as on the wire), the registry ingests them, and a lookup says exactly what the
engine's own prefix match says, including after evictions, registry restarts and resyncs."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmmesh.emulator.events import KvEvent
from llmmesh.emulator.kv_cache import PagedKvCache
from llmmesh.emulator.publisher import event_to_proto
from llmmesh.kvblocks import BlockConfig, block_hashes
from services.kv_registry.contracts import Event
from services.kv_registry.core import KvRegistry
from services.kv_registry.servicer import event_from_pb
from services.kv_registry.settings import KvRegistrySettings
from tests.kv_registry.support import make_registry

CFG = BlockConfig(block_size=4, hash_seed=11)


def fresh_registry() -> KvRegistry:
    return make_registry(
        CFG, KvRegistrySettings(max_entries=100_000, max_events_per_request=100_000)
    )


def wire(events: list[KvEvent]) -> list[Event]:
    return [event_from_pb(event_to_proto(e)) for e in events]


def engine_prefix(cache: PagedKvCache, prompt: list[int]) -> int:
    """Leading full blocks of the prompt the engine holds (no reuse cap)."""
    n = 0
    for h in block_hashes(prompt, cache.config):
        if not cache.is_cached(h):
            break
        n += 1
    return n


class Cluster:
    def __init__(self, replicas: int, num_blocks: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.caches = {f"r{i}": PagedKvCache(num_blocks, CFG) for i in range(replicas)}
        self.registry = fresh_registry()
        # a few shared "system prompts" and per-request suffixes: prefixes overlap across replicas
        self.systems = [[self.rng.randrange(50_000) for _ in range(4 * k + 2)] for k in (2, 3, 5)]
        self.seq = 0
        self.resyncs = 0

    def prompt(self) -> list[int]:
        sys_prompt = self.rng.choice(self.systems)
        tail = [self.rng.randrange(50_000) for _ in range(self.rng.randrange(0, 14))]
        return sys_prompt + tail

    def serve(self, rid: str, prompt: list[int], new_tokens: int = 3) -> None:
        cache = self.caches[rid]
        self.seq += 1
        sid = f"s{self.seq}"
        if cache.try_admit(sid, prompt, new_tokens) is None:
            return
        for _ in range(new_tokens):
            cache.append_token(sid, self.rng.randrange(50_000))
        cache.release(sid)

    def publish(self, rid: str) -> None:
        events = self.caches[rid].drain_events()
        res = self.registry.ingest(rid, "epoch", CFG, wire(events))
        if res.resync_required:  # what the publisher does on resync_required
            self.resyncs += 1
            res = self.registry.ingest(rid, "epoch", CFG, wire(self.caches[rid].snapshot()))
            assert not res.resync_required

    def check(self, probes: list[list[int]]) -> None:
        for prompt in probes:
            got = {m.replica_id: m.matched_blocks for m in self.registry.lookup(prompt).matches}
            want = {rid: engine_prefix(c, prompt) for rid, c in self.caches.items()}
            assert got == {rid: n for rid, n in want.items() if n}, prompt
            for rid, cache in self.caches.items():
                # the engine's admission match is the registry's, capped as TensorRT-LLM caps it
                cap = (len(prompt) - 1) // CFG.block_size
                assert len(cache.match_prefix(prompt)) == min(got.get(rid, 0), cap)
        for rid, cache in self.caches.items():
            assert self.registry.block_count(rid) == cache.num_cached


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.integers(6, 40))
def test_registry_matches_engine_prefix_match(seed: int, num_blocks: int) -> None:
    cluster = Cluster(replicas=3, num_blocks=num_blocks, seed=seed)
    probes = [cluster.prompt() for _ in range(6)] + [[*s, 1, 2, 3, 4, 5] for s in cluster.systems]
    for _ in range(30):
        rid = cluster.rng.choice(sorted(cluster.caches))
        cluster.serve(rid, cluster.prompt())
        cluster.publish(rid)
    cluster.check(probes)


@pytest.mark.parametrize("lost", ["registry restart", "lost batch"])
def test_parity_survives_gaps(lost: str) -> None:
    cluster = Cluster(replicas=2, num_blocks=24, seed=5)
    probes = [[*s, 9, 9, 9, 9, 9] for s in cluster.systems]
    for i in range(20):
        rid = f"r{i % 2}"
        cluster.serve(rid, cluster.prompt())
        cluster.publish(rid)
    if lost == "registry restart":
        cluster.registry = fresh_registry()
    else:
        cluster.serve("r0", [7] * 4 * 3)
        assert cluster.caches["r0"].drain_events()  # a batch the registry never saw
    for i in range(10):
        rid = f"r{i % 2}"
        cluster.serve(rid, cluster.prompt())
        cluster.publish(rid)  # gap -> resync_required -> snapshot
    assert cluster.resyncs == (2 if lost == "registry restart" else 1)
    cluster.check(probes)
