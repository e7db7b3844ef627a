"""`make bench-registry`: the kv_registry core in-process against the straightforward oracle.

The baseline is the straightforward core (`tests/kv_registry/naive.py`: a set of replica ids per
block, an OrderedDict per replica, `llmmesh.kvblocks.block_hashes` per lookup), measured in the
same run on the same data. Every (implementation, scenario) runs in its own forked process, so
memory deltas and garbage-collector state do not leak between them.

Data: `--blocks` blocks as prompts of `--prompt-blocks` blocks of `--block-size` random tokens,
hashed with the engine's chained block hash; every prompt is published as one `stored` event.
- scenario "shared": every replica holds every block (blocks x replicas pairs): the worst case for
  lookups (every replica matches the whole prompt) and the most pairs per block;
- scenario "overlap": 1/8 of the prompts (shared system prompts) on every replica, each other
  prompt on 1 or 2 replicas (what prefix-aware routing produces).
Lookups: 128-block prompts, `hit` (a prompt every replica holds), `partial` (its first half, then
new tokens), `miss` (new tokens); from token ids (hashing included) and from precomputed hashes;
and through a parsed LookupRequest (what the servicer does, without the network).
Ingest: populate rate; steady-state churn (a new prompt stored, an old one removed); the
snapshot format (one block per event); and PublishEventsRequest bytes → parse → ingest.
Memory: RSS growth at full scale, and tracemalloc bytes per (block, replica) at 1/16 scale.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import time
import tracemalloc
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry

from llmmesh.generated.kvregistry.v1 import kvregistry_pb2 as pb
from llmmesh.kvblocks import BlockConfig, hashes_from_bytes
from services.kv_registry.contracts import Cleared, Event, LookupResult, Removed, Stored
from services.kv_registry.core import KvRegistry
from services.kv_registry.metrics import PrometheusMetrics
from services.kv_registry.servicer import event_from_pb
from services.kv_registry.settings import KvRegistrySettings
from tests.kv_registry.naive import NaiveKvRegistry

ROOT = Path(__file__).resolve().parents[1]
LOOKUP_TARGET_US = 200.0
INGEST_TARGET = 200_000.0


class Registry(Protocol):
    def ingest(
        self, replica_id: str, epoch: str, block_config: BlockConfig, events: Sequence[Event]
    ) -> object: ...
    def lookup(self, token_ids: Sequence[int]) -> LookupResult: ...
    def lookup_hashes(self, hashes: Sequence[int]) -> LookupResult: ...
    def drop_replica(self, replica_id: str) -> bool: ...
    @property
    def entries(self) -> int: ...


@dataclass
class Dataset:
    config: BlockConfig
    tokens: npt.NDArray[np.uint32]  # (prompts, prompt_blocks * block_size)
    hashes: npt.NDArray[np.uint64]  # (prompts, prompt_blocks)
    placement: dict[str, list[list[int]]]  # scenario -> per replica, its prompt indices
    shared: int  # prompts [0, shared) are on every replica in both scenarios


DATA: Dataset | None = None


def make_dataset(args: argparse.Namespace) -> Dataset:
    cfg = BlockConfig(args.block_size, 0)
    prompts = math.ceil(args.blocks / args.prompt_blocks)
    rng = np.random.default_rng(7)
    shape = (prompts, args.prompt_blocks * args.block_size)
    tokens = rng.integers(0, 128_000, size=shape).astype(np.uint32)
    hashes = np.empty((prompts, args.prompt_blocks), dtype=np.uint64)
    for i in range(prompts):
        hashes[i] = hashes_from_bytes(tokens[i].tobytes(), cfg)
    shared = max(1, prompts // 8)
    replicas = args.replicas
    overlap: list[list[int]] = [list(range(shared)) for _ in range(replicas)]
    for p in range(shared, prompts):
        for r in rng.choice(replicas, size=int(rng.integers(1, 3)), replace=False):
            overlap[int(r)].append(p)
    return Dataset(
        cfg,
        tokens,
        hashes,
        {"shared": [list(range(prompts)) for _ in range(replicas)], "overlap": overlap},
        shared,
    )


def new_registry(cfg: BlockConfig, settings: KvRegistrySettings) -> KvRegistry:
    """The registry as the service builds it (Prometheus metrics, on a private registry)."""
    metrics = PrometheusMetrics(CollectorRegistry())
    return KvRegistry(settings, cfg, clock=time.monotonic, metrics=metrics)


def make_registry(impl: str, cfg: BlockConfig) -> Registry:
    if impl == "baseline":
        return NaiveKvRegistry(cfg, max_entries=10**9, max_events_per_request=10**6)
    # Replicas filled once and left quiet while others are measured: never dropped as silent.
    return new_registry(
        cfg,
        KvRegistrySettings(
            max_entries=10**9, max_events_per_request=10**6, exact_silence_s=math.inf
        ),
    )


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def populate(reg: Registry, data: Dataset, placement: list[list[int]], batch: int = 32) -> int:
    """Every replica's prompts as `stored` events (fresh int objects, as protobuf decoding
    makes), `batch` events per call. Returns the block events ingested."""
    blocks = 0
    for r, prompts in enumerate(placement):
        seq = 0
        for start in range(0, len(prompts), batch):
            events: list[Event] = []
            for p in prompts[start : start + batch]:
                events.append(Stored(seq, tuple(data.hashes[p].tolist())))
                seq += 1
            reg.ingest(f"r{r}", "e", data.config, events)
            blocks += len(events) * data.hashes.shape[1]
    return blocks


@dataclass
class Timing:
    """Per-call µs: wall clock, and this thread's CPU time (which excludes time the scheduler
    gave to other processes: on a shared machine wall-clock tails measure the neighbours)."""

    wall: list[float]
    cpu: list[float]

    def summary(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}_p50_us": pct(self.wall, 0.5),
            f"{prefix}_p99_us": pct(self.wall, 0.99),
            f"{prefix}_cpu_p50_us": pct(self.cpu, 0.5),
            f"{prefix}_cpu_p99_us": pct(self.cpu, 0.99),
        }


def timed(fn: Callable[..., object], calls: Iterable[tuple[object, ...]]) -> Timing:
    """Time fn(*args) for each prepared argument tuple (preparation is not timed)."""
    out = Timing([], [])
    wall, cpu = time.perf_counter_ns, time.thread_time_ns
    for args in calls:
        c0, t0 = cpu(), wall()
        fn(*args)
        t1, c1 = wall(), cpu()
        out.wall.append((t1 - t0) / 1000)
        out.cpu.append((c1 - c0) / 1000)
    return out


def contention(started_wall: float, started_cpu: float) -> dict[str, float]:
    """How much of a CPU this process got, and how often it was preempted."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "cpu_share": (time.process_time() - started_cpu) / (time.perf_counter() - started_wall),
        "involuntary_switches": usage.ru_nivcsw,
        "peak_rss_gib": usage.ru_maxrss / 2**20,
    }


def lookup_cases(
    data: Dataset, samples: int, rng: np.random.Generator
) -> dict[str, list[npt.NDArray[np.uint32]]]:
    """Every sample is a distinct token sequence (so the registry's per-prompt hash cache never
    helps): prompts end with a random partial block, which has no hash."""
    n_tok = data.tokens.shape[1]
    bs = data.config.block_size
    half = (data.hashes.shape[1] // 2) * bs
    cases: dict[str, list[npt.NDArray[np.uint32]]] = {"hit": [], "partial": [], "miss": []}
    for _ in range(samples):
        p = int(rng.integers(0, data.shared))
        fresh = rng.integers(128_000, 256_000, size=n_tok + bs - 1).astype(np.uint32)
        tail = fresh[n_tok : n_tok + int(rng.integers(1, bs))]
        cases["hit"].append(np.concatenate([data.tokens[p], tail]))
        cases["partial"].append(np.concatenate([data.tokens[p][:half], fresh[half:n_tok], tail]))
        cases["miss"].append(np.concatenate([fresh[:n_tok], tail]))
    return cases


def drain(reg: Registry) -> None:
    """Run the new core's background work (lazy sweeps, compaction) to completion."""
    if isinstance(reg, KvRegistry):
        while reg.maintain(1 << 16):
            pass


def measure_full(impl: str, scenario: str, samples: int) -> dict[str, float]:
    data = DATA
    assert data is not None
    started = time.perf_counter(), time.process_time()
    out: dict[str, float] = {}
    gc.collect()
    reg = make_registry(impl, data.config)
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    blocks = populate(reg, data, data.placement[scenario])
    out["populate_blocks_per_s"] = blocks / (time.perf_counter() - t0)
    gc.collect()
    out["pairs"] = reg.entries
    out["rss_bytes_per_pair"] = (rss_bytes() - rss0) / reg.entries
    rng = np.random.default_rng(11)
    cases = lookup_cases(data, samples, rng)
    hashes_of = {
        name: [hashes_from_bytes(t.tobytes(), data.config) for t in prompts]
        for name, prompts in cases.items()
    }
    for name, prompts in cases.items():
        hs = hashes_of[name]
        expect = reg.lookup_hashes(hs[0])
        assert expect == reg.lookup(prompts[0].tolist()), "token and hash lookups disagree"
        if name == "hit":
            assert len(expect.matches) == len(data.placement[scenario])
        tok = timed(reg.lookup, ((p.tolist(),) for p in prompts))
        hsh = timed(reg.lookup_hashes, ((h,) for h in hs))
        msgs_t = [pb.LookupRequest(token_ids=p.tolist()).SerializeToString() for p in prompts]
        msgs_h = [pb.LookupRequest(block_hashes=h).SerializeToString() for h in hs]

        def via_pb_tokens(raw: bytes) -> LookupResult:
            return reg.lookup(pb.LookupRequest.FromString(raw).token_ids)

        def via_pb_hashes(raw: bytes) -> LookupResult:
            return reg.lookup_hashes(list(pb.LookupRequest.FromString(raw).block_hashes))

        pbt = timed(via_pb_tokens, ((m,) for m in msgs_t))
        pbh = timed(via_pb_hashes, ((m,) for m in msgs_h))
        for kind, timing in (
            ("tokens", tok),
            ("hashes", hsh),
            ("pb_tokens", pbt),
            ("pb_hashes", pbh),
        ):
            out.update(timing.summary(f"lookup_{name}_{kind}"))
    # steady-state churn on one replica: store a new prompt, remove one of its old ones
    r0 = data.placement[scenario][0]
    fresh = np.random.default_rng(13).integers(0, 2**63, size=(4096, data.hashes.shape[1]))
    seq = len(r0)  # populate numbered r0's events 0 .. len(r0) - 1
    churn_batches: list[list[Event]] = []
    for b in range(0, 4096, 8):
        events: list[Event] = []
        for j in range(b, b + 8):
            events.append(Stored(seq, tuple(fresh[j].tolist())))
            events.append(Removed(seq + 1, tuple(data.hashes[r0[j % len(r0)]].tolist())))
            seq += 2
        churn_batches.append(events)
    t0 = time.perf_counter()
    for events in churn_batches:
        reg.ingest("r0", "e", data.config, events)
    drain(reg)  # the new core defers log compaction: its cost belongs to this stage
    out["churn_block_events_per_s"] = 4096 * 2 * data.hashes.shape[1] / (time.perf_counter() - t0)
    # snapshot format: one block per `stored` event, 512 events per call, on a new replica
    snap = data.hashes[: min(len(data.hashes), 2048)].reshape(-1).tolist()
    snap_batches: list[list[Event]] = [[Cleared(0)]]
    for i in range(0, len(snap), 512):
        snap_batches.append([Stored(1 + i + j, (h,)) for j, h in enumerate(snap[i : i + 512])])
    t0 = time.perf_counter()
    for events in snap_batches:
        reg.ingest("snap", "e", data.config, events)
    out["snapshot_block_events_per_s"] = len(snap) / (time.perf_counter() - t0)
    reg.drop_replica("snap")
    drain(reg)
    # wire format: PublishEventsRequest bytes -> parse -> events -> ingest, in the emulator's two
    # shapes: a snapshot (one StoredBlock with its token ids per event, 512 events a request)
    # and its event stream (one event per admitted prompt: 128 blocks, 8 events a request)
    bs = data.config.block_size
    for shape, blocks_per_event, events_per_request in (("snapshot", 1, 512), ("stream", 128, 8)):
        requests: list[bytes] = []
        seq = 0
        req = pb.PublishEventsRequest()
        for p in range(min(len(data.hashes), 512)):
            toks = data.tokens[p].tolist()
            for start in range(0, data.hashes.shape[1], blocks_per_event):
                if not req.events:
                    req = pb.PublishEventsRequest(
                        replica_id="wire", epoch=shape, block_size=bs, hash_seed=0
                    )
                ev = req.events.add(sequence=seq)
                if start:
                    ev.stored.parent_hash = int(data.hashes[p][start - 1])
                for k in range(start, start + blocks_per_event):
                    ev.stored.blocks.add(
                        block_hash=int(data.hashes[p][k]), token_ids=toks[k * bs : (k + 1) * bs]
                    )
                seq += 1
                if len(req.events) == events_per_request:
                    requests.append(req.SerializeToString())
                    req = pb.PublishEventsRequest()
        t0 = time.perf_counter()
        for raw in requests:
            msg = pb.PublishEventsRequest.FromString(raw)
            events = [event_from_pb(e) for e in msg.events]
            reg.ingest(msg.replica_id, msg.epoch, data.config, events)
        blocks = seq * blocks_per_event
        out[f"wire_{shape}_block_events_per_s"] = blocks / (time.perf_counter() - t0)
        reg.drop_replica("wire")
        drain(reg)
    # dropping a replica that holds the whole data set (health failure, or a resync's `cleared`)
    t0 = time.perf_counter()
    reg.drop_replica(f"r{len(data.placement[scenario]) - 1}")
    out["drop_call_ms"] = (time.perf_counter() - t0) * 1000
    if isinstance(reg, KvRegistry):
        steps = []
        while True:
            t1 = time.perf_counter()
            done = reg.maintain(4096)
            steps.append((time.perf_counter() - t1) * 1000)
            if not done:
                break
        out["drop_sweep_total_ms"] = sum(steps)
        out["drop_sweep_max_step_ms"] = max(steps)
    out.update(contention(*started))
    return out


def measure_tracemalloc(impl: str, scenario: str, scale: int) -> dict[str, float]:
    data = DATA
    assert data is not None
    placement = [[p for p in ps if p % scale == 0] for ps in data.placement[scenario]]
    gc.collect()
    tracemalloc.start()
    reg = make_registry(impl, data.config)
    base = tracemalloc.get_traced_memory()[0]
    populate(reg, data, placement)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return {"tracemalloc_bytes_per_pair": used / reg.entries, "tracemalloc_pairs": reg.entries}


def measure_approximate(replicas: int, samples: int) -> dict[str, float]:
    """16 predicted replicas, each at its capacity (65,536 entries), random 128-block prompts."""
    data = DATA
    assert data is not None
    reg = new_registry(
        data.config,
        KvRegistrySettings(
            max_entries=10**9, max_events_per_request=10**6, predicted_capacity=65_536
        ),
    )
    n = len(data.hashes)
    rng = np.random.default_rng(17)
    for r in range(replicas):
        for p in rng.choice(n, size=min(n, 65_536 // data.hashes.shape[1] + 8), replace=False):
            reg.record_routing(f"p{r}", data.hashes[int(p)].tolist())
    shared = data.hashes[0].tolist()
    for r in range(replicas):
        reg.record_routing(f"p{r}", shared)
    out: dict[str, float] = {"predicted_pairs": reg.entries}
    # what the orchestrator does per request: route (RecordRouting), then report the engine's
    # reuse on completion (mostly as predicted, 10% of the time half of it); prompts drawn from
    # 1024 so that predictions are sometimes there to be confirmed or corrected
    picks = rng.integers(0, min(n, 1024), size=samples)
    rec, rep = Timing([], []), Timing([], [])
    wall, cpu = time.perf_counter_ns, time.thread_time_ns
    for i in range(samples):
        hashes = data.hashes[int(picks[i])].tolist()
        replica = f"p{i % replicas}"
        c0, t0 = cpu(), wall()
        routed = reg.record_routing(replica, hashes)
        t1, c1 = wall(), cpu()
        rec.wall.append((t1 - t0) / 1000)
        rec.cpu.append((c1 - c0) / 1000)
        p = routed.predicted_blocks
        reported = p if rng.random() > 0.1 else p // 2
        c0, t0 = cpu(), wall()
        reg.report_reuse(replica, hashes, reported, predicted_blocks=p)
        t1, c1 = wall(), cpu()
        rep.wall.append((t1 - t0) / 1000)
        rep.cpu.append((c1 - c0) / 1000)
    for r in range(replicas):
        reg.record_routing(f"p{r}", shared)
    assert len(reg.lookup_hashes(shared).matches) == replicas
    look = timed(reg.lookup_hashes, ((shared,) for _ in range(samples)))

    # token ids: RecordRouting right after the Lookup of the same prompt (hashed once)
    def lookup_then_tokens(i: int) -> tuple[object, ...]:
        tokens = data.tokens[int(picks[i])].tolist() + [7] * int(rng.integers(1, bs))
        reg.lookup(tokens)
        return (f"p{i % replicas}", tokens)

    def record_tokens(replica: str, tokens: list[int]) -> object:
        return reg.record_routing(replica, reg.hash_tokens(tokens))

    bs = data.config.block_size
    tok = timed(record_tokens, (lookup_then_tokens(i) for i in range(samples)))
    for name, timing in (
        ("record_routing", rec),
        ("record_routing_tokens_after_lookup", tok),
        ("lookup_predicted_hit", look),
        ("report", rep),
    ):
        out.update(timing.summary(name))
    return out


def measure_hashing(samples: int) -> dict[str, float]:
    from llmmesh.kvblocks import block_hashes as fast
    from llmmesh.kvblocks import chain_hash

    def reference(tokens: Sequence[int], config: BlockConfig) -> list[int]:
        """The hash's definition, one `chain_hash` (numpy) per block: the seed implementation."""
        out, h, bs = [], config.hash_seed, config.block_size
        for i in range(len(tokens) // bs):
            h = chain_hash(h, tokens[i * bs : (i + 1) * bs], config.hash_seed)
            out.append(h)
        return out

    data = DATA
    assert data is not None
    out = {}
    for name, fn in (("kvblocks", reference), ("registry", fast)):
        lat = timed(
            fn, ((data.tokens[i % len(data.tokens)].tolist(), data.config) for i in range(samples))
        )
        out[f"hash_{name}_p50_us"] = pct(lat.cpu, 0.5)
    return out


@dataclass
class Row:
    metric: str
    scenario: str
    baseline: float | None
    new: float
    unit: str
    higher_is_better: bool
    target: str = ""
    meets_target: bool | None = None

    @property
    def gain(self) -> float | None:
        if self.baseline is None or not self.baseline or not self.new:
            return None
        return self.new / self.baseline if self.higher_is_better else self.baseline / self.new


@dataclass
class LookupRow:
    scenario: str
    case: str
    source: str
    baseline_p50_us: float
    baseline_p99_us: float
    new_p50_us: float
    new_p99_us: float
    new_cpu_p50_us: float
    new_cpu_p99_us: float
    meets_target: bool  # new CPU-time p99 <= target


MEASURES: dict[str, Callable[..., dict[str, float]]] = {
    "full": measure_full,
    "tracemalloc": measure_tracemalloc,
    "approximate": measure_approximate,
    "hashing": measure_hashing,
}


def run(kind: str, *params: object) -> dict[str, float]:
    """One measurement in a fresh process forked from this one (it inherits the data set)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("fork")) as pool:
        return pool.submit(MEASURES[kind], *params).result()


SOURCES = (
    ("tokens", "token ids"),
    ("hashes", "block hashes"),
    ("pb_tokens", "LookupRequest.token_ids"),
    ("pb_hashes", "LookupRequest.block_hashes"),
)


def main() -> int:
    global DATA
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--replicas", type=int, default=16)
    parser.add_argument("--prompt-blocks", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=2000, help="Calls timed per case.")
    parser.add_argument("--tracemalloc-scale", type=int, default=16)
    parser.add_argument(
        "--scenarios", nargs="+", default=["shared", "overlap"], choices=["shared", "overlap"]
    )
    args = parser.parse_args()
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    DATA = make_dataset(args)
    prompts = len(DATA.hashes)
    print(
        f"data: {prompts:,} prompts x {args.prompt_blocks} blocks of {args.block_size} tokens "
        f"= {prompts * args.prompt_blocks:,} blocks, {args.replicas} replicas "
        f"(generated in {time.perf_counter() - started:.1f}s); load average {load_before:.2f} "
        f"on {os.cpu_count()} CPUs",
        flush=True,
    )
    results: dict[str, dict[str, dict[str, float]]] = {}
    for scenario in args.scenarios:
        results[scenario] = {}
        for impl in ("new", "baseline"):
            t0 = time.perf_counter()
            res = run("full", impl, scenario, args.samples)
            res.update(run("tracemalloc", impl, scenario, args.tracemalloc_scale))
            results[scenario][impl] = res
            print(
                f"  measured {impl:8s} {scenario:8s} ({int(res['pairs']):,} pairs, peak RSS "
                f"{res['peak_rss_gib']:.1f} GiB, got {res['cpu_share']:.0%} of a CPU, "
                f"{int(res['involuntary_switches']):,} preemptions, "
                f"{time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    approx = run("approximate", args.replicas, args.samples)
    hashing = run("hashing", 500)
    load_after = os.getloadavg()[0]

    lookups: list[LookupRow] = []
    rows: list[Row] = []
    for scenario, by_impl in results.items():
        b, n = by_impl["baseline"], by_impl["new"]
        for case in ("hit", "partial", "miss"):
            for kind, label in SOURCES:
                k = f"lookup_{case}_{kind}"
                lookups.append(
                    LookupRow(
                        scenario,
                        case,
                        label,
                        b[f"{k}_p50_us"],
                        b[f"{k}_p99_us"],
                        n[f"{k}_p50_us"],
                        n[f"{k}_p99_us"],
                        n[f"{k}_cpu_p50_us"],
                        n[f"{k}_cpu_p99_us"],
                        n[f"{k}_cpu_p99_us"] <= LOOKUP_TARGET_US,
                    )
                )
        for key, label in (
            ("populate_blocks_per_s", "ingest: populate (128-block stored events)"),
            ("churn_block_events_per_s", "ingest: churn (stored + removed)"),
            ("snapshot_block_events_per_s", "ingest: snapshot (1 block per event)"),
            ("wire_snapshot_block_events_per_s", "ingest: wire bytes -> index, snapshot"),
            ("wire_stream_block_events_per_s", "ingest: wire bytes -> index, stream"),
        ):
            rows.append(
                Row(
                    label,
                    scenario,
                    b[key],
                    n[key],
                    "blocks/s",
                    True,
                    f">= {INGEST_TARGET:,.0f}",
                    n[key] >= INGEST_TARGET,
                )
            )
        for key, label in (
            ("tracemalloc_bytes_per_pair", "memory per (block, replica), tracemalloc"),
            ("rss_bytes_per_pair", "memory per (block, replica), RSS growth"),
        ):
            rows.append(Row(label, scenario, b[key], n[key], "B", False))
        rows.append(
            Row(
                "drop a replica holding all its blocks: call",
                scenario,
                b["drop_call_ms"],
                n["drop_call_ms"],
                "ms",
                False,
            )
        )
        rows.append(
            Row(
                "  ... then background sweep, total",
                scenario,
                None,
                n["drop_sweep_total_ms"],
                "ms",
                False,
            )
        )
        rows.append(
            Row(
                "  ... longest sweep step (blocks the loop)",
                scenario,
                None,
                n["drop_sweep_max_step_ms"],
                "ms",
                False,
            )
        )
    for key, label in (
        ("record_routing", "approx: RecordRouting, hashes"),
        ("record_routing_tokens_after_lookup", "approx: RecordRouting, tokens, cached"),
        ("lookup_predicted_hit", "approx: Lookup, 16 predicted matches"),
        ("report", "approx: ReportReuse"),
    ):
        for q in ("p50", "p99"):
            rows.append(
                Row(
                    f"{label} {q}",
                    "predicted",
                    None,
                    approx[f"{key}_{q}_us"],
                    f"µs (cpu {approx[f'{key}_cpu_{q}_us']:.0f})",
                    False,
                )
            )
    rows.append(
        Row(
            "hash a 128-block prompt: kvblocks vs registry",
            "-",
            hashing["hash_kvblocks_p50_us"],
            hashing["hash_registry_p50_us"],
            "µs",
            False,
        )
    )

    print(
        f"\nLookup latency, 128-block prompts (µs; wall clock; 'cpu' = this thread's CPU time, "
        f"target p99 <= {LOOKUP_TARGET_US:.0f} on cpu time)"
    )
    print(
        f"{'scenario':<8} {'case':<7} {'input':<26} | {'base p50':>8} {'base p99':>8} | "
        f"{'new p50':>8} {'new p99':>8} | {'cpu p50':>7} {'cpu p99':>7} | {'gain p50':>8} | target"
    )
    print("-" * 124)
    for lr in lookups:
        print(
            f"{lr.scenario:<8} {lr.case:<7} {lr.source:<26} | {lr.baseline_p50_us:>8.1f} "
            f"{lr.baseline_p99_us:>8.1f} | {lr.new_p50_us:>8.1f} {lr.new_p99_us:>8.1f} | "
            f"{lr.new_cpu_p50_us:>7.1f} {lr.new_cpu_p99_us:>7.1f} | "
            f"{lr.baseline_p50_us / lr.new_p50_us:>7.1f}x | "
            f"{'ok' if lr.meets_target else 'MISSED'}"
        )
    print()
    print(
        f"{'metric':<46} | {'scenario':<9} | {'baseline':>11} | {'new':>11} | {'unit':<14} | "
        f"{'gain':>7} | target"
    )
    print("-" * 125)
    for r in rows:
        base = "-" if r.baseline is None else f"{r.baseline:,.1f}"
        gain = "" if r.gain is None else f"{r.gain:.1f}x"
        mark = "" if r.meets_target is None else (" ok" if r.meets_target else " MISSED")
        print(
            f"{r.metric:<46} | {r.scenario:<9} | {base:>11} | {r.new:>11,.1f} | {r.unit:<14} | "
            f"{gain:>7} | {r.target}{mark}"
        )
    pairs = {s: int(v["new"]["pairs"]) for s, v in results.items()}
    print(
        "\ngain: how many times better the new core is (latency, memory: baseline/new; rates: "
        "new/baseline).\n"
        f"pairs indexed: {pairs}; approximate mode: {int(approx['predicted_pairs']):,} predicted "
        f"pairs. Load average {load_before:.2f} -> {load_after:.2f} on {os.cpu_count()} CPUs. "
        f"Took {time.perf_counter() - started:.0f}s."
    )
    out_dir = ROOT / "bench-results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / "registry.json"
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "pairs": pairs,
                "load_average": [load_before, load_after],
                "lookups": [asdict(lr) for lr in lookups],
                "rows": [{**asdict(r), "gain": r.gain} for r in rows],
                "raw": {"scenarios": results, "approximate": approx, "hashing": hashing},
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
