"""The orchestrator's copy of kv_registry's exact index, on real processes: the emulator engines
publish KV events (exact mode), so once the copy is in sync every lookup is answered from it (no
call to the registry) and finds the blocks the engines hold. kill -9 the registry: requests go on
(prefix-blind while it is down); restart it: the engines resync it (an idle one at its next
heartbeat, `publish_heartbeat_s`), the orchestrator watches it again from a fresh snapshot, and
lookups come from the copy again, with prefix hits."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from llmmesh.common import metric_names as names
from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2 as kv_pb
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2_grpc as kv_grpc
from llmmesh.localmesh import MODEL_NAME
from tests.integration.conftest import Mesh, eventually, metric, start_mesh

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

BLOCK = 32  # LLMMESH_KV_BLOCK_SIZE default
PREFIXES = [list(range(7_000 * (k + 1), 7_000 * (k + 1) + 4 * BLOCK)) for k in range(3)]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mesh(tokenizer_path: Path) -> AsyncIterator[Mesh]:
    m = await start_mesh(
        tokenizer_path,
        replicas=2,
        time_scale=0.1,
        supervise=False,  # this test restarts the registry itself
        orchestrator_env={"LLMMESH_ORCHESTRATOR_KV_REGISTRY_RETRY_S": "0.5"},
    )
    yield m
    await m.close()
    await m.mesh.stop()


async def generate(mesh: Mesh, prefix: list[int], n: int) -> None:
    req = pb.GenerateRequest(
        model=MODEL_NAME,
        token_ids=pb.TokenIds(ids=[*prefix, 40_000 + n, 7]),
        sampling=pb.SamplingParams(max_tokens=4),
    )
    last = [m async for m in mesh.gateway.Generate(req, timeout=60)][-1]
    assert last.HasField("complete"), last


def orch(mesh: Mesh, name: str, **labels: str) -> float:
    return metric(mesh.mesh.services["orchestrator"].metrics_url, name, **labels)


async def in_sync(mesh: Mesh, n: int) -> bool:
    """One more request answered from the copy (it only covers once both engines published)."""
    before = orch(mesh, names.ORCH_KV_LOOKUPS, via="mirror")
    await generate(mesh, PREFIXES[n % len(PREFIXES)], n)
    return orch(mesh, names.ORCH_KV_LOOKUPS, via="mirror") > before


async def test_lookups_come_from_the_copy_and_survive_a_registry_restart(mesh: Mesh) -> None:
    counter = iter(range(10_000))
    await eventually(lambda: in_sync(mesh, next(counter)), timeout_s=30, what="copy in sync")
    assert orch(mesh, names.ORCH_KV_MIRROR_SYNCED) == 1
    registry = mesh.mesh.services["kv_registry"]
    asked = metric(registry.metrics_url, names.KV_LOOKUPS)
    via_registry = orch(mesh, names.ORCH_KV_LOOKUPS, via="registry")
    hits = orch(mesh, names.ORCH_PREFIX_HIT_BLOCKS)
    for n in range(12):  # each prefix 4 times: the later ones find its blocks
        await generate(mesh, PREFIXES[n % len(PREFIXES)], next(counter))
    assert orch(mesh, names.ORCH_KV_LOOKUPS, via="registry") == via_registry
    assert metric(registry.metrics_url, names.KV_LOOKUPS) == asked  # no call reached it
    assert orch(mesh, names.ORCH_PREFIX_HIT_BLOCKS) >= hits + 3 * 6  # 9 repeats, >= 2 blocks each
    assert orch(mesh, names.ORCH_KV_MIRROR_BLOCKS) >= 4 * len(PREFIXES)

    assert registry.proc is not None
    registry.proc.send_signal(signal.SIGKILL)
    await registry.proc.wait()

    # Served prefix-blind while the registry is down: the copy is out of sync at once.
    async def dropped() -> bool:
        return orch(mesh, names.ORCH_KV_MIRROR_SYNCED) == 0

    await eventually(dropped, timeout_s=10, what="copy dropped")
    await asyncio.gather(*(generate(mesh, p, next(counter)) for p in PREFIXES))
    await registry.restart()
    await eventually(lambda: in_sync(mesh, next(counter)), timeout_s=30, what="copy back")
    hits = orch(mesh, names.ORCH_PREFIX_HIT_BLOCKS)
    for p in PREFIXES:
        await generate(mesh, p, next(counter))
    assert orch(mesh, names.ORCH_PREFIX_HIT_BLOCKS) >= hits + 2 * len(PREFIXES)


async def test_a_watch_with_another_block_identity_is_refused(mesh: Mesh) -> None:
    """What the orchestrator relies on to stop watching rather than hold a wrong copy."""
    async with grpc.aio.insecure_channel(mesh.mesh.services["kv_registry"].address) as ch:
        call = kv_grpc.KvRegistryServiceStub(ch).WatchExact(
            kv_pb.WatchExactRequest(block_size=BLOCK + 1, hash_seed=0)
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
