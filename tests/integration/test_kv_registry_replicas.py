"""Two kv_registry replicas on real processes: the emulator mesh's registry (A) plus a second one
(B) started here; the engines publish to both (LLMMESH_EMULATOR_KV_REGISTRY_ADDRESSES) and the
orchestrator reads from either (LLMMESH_ORCHESTRATOR_KV_REGISTRY_ADDRESSES). Under load, kill -9
the registry the orchestrator reads from: routing goes on with prefix hits and no request fails;
restart it: the engines resync it and it serves lookups again (shown by then killing the other)."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from llmmesh.common.components import KV_REGISTRY
from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2 as kv_pb
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2_grpc as kv_grpc
from llmmesh.localmesh import MODEL_NAME, ServiceProcess
from services.kv_registry.settings import KvRegistrySettings
from tests.integration.conftest import Mesh, eventually, metric, start_mesh

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

BLOCK = 32  # LLMMESH_KV_BLOCK_SIZE default
PREFIXES = [list(range(5_000 * (k + 1), 5_000 * (k + 1) + 6 * BLOCK)) for k in range(4)]
HIT = "llmmesh_orchestrator_prefix_hit_blocks_total"
LOOKUPS = "llmmesh_kv_registry_lookups_total"


@dataclass
class TwoRegistries:
    mesh: Mesh
    a: ServiceProcess  # the mesh's own registry: the orchestrator's first (preferred) one
    b: ServiceProcess  # the second replica, started here
    stubs: dict[str, kv_grpc.KvRegistryServiceAsyncStub] = field(default_factory=dict)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def two(
    tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[TwoRegistries]:
    workdir = tmp_path_factory.mktemp("registry-b")
    b = ServiceProcess(KV_REGISTRY, KvRegistrySettings(grpc_port=0, metrics_port=0), workdir)
    await b.start()
    extra = json.dumps([b.address])
    mesh = await start_mesh(
        tokenizer_path,
        replicas=2,
        time_scale=0.1,
        supervise=False,  # this test restarts the registry itself
        emulator_env={"LLMMESH_EMULATOR_KV_REGISTRY_ADDRESSES": extra},
        orchestrator_env={
            "LLMMESH_ORCHESTRATOR_KV_REGISTRY_ADDRESSES": extra,
            "LLMMESH_ORCHESTRATOR_KV_REGISTRY_RETRY_S": "1",
            # Lookups as calls, whose failover between registries this module tests (the copy
            # of the exact index, which would answer them here, is test_kv_mirror's subject).
            "LLMMESH_ORCHESTRATOR_KV_MIRROR": "false",
        },
    )
    a = mesh.mesh.services["kv_registry"]
    channels = [grpc.aio.insecure_channel(s.address) for s in (a, b)]
    t = TwoRegistries(
        mesh,
        a,
        b,
        {
            "a": kv_grpc.KvRegistryServiceStub(channels[0]),
            "b": kv_grpc.KvRegistryServiceStub(channels[1]),
        },
    )
    yield t
    for ch in channels:
        await ch.close(None)
    await mesh.close()
    await mesh.mesh.stop()
    if b.proc is not None and b.proc.returncode is None:
        b.proc.terminate()
        await b.proc.wait()


def request(prefix: list[int], suffix: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=MODEL_NAME,
        token_ids=pb.TokenIds(ids=[*prefix, 40_000 + suffix % 1000, 7]),
        sampling=pb.SamplingParams(max_tokens=4),
    )


async def generate(mesh: Mesh, req: pb.GenerateRequest) -> pb.GenerateResponse:
    return [m async for m in mesh.gateway.Generate(req, timeout=60)][-1]


async def holds_prefixes(stub: kv_grpc.KvRegistryServiceAsyncStub) -> bool:
    """The registry knows a replica holding each prefix's 6 blocks."""
    try:
        for prefix in PREFIXES:
            resp = await stub.Lookup(kv_pb.LookupRequest(token_ids=prefix), timeout=2)
            if not any(m.matched_blocks == 6 for m in resp.matches):
                return False
    except grpc.aio.AioRpcError:
        return False
    return True


class Load:
    """Concurrent clients cycling through the shared prefixes until stopped."""

    def __init__(self, mesh: Mesh, clients: int = 6) -> None:
        self.mesh = mesh
        self.ok = 0
        self.failed: list[str] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(clients)]

    async def _client(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                last = await generate(self.mesh, request(PREFIXES[(i + n) % len(PREFIXES)], n))
                assert last.HasField("complete"), last
                self.ok += 1
            except (grpc.aio.AioRpcError, AssertionError) as err:
                self.failed.append(repr(err))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


def hits(t: TwoRegistries) -> float:
    return metric(t.mesh.mesh.services["orchestrator"].metrics_url, HIT)


async def hits_rise_by(t: TwoRegistries, load: Load, blocks: float, what: str) -> None:
    start, served = hits(t), load.ok

    async def risen() -> bool:
        return hits(t) >= start + blocks and load.ok >= served + 10

    await eventually(risen, timeout_s=60, what=what)
    print(f"{what}: prefix hit blocks {start:.0f} -> {hits(t):.0f}, requests {served} -> {load.ok}")


async def kill9(svc: ServiceProcess) -> None:
    assert svc.proc is not None
    svc.proc.send_signal(signal.SIGKILL)
    await svc.proc.wait()


async def test_both_registries_receive_every_engines_events(two: TwoRegistries) -> None:
    for k, prefix in enumerate(PREFIXES):
        await generate(two.mesh, request(prefix, k))

    async def both() -> bool:
        return await holds_prefixes(two.stubs["a"]) and await holds_prefixes(two.stubs["b"])

    await eventually(both, timeout_s=30, what="both registries index every prefix")
    for name in ("a", "b"):
        replicas = set()
        for prefix in PREFIXES:
            resp = await two.stubs[name].Lookup(kv_pb.LookupRequest(token_ids=prefix), timeout=2)
            replicas |= {m.replica_id for m in resp.matches}
        assert replicas <= set(two.mesh.mesh.replica_ids)


async def test_registry_killed_and_restarted_under_load(two: TwoRegistries) -> None:
    await eventually(
        lambda: holds_prefixes(two.stubs["b"]), timeout_s=30, what="b indexes the prefixes"
    )
    load = Load(two.mesh)
    try:
        await hits_rise_by(two, load, 6 * 10, "prefix hits with both registries up")
        # kill -9 the registry the orchestrator reads from (the first one listed): it fails over.
        lookups_b = metric(two.b.metrics_url, LOOKUPS)
        await kill9(two.a)
        await hits_rise_by(two, load, 6 * 20, "prefix hits go on with registry a dead")
        assert metric(two.b.metrics_url, LOOKUPS) >= lookups_b + 10  # b answers them now
        assert not load.failed, load.failed[:3]
        # Restart a on its address: empty, it asks each engine for a snapshot (resync).
        await two.a.restart()
        await eventually(
            lambda: holds_prefixes(two.stubs["a"]), timeout_s=30, what="restarted a resyncs"
        )
        resyncs = metric(two.a.metrics_url, "llmmesh_kv_registry_resyncs_total")
        blocks = {
            rid: metric(two.a.metrics_url, "llmmesh_kv_registry_blocks", replica=rid)
            for rid in two.mesh.mesh.replica_ids
        }
        print(f"restarted registry: resyncs={resyncs} blocks={blocks}")
        # Now kill b: the orchestrator comes back to the resynced a, hits go on.
        await kill9(two.b)
        await hits_rise_by(two, load, 6 * 20, "prefix hits go on from the restarted registry a")
    finally:
        await load.stop()
    print(f"requests ok={load.ok} failed={len(load.failed)}")
    assert not load.failed, load.failed[:3]
    assert load.ok > 40
