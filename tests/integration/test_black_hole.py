"""A replica whose Triton Python-backend stub died (the tritonserver process stays up, answers
ServerReady and ModelReady true, and fails every request fast with an in-stream error) must not
turn into a black hole: the orchestrator counts its errors as replica faults, ejects it and stops
sending it traffic, and the other replica serves every request."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from llmmesh.common import metric_names as names
from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as orch_pb
from llmmesh.localmesh import MODEL_NAME
from tests.integration.conftest import Mesh, eventually, metric, start_mesh

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

REQUESTS = 40
CONCURRENCY = 8
MAX_TOKENS = 120
STUB = "triton_python_backend_stub"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def bmesh(tokenizer_path: Path) -> AsyncIterator[Mesh]:
    m = await start_mesh(tokenizer_path, replicas=2, time_scale=0.5)
    yield m
    await m.close()
    await m.mesh.stop()


def backend_stubs(parent: int) -> list[int]:
    """Pids of the Python-backend stubs that tritonserver `parent` (started by this test's mesh)
    spawned."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if ppid == parent and STUB.encode() in cmd:
            out.append(int(entry))
    return out


async def generate(mesh: Mesh, i: int) -> tuple[str, str]:
    """(replica that completed the request or "", error code name or "")."""
    req = pb.GenerateRequest(
        model=MODEL_NAME, text=f"request {i}", sampling=pb.SamplingParams(max_tokens=MAX_TOKENS)
    )
    try:
        msgs = [m async for m in mesh.gateway.Generate(req, timeout=30)]
    except grpc.aio.AioRpcError as err:
        return "", err.code().name
    return msgs[-1].complete.replica_id, ""


def decisions(mesh: Mesh, replica: str) -> float:
    url = mesh.mesh.services["orchestrator"].metrics_url
    return metric(url, names.ORCH_DECISIONS, replica=replica)


async def test_dead_backend_stub_is_ejected_and_gets_almost_no_traffic(bmesh: Mesh) -> None:
    dead, alive = bmesh.mesh.replica_ids[0], bmesh.mesh.replica_ids[1]
    server = bmesh.mesh.tritons[0]
    assert server.pid is not None
    # Both replicas serve before the fault.
    for i in range(4):
        _, code = await generate(bmesh, i)
        assert code == ""
    stubs = backend_stubs(server.pid)
    assert stubs, "no backend stub under the replica's tritonserver"
    for pid in stubs:
        os.kill(pid, signal.SIGKILL)

    async def stubs_gone() -> bool:
        return not backend_stubs(server.pid or 0)

    await eventually(stubs_gone, what="the killed backend stub exits")
    assert server.is_running  # the replica process itself stays up

    async def drive(n: int) -> tuple[float, float, list[tuple[str, str]]]:
        """`n` requests, CONCURRENCY at a time: (leases to the dead replica, to the live one,
        per-request results)."""
        before_dead, before_alive = decisions(bmesh, dead), decisions(bmesh, alive)
        results: list[tuple[str, str]] = []
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int) -> None:
            async with sem:
                results.append(await generate(bmesh, i))

        await asyncio.gather(*(one(i) for i in range(n)))
        return decisions(bmesh, dead) - before_dead, decisions(bmesh, alive) - before_alive, results

    # Phase 1: the first requests find the fault; at most a few leases (one per concurrent
    # request, up to the ejection threshold) go to the dead replica before it is ejected.
    to_dead, to_alive, results = await drive(REQUESTS)
    failed = [code for _, code in results if code]
    print(
        f"\nphase 1: leases to the dead replica {to_dead:.0f} of {to_dead + to_alive:.0f} "
        f"({to_dead / (to_dead + to_alive):.1%}); failed requests {len(failed)} of {REQUESTS}"
    )
    assert to_dead <= CONCURRENCY, f"{to_dead:.0f} leases went to the dead replica"
    # The gateway retries a replica fault before the first token: every request succeeds, on
    # the live replica.
    assert failed == []
    assert {rid for rid, _ in results} == {alive}

    async def ejected() -> bool:
        r = await bmesh.orchestrator.ListReplicas(orch_pb.ListReplicasRequest(), timeout=5)
        return any(x.replica.id == dead and not x.healthy for x in r.replicas)

    await eventually(ejected, what="the dead replica is ejected")
    # Phase 2, after the ejection: the dead replica gets no traffic at all.
    to_dead, to_alive, results = await drive(REQUESTS)
    print(f"phase 2: leases to the dead replica {to_dead:.0f} of {to_dead + to_alive:.0f}")
    assert [code for _, code in results if code] == []
    if bmesh.mesh.supervisor.restarts(dead) == 0:
        assert to_dead == 0
    else:
        # Its supervisor's liveness probe replaced the stub-less server meanwhile (on a slow
        # machine, within phase 2): the replica serves again, so leases to it are right.
        assert bmesh.mesh.tritons[0] is not server
    assert [code for _, code in results if code] == []
