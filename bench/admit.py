"""`make bench-admit`: one orchestrator's routing decisions at a fixed Admit rate.

The orchestrator alone (no gateway, no engines): `--replicas` emulated replicas registered with
RegisterReplica, each a port of one light fake (Triton's ServerReady/ModelReady over gRPC, and
a static `nv_trt_llm_*` metrics page per replica over HTTP), and a kv_registry holding a
realistic index: `--families` shared prefixes (32k-token documents), each cached on about a
quarter of the replicas to a random depth, published as the engines' KV events would be. Every
replica's stream starts with a snapshot, so all are exact: once its copy of the registry's exact
index is in sync (WatchExact), the orchestrator answers lookups from it, with no call
(`LLMMESH_ORCHESTRATOR_KV_MIRROR=false` measures lookups by call; the share answered from the
copy is printed per row).

Load: open loop at each `--rates` (Admit/s, evenly spaced), sent by the gateway's own client
(`--admit stream`: on its AdmitStream, each prompt as its length and block hashes, the default;
`--admit stream-prompt`: the prompt itself on the stream; `--admit calls`: one Admit call each), each
lease completed at once with the engine's reuse report through that client (batched in
CompleteBatch calls), with prompts of each
`--prompt-tokens` length: a family's first tokens plus a unique 64-token tail. Each Admit
carries a caller id and its send time as the gateway's do, so an orchestrator behind on its calls
sheds them (BUSY, services/orchestrator/shedding.py): refused Admits are counted by status code,
the latencies are the granted ones', and a row that refused any meets no target. Each Admit's
client latency runs from its send; how late the load generator sent it after its due time is
measured too (send lag), and a row sent late (p99 above `LATE_P99_MS`) meets no target either.

Per (replicas, prompt length, rate): decision latency p50/p95/p99 seen by the client and inside
the orchestrator (`AdmitResponse.queue_ms`: from the Admit's arrival in the director to its
lease, prefix lookup and scheduling included), orchestrator and kv_registry CPU-µs per decision
(/proc/<pid>/stat; all of it over the granted Admits) and the orchestrator's per Admit answered
(granted or refused), and where the orchestrator's decision time goes: each scheduling plugin
(`llmmesh_orchestrator_plugin_duration_seconds`), the registry's own lookup work
(`llmmesh_kv_registry_lookup_seconds`), and the rest (the lookup round trip, hashing,
admission). Pinned like bench-overhead: load generator and fakes on one CPU, orchestrator and
kv_registry on the other. `--compare` prints an earlier run's figures beside these.
`--profile` samples the orchestrator and kv_registry with py-spy during each measured rate and
prints their hottest frames (self and inclusive time); the raw stacks go to bench-results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench.overhead import announced, cpu_seconds, pct, pin, pinning, py_spy_record
from bench.report import write_json
from llmmesh.common import metric_names as names
from llmmesh.common.components import KV_REGISTRY, ORCHESTRATOR
from llmmesh.common.errors import ServiceError
from llmmesh.common.process import tied_to_parent
from llmmesh.common.settings import KvBlockSettings
from llmmesh.common.topology import DEFAULT_MODEL_VERSION, DEFAULT_POOL, TRITON_MODEL, Priority
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2 as kv_pb
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2_grpc as kv_grpc
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as pb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from llmmesh.kvblocks import (
    BlockConfig,
    ChunkedHashes,
    block_hashes,
    token_bytes,
    tokens_from_bytes,
)
from llmmesh.localmesh import ServiceProcess
from services.gateway.admission import AdmissionRequest, LeaseReport, Outcome
from services.gateway.orchestrator_client import OrchestratorClient
from services.kv_registry.settings import KvRegistrySettings
from services.orchestrator.settings import OrchestratorSettings

TAIL_TOKENS = 64
DOCUMENT_TOKENS = 32 * 1024 + 1024
TARGET_RATE, TARGET_P50_MS, TARGET_P95_MS = 500, 1.0, 5.0
# A row whose Admits were sent later than this after their due time (p99) was not driven at its
# rate: the load generator fell behind, and the wait in it is in no latency. Its timer wakes up
# to ~1.5 ms late in a run that keeps up (p99 0.7-1.4 ms at 100-1,000/s, 64 replicas).
LATE_P99_MS = 2.5


# -- the fake engines (their own process) ------------------------------------------------------
def metrics_page(i: int) -> bytes:
    """A replica's engine gauges: some load and KV use, different per replica."""
    req, kv = names.TRTLLM_REQUEST_METRICS, names.TRTLLM_KV_CACHE_BLOCK_METRICS
    active, used = i % 7, 1000 + 137 * i % 5000
    return (
        f"# TYPE {req} gauge\n"
        f'{req}{{model="tensorrt_llm",request_type="active",version="1"}} {active}\n'
        f'{req}{{model="tensorrt_llm",request_type="waiting",version="1"}} 0\n'
        f'{req}{{model="tensorrt_llm",request_type="max",version="1"}} 64\n'
        f"# TYPE {kv} gauge\n"
        f'{kv}{{kv_cache_block_type="used",model="tensorrt_llm",version="1"}} {used}\n'
        f'{kv}{{kv_cache_block_type="max",model="tensorrt_llm",version="1"}} 20000\n'
        f'{kv}{{kv_cache_block_type="free",model="tensorrt_llm",version="1"}} {20000 - used}\n'
    ).encode()


class ReadyEngine(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    async def ServerReady(
        self, request: service_pb2.ServerReadyRequest, context: object
    ) -> service_pb2.ServerReadyResponse:
        return service_pb2.ServerReadyResponse(ready=True)

    async def ModelReady(
        self, request: service_pb2.ModelReadyRequest, context: object
    ) -> service_pb2.ModelReadyResponse:
        return service_pb2.ModelReadyResponse(ready=True)


async def serve_fakes(n: int) -> None:
    """`n` replicas: one gRPC server bound to `n` ports, one HTTP server with `/metrics/<i>`.
    Prints {"grpc_ports": [...], "metrics_port": p}, then serves until killed."""
    from aiohttp import web

    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(ReadyEngine(), server)
    ports = [server.add_insecure_port("127.0.0.1:0") for _ in range(n)]
    await server.start()
    pages = [metrics_page(i) for i in range(n)]

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=pages[int(request.match_info["i"])], content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics/{i}", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    metrics_port = runner.addresses[0][1]
    print(json.dumps({"grpc_ports": ports, "metrics_port": metrics_port}), flush=True)
    await server.wait_for_termination()


# -- the index and the prompts -----------------------------------------------------------------
@dataclass
class Workload:
    documents: list[list[int]]
    # replica index -> (family, cached blocks)
    cached: dict[int, list[tuple[int, int]]] = field(default_factory=dict)


def workload(families: int, replicas: int, seed: int) -> Workload:
    rng = random.Random(seed)
    docs = [[rng.randrange(100, 48000) for _ in range(DOCUMENT_TOKENS)] for _ in range(families)]
    w = Workload(docs)
    for r in range(replicas):
        w.cached[r] = [
            (f, rng.randrange(DOCUMENT_TOKENS // 10, DOCUMENT_TOKENS))
            for f in range(families)
            if rng.random() < 0.25
        ]
    return w


async def publish_index(
    address: str, w: Workload, replica_ids: Sequence[str], cfg: BlockConfig
) -> int:
    """Each replica's cached prefixes as its engine's KV events, hashed with `cfg`; the index's
    (block, replica) entries."""
    hashes = [block_hashes(doc, cfg) for doc in w.documents]
    entries = 0
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_send_message_length", 64 << 20)]
    ) as channel:
        stub = kv_grpc.KvRegistryServiceStub(channel)
        for r, rid in enumerate(replica_ids):
            # An engine's stream starts with a snapshot (llmmesh/emulator/publisher.py): a
            # `cleared`, then what it holds; one that holds nothing is exact all the same.
            events = [kv_pb.KvEvent(sequence=0, cleared=kv_pb.AllBlocksCleared())]
            for seq, (f, tokens) in enumerate(w.cached[r], start=1):
                blocks = hashes[f][: tokens // cfg.block_size]
                entries += len(blocks)
                events.append(
                    kv_pb.KvEvent(
                        sequence=seq,
                        stored=kv_pb.BlocksStored(
                            blocks=[kv_pb.StoredBlock(block_hash=h) for h in blocks]
                        ),
                    )
                )
            resp = await stub.PublishEvents(
                kv_pb.PublishEventsRequest(
                    replica_id=rid,
                    epoch="bench",
                    block_size=cfg.block_size,
                    hash_seed=cfg.hash_seed,
                    events=events,
                )
            )
            if resp.resync_required:
                raise RuntimeError(f"registry asked {rid} to resync")
    return entries


def admit_requests(
    w: Workload, prompt_tokens: int, count: int, seed: int
) -> list[AdmissionRequest]:
    """Admits as the gateway makes them: a family's first tokens and a unique tail, held as a
    view of their packed bytes, as the gateway holds a prompt (`StreamState.continuation`,
    converted once before its first Admit); the load generator's CPU is not what is measured."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        doc = w.documents[rng.randrange(len(w.documents))]
        tail = [rng.randrange(100, 48000) for _ in range(TAIL_TOKENS)]
        prompt = doc[: prompt_tokens - TAIL_TOKENS] + tail
        out.append(
            AdmissionRequest(
                request_id=f"bench-{prompt_tokens}-{i}",
                model=TRITON_MODEL,
                prompt_token_ids=tokens_from_bytes(token_bytes(prompt)),
                max_tokens=64,
                priority=Priority.STANDARD,
                tenant="",
                model_version="",
            )
        )
    return out


# -- measuring ---------------------------------------------------------------------------------
@dataclass
class Row:
    replicas: int
    prompt_tokens: int
    rate: int
    sent: int
    achieved_rate: float
    errors: int
    client_p50_ms: float
    client_p95_ms: float
    client_p99_ms: float
    internal_p50_ms: float
    internal_p95_ms: float
    internal_p99_ms: float
    orchestrator_cpu_us_per_decision: float
    kv_registry_cpu_us_per_decision: float
    # share of the orchestrator's decision time (sum of queue_ms)
    plugin_share: dict[str, float]
    registry_lookup_share: float
    other_share: float
    # failed Admits by status code (RESOURCE_EXHAUSTED: shed, by the admission queue or, reason
    # BUSY, because the orchestrator was behind on its calls; DEADLINE_EXCEEDED: no answer
    # within the client's 10 s; CANCELLED: gRPC dropped a call the server had not started)
    errors_by_code: dict[str, int] = field(default_factory=dict)
    # The orchestrator's CPU per Admit answered, granted or refused (the per-decision figures
    # divide all of it by the granted ones: with shedding, refusals' CPU lands on them).
    orchestrator_cpu_us_per_admit: float = 0.0
    # Share of the prefix lookups the orchestrator answered from its copy of the registry's exact
    # index (services/orchestrator/kv_mirror.py) rather than by a call.
    mirror_lookup_share: float = 0.0
    # How late the load generator sent the Admits (after their due time), p50 and p99: a row
    # whose p99 is above LATE_P99_MS was not driven at its rate and is not judged.
    send_lag_p50_ms: float = 0.0
    send_lag_p99_ms: float = 0.0


def histogram_sums(url: str, family: str, label: str, sample: str = "_sum") -> dict[str, float]:
    """`<family><sample>` (a histogram's sum, a counter's `_total`) per value of `label` from a
    Prometheus page."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != family.removesuffix("_total"):
            continue
        for s in fam.samples:
            if s.name == f"{fam.name}{sample}":
                key = s.labels.get(label, "")
                out[key] = out.get(key, 0.0) + s.value
    return out


@dataclass
class Driven:
    """What one open-loop run measured."""

    client_s: list[float] = field(default_factory=list)  # granted Admits, from their send
    internal_s: list[float] = field(default_factory=list)  # the orchestrator's queue_ms
    # How late each Admit was sent after its due time (a load generator that falls behind
    # sends late: time the Admit waited in it, which no latency above shows).
    lag_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # failed Admits by status code
    sent_s: float = 0.0  # from the first due time to the last send


async def drive(
    admitter: OrchestratorClient, requests: list[AdmissionRequest], rate: int, duration_s: float
) -> Driven:
    """Open loop: Admit at `rate`/s for `duration_s` through the gateway's own client (on its
    AdmitStream, or one call each), each lease completed at once (batched, as the gateway
    does). Every Admit sent is counted: granted, or failed by its code (an exception that is no
    ServiceError by its type)."""
    out = Driven()
    tasks: set[asyncio.Task[None]] = set()

    async def one(request: AdmissionRequest, due: float) -> None:
        start = time.perf_counter()
        out.lag_s.append(max(start - due, 0.0))
        try:
            lease = await admitter.admit(request, timeout_s=10)
        except ServiceError as err:
            code = err.code.name
            out.errors[code] = out.errors.get(code, 0) + 1
            return
        except Exception as err:  # counted, not lost with its task
            code = type(err).__name__
            out.errors[code] = out.errors.get(code, 0) + 1
            return
        out.client_s.append(time.perf_counter() - start)
        out.internal_s.append(lease.queue_ms / 1000)
        admitter.complete(LeaseReport(lease.lease_id, Outcome.SUCCESS, 0, 0, 0, ttft_ms=1.0))

    loop = asyncio.get_running_loop()
    n = int(rate * duration_s)
    t0 = time.perf_counter() + 0.01
    for i in range(n):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(one(requests[i % len(requests)], due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    out.sent_s = time.perf_counter() - t0
    if tasks:
        await asyncio.gather(*tasks)
    await admitter.drain()
    return out


def start_profiles(
    pids: dict[str, int], label: str, duration_s: float
) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """py-spy on each process for `duration_s` (raw collapsed stacks), and the file each writes."""
    outdir = Path("bench-results") / "profiles"
    outdir.mkdir(parents=True, exist_ok=True)
    files = []
    for name, pid in pids.items():
        out = outdir / f"{name}-{label}.txt"
        proc = subprocess.Popen(
            py_spy_record(pid, out, 200, duration_s),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        files.append((proc, out))
    return files


def summarize_profile(path: Path, top: int = 25) -> str:
    """The hottest frames of a py-spy raw profile: share of samples as the innermost frame
    (self) and anywhere on the stack (inclusive)."""
    self_n: dict[str, int] = {}
    incl_n: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + n
        for f in set(frames):
            incl_n[f] = incl_n.get(f, 0) + n
    if not total:
        return f"{path}: no samples"
    lines = [f"{path} ({total} samples)", "  self:"]
    for f, n in sorted(self_n.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {n / total:6.1%}  {f}")
    lines.append("  inclusive:")
    for f, n in sorted(incl_n.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {n / total:6.1%}  {f}")
    return "\n".join(lines)


async def run_config(args: argparse.Namespace, replicas: int, w: Workload) -> list[Row]:
    cores = pinning(not args.no_pin)
    cfg = KvBlockSettings().block_config()  # the registry's, the orchestrator's and the client's
    workdir = Path(tempfile.mkdtemp(prefix="bench-admit-"))
    fakes = await asyncio.create_subprocess_exec(
        *tied_to_parent([sys.executable, "-m", "bench.admit", "--serve-fakes", str(replicas)]),
        stdout=asyncio.subprocess.PIPE,
    )
    registry = ServiceProcess(KV_REGISTRY, KvRegistrySettings(log_json=True), workdir)
    orchestrator: ServiceProcess | None = None
    rows: list[Row] = []
    try:
        fake = json.loads(await announced(fakes, "fake engines"))
        await registry.start()
        rids = [f"replica-{i}" for i in range(replicas)]
        entries = await publish_index(registry.address, w, rids, cfg)
        orchestrator = ServiceProcess(
            ORCHESTRATOR,
            OrchestratorSettings(kv_registry_address=registry.address, log_json=True),
            workdir,
        )
        await orchestrator.start()
        assert registry.proc is not None
        assert orchestrator.proc is not None
        pids = {"orchestrator": orchestrator.proc.pid, "kv_registry": registry.proc.pid}
        if cores is not None:
            pin([os.getpid(), fakes.pid], cores[0])
            pin(pids.values(), cores[1])
        channel = grpc.aio.insecure_channel(
            orchestrator.address, options=[("grpc.max_send_message_length", 64 << 20)]
        )
        stub = pb_grpc.OrchestratorServiceStub(channel)
        admitter = OrchestratorClient(
            stub,
            admit_stream=args.admit != "calls",
            hasher=ChunkedHashes(cfg) if args.admit == "stream" else None,
        )
        for i, rid in enumerate(rids):
            await stub.RegisterReplica(
                pb.RegisterReplicaRequest(
                    replica=pb.ReplicaSpec(
                        id=rid,
                        grpc_address=f"127.0.0.1:{fake['grpc_ports'][i]}",
                        metrics_url=f"http://127.0.0.1:{fake['metrics_port']}/metrics/{i}",
                        models=[TRITON_MODEL],
                        pool=DEFAULT_POOL,
                        model_version=DEFAULT_MODEL_VERSION,
                    )
                )
            )
        print(f"{replicas} replicas registered; index: {entries} (block, replica) entries")
        for tokens in args.prompt_tokens:
            requests = admit_requests(w, tokens, 256, seed=tokens)
            await drive(admitter, requests, 100, 1.0)  # warm up
            for rate in args.rates:
                plugins0 = histogram_sums(
                    orchestrator.metrics_url, names.ORCH_PLUGIN_DURATION, "plugin"
                )
                lookup0 = histogram_sums(registry.metrics_url, names.KV_LOOKUP_SECONDS, "")
                via0 = histogram_sums(
                    orchestrator.metrics_url, names.ORCH_KV_LOOKUPS, "via", "_total"
                )
                profiles = (
                    start_profiles(pids, f"{replicas}r-{tokens}t-{rate}", args.duration)
                    if args.profile
                    else []
                )
                # Read after the metrics pages above: their rendering is not the decisions'.
                cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
                driven = await drive(admitter, requests, rate, args.duration)
                cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
                client, internal, errors = driven.client_s, driven.internal_s, driven.errors
                sent_s = driven.sent_s
                plugins1 = histogram_sums(
                    orchestrator.metrics_url, names.ORCH_PLUGIN_DURATION, "plugin"
                )
                lookup1 = histogram_sums(registry.metrics_url, names.KV_LOOKUP_SECONDS, "")
                via1 = histogram_sums(
                    orchestrator.metrics_url, names.ORCH_KV_LOOKUPS, "via", "_total"
                )
                via = {k: v - via0.get(k, 0.0) for k, v in via1.items()}
                decided = max(len(internal), 1)
                total = max(sum(internal), 1e-9)
                shares = {
                    p: (plugins1[p] - plugins0.get(p, 0.0)) / total
                    for p in plugins1
                    if plugins1[p] - plugins0.get(p, 0.0) > 0
                }
                lookup_share = (lookup1.get("", 0.0) - lookup0.get("", 0.0)) / total
                ms = [x * 1000 for x in client]
                ims = [x * 1000 for x in internal] or [0.0]
                row = Row(
                    replicas,
                    tokens,
                    rate,
                    int(rate * args.duration),
                    int(rate * args.duration) / sent_s if sent_s > 0 else 0.0,
                    sum(errors.values()),
                    pct(ms, 0.5) if ms else 0.0,
                    pct(ms, 0.95) if ms else 0.0,
                    pct(ms, 0.99) if ms else 0.0,
                    pct(ims, 0.5),
                    pct(ims, 0.95),
                    pct(ims, 0.99),
                    cpu["orchestrator"] / decided * 1e6,
                    cpu["kv_registry"] / decided * 1e6,
                    shares,
                    lookup_share,
                    1.0 - sum(shares.values()) - lookup_share,
                    errors,
                    cpu["orchestrator"] / max(len(internal) + sum(errors.values()), 1) * 1e6,
                    via.get("mirror", 0.0) / max(sum(via.values()), 1.0),
                    pct([x * 1000 for x in driven.lag_s], 0.5),
                    pct([x * 1000 for x in driven.lag_s], 0.99),
                )
                rows.append(row)
                for proc, path in profiles:
                    await asyncio.to_thread(proc.wait, 30)
                    if path.exists():
                        print(summarize_profile(path), flush=True)
                print(
                    f"  {replicas} replicas, {tokens}-token prompts, {rate}/s: client p50 "
                    f"{row.client_p50_ms:.2f} ms, internal p50 {row.internal_p50_ms:.2f} ms",
                    flush=True,
                )
        await channel.close(None)
    finally:
        if orchestrator is not None:
            await orchestrator.stop()
        await registry.stop()
        if fakes.returncode is None:
            fakes.kill()
            await fakes.wait()
    shutil.rmtree(workdir, ignore_errors=True)  # the services' logs; kept when a run fails
    return rows


def print_rows(rows: Sequence[Row]) -> None:
    print()
    print(
        f"{'replicas':>8} | {'prompt':>6} | {'rate/s':>6} | {'achieved':>8} | {'err':>4} | "
        f"{'client p50/p95/p99 ms':>23} | {'internal p50/p95/p99 ms':>23} | "
        f"{'orch µs/dec':>11} | {'kvreg µs/dec':>12} | {'orch µs/Admit':>13} | "
        f"{'send lag p50/p99 ms':>19}"
    )
    print("-" * 167)
    for r in rows:
        client = f"{r.client_p50_ms:.2f}/{r.client_p95_ms:.2f}/{r.client_p99_ms:.2f}"
        internal = f"{r.internal_p50_ms:.2f}/{r.internal_p95_ms:.2f}/{r.internal_p99_ms:.2f}"
        print(
            f"{r.replicas:>8} | {r.prompt_tokens:>6} | {r.rate:>6} | {r.achieved_rate:>8.0f} | "
            f"{r.errors:>4} | {client:>23} | {internal:>23} | "
            f"{r.orchestrator_cpu_us_per_decision:>11.0f} | "
            f"{r.kv_registry_cpu_us_per_decision:>12.0f} | "
            f"{r.orchestrator_cpu_us_per_admit:>13.0f} | "
            f"{f'{r.send_lag_p50_ms:.2f}/{r.send_lag_p99_ms:.2f}':>19}"
        )
    for r in rows:
        if r.errors_by_code:
            codes = ", ".join(f"{c} {n}" for c, n in sorted(r.errors_by_code.items()))
            print(
                f"  errors at {r.replicas} replicas, {r.prompt_tokens} tokens, {r.rate}/s: {codes}"
            )
    print("\nshare of the orchestrator's decision time (internal latency summed)")
    for r in rows:
        parts = sorted(r.plugin_share.items(), key=lambda kv: -kv[1])
        plugins = ", ".join(f"{p} {s:.1%}" for p, s in parts)
        print(
            f"  {r.replicas:>2} replicas, {r.prompt_tokens:>5} tokens, {r.rate:>4}/s: "
            f"registry lookup {r.registry_lookup_share:.1%}; plugins: {plugins}; "
            f"rest (lookup RPC or copy, hashing, admission) {r.other_share:.1%}; "
            f"lookups from the orchestrator's copy of the index {r.mirror_lookup_share:.0%}"
        )
    print(
        f"\ntargets at {TARGET_RATE}/s: client p50 <= {TARGET_P50_MS} ms, p95 <= {TARGET_P95_MS} ms, "
        "every Admit granted (the latencies are the granted ones': a row that sheds "
        f"meets nothing), every Admit sent on time (send lag p99 <= {LATE_P99_MS} ms)"
    )
    for r in rows:
        if r.rate == TARGET_RATE:
            ok = (
                r.client_p50_ms <= TARGET_P50_MS
                and r.client_p95_ms <= TARGET_P95_MS
                and r.errors == 0
                and r.send_lag_p99_ms <= LATE_P99_MS
            )
            refused = f", {r.errors} of {r.sent} refused" if r.errors else ""
            if r.send_lag_p99_ms > LATE_P99_MS:
                refused += f", sent late (lag p99 {r.send_lag_p99_ms:.2f} ms)"
            print(
                f"  {r.replicas:>2} replicas, {r.prompt_tokens:>5} tokens: "
                f"p50 {r.client_p50_ms:.2f} p95 {r.client_p95_ms:.2f}{refused} -> "
                f"{'met' if ok else 'MISSED'}"
            )


COMPARED = (
    ("client_p50_ms", "client p50 ms"),
    ("client_p95_ms", "client p95 ms"),
    ("client_p99_ms", "client p99 ms"),
    ("internal_p50_ms", "internal p50 ms"),
    ("internal_p95_ms", "internal p95 ms"),
    ("orchestrator_cpu_us_per_decision", "orch CPU µs/decision"),
    ("kv_registry_cpu_us_per_decision", "kvreg CPU µs/decision"),
)


def print_comparison(before: list[dict[str, Any]], after: Sequence[Row], label: str) -> None:
    print(f"\nbefore ({label}) → after (this run)")
    old = {(b["replicas"], b["prompt_tokens"], b["rate"]): b for b in before}
    print(
        f"{'replicas':>8} | {'prompt':>6} | {'rate/s':>6} | {'figure':<22} | {'before':>8} | {'after':>8}"
    )
    print("-" * 74)
    for r in after:
        b = old.get((r.replicas, r.prompt_tokens, r.rate), {})
        for key, title in COMPARED:
            was = b.get(key)
            print(
                f"{r.replicas:>8} | {r.prompt_tokens:>6} | {r.rate:>6} | {title:<22} | "
                f"{'' if was is None else f'{was:.2f}':>8} | {getattr(r, key):>8.2f}"
            )


async def main_async(args: argparse.Namespace) -> int:
    w = workload(args.families, max(args.replicas), seed=1)
    rows: list[Row] = []
    for n in args.replicas:
        rows.extend(await run_config(args, n, w))
    print_rows(rows)
    if args.compare_data is not None:
        print_comparison(args.compare_data["rows"], rows, args.compare)
    out = write_json(
        args.output,
        {
            "args": {k: v for k, v in vars(args).items() if k != "compare_data"},
            "rows": [asdict(r) for r in rows],
        },
    )
    print(f"\nwrote {out}")
    return 0


def main() -> int:
    import uvloop

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--replicas", type=int, nargs="+", default=[16, 64])
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[1024, 32 * 1024])
    p.add_argument("--rates", type=int, nargs="+", default=[100, 500, 1000])
    p.add_argument("--duration", type=float, default=5.0, help="Seconds per rate.")
    p.add_argument("--families", type=int, default=32, help="Shared prefixes in the index.")
    p.add_argument(
        "--admit",
        choices=["stream", "stream-prompt", "calls"],
        default="stream",
        help="How the gateway's client sends Admits: on its AdmitStream with each prompt as its "
        "length and block hashes (the gateway's way, the default), on the stream with the prompt "
        "itself (stream-prompt), or one Admit call each with the prompt "
        "(LLMMESH_GATEWAY_ORCHESTRATOR_ADMIT_STREAM=false).",
    )
    p.add_argument("--no-pin", action="store_true", help="Do not pin processes to CPUs.")
    p.add_argument("--compare", help="An earlier run's JSON: print its figures beside these.")
    p.add_argument(
        "--profile", action="store_true", help="py-spy the orchestrator and kv_registry per rate."
    )
    p.add_argument("--output", default="admit.json", help="JSON file name in bench-results/.")
    p.add_argument("--serve-fakes", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_fakes:
        uvloop.run(serve_fakes(args.serve_fakes))
        return 0
    args.compare_data = None
    if args.compare is not None:
        args.compare_data = json.loads(Path(args.compare).read_text())
    return uvloop.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
