"""The local mesh's liveness probe (the kubelet's, as the Triton pool's livenessProbe): a replica
whose Python-backend stub died keeps answering ServerReady/ModelReady true and would stay dead
forever (its tritonserver never exits); the probe, one token through the model, gets Triton's
"is not healthy" answer, which does not heal, so the supervisor kills the replica's process group
at that first answer (other failures count to `failure_threshold`) and restarts it, and the
replica is back in the orchestrator's rotation and serves requests again. (When the stub died
holding an interprocess mutex, tritonserver aborts by itself first; the restart is then an exit's.)"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as orch_pb
from llmmesh.triton.launcher import TRITON_LIVENESS
from tests.integration.conftest import Mesh, eventually, start_mesh
from tests.integration.test_black_hole import backend_stubs, generate

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

# The manifest's numbers (period 30 s, 4 failures) would take minutes to notice the fault: a
# shorter period, same semantics (and the production timeouts).
PROBE = dataclasses.replace(TRITON_LIVENESS, period_s=1.0, failure_threshold=3)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def lmesh(tokenizer_path: Path) -> AsyncIterator[Mesh]:
    m = await start_mesh(tokenizer_path, replicas=2, time_scale=0.5, triton_liveness=PROBE)
    yield m
    await m.close()
    await m.mesh.stop()


async def test_a_replica_with_a_dead_backend_stub_is_restarted_and_serves_again(
    lmesh: Mesh,
) -> None:
    mesh = lmesh.mesh
    dead = mesh.replica_ids[0]
    old = mesh.tritons[0]
    old_pid = old.pid
    assert old_pid is not None
    # Healthy replicas pass their probes: nothing is restarted.
    assert await old.generate_probe(PROBE)
    stubs = backend_stubs(old_pid)
    assert stubs, "no backend stub under the replica's tritonserver"
    for pid in stubs:
        os.kill(pid, signal.SIGKILL)  # a stub of a tritonserver this test's mesh started
    killed_at = time.monotonic()

    async def restarted() -> bool:
        return mesh.supervisor.restarts(dead) >= 1

    await eventually(restarted, timeout_s=90.0, what="the replica is killed and restarted")
    assert not old.is_running
    assert mesh.tritons[0].pid not in (None, old_pid)
    event = mesh.supervisor.history[-1]
    assert event.name == dead
    if event.reason is None:
        # A stub killed while it held one of its interprocess mutexes (here, most likely while
        # finishing the probe's response) leaves that mutex to a dead owner: tritonserver 2.51
        # then aborts on its next lock (boost::interprocess::lock_exception, SIGABRT) instead of
        # answering "is not healthy", and is restarted as any process that exited.
        assert event.exit_code == -signal.SIGABRT, event
        print(f"\nrestarted after tritonserver aborted itself: {event}")
    else:
        assert event.reason.startswith("liveness probe found it dead: HTTP 400")
        assert "is not healthy" in event.reason
        print(f"\nrestart reason: {event.reason}")

    async def in_rotation() -> bool:
        r = await lmesh.orchestrator.ListReplicas(orch_pb.ListReplicasRequest(), timeout=5)
        return any(x.replica.id == dead and x.healthy for x in r.replicas)

    await eventually(in_rotation, timeout_s=60.0, what="the restarted replica is healthy again")
    back_at = time.monotonic()
    served: list[str] = []

    async def serves() -> bool:
        rid, code = await generate(lmesh, len(served))
        assert code == "", code
        served.append(rid)
        return dead in served

    await eventually(serves, timeout_s=60.0, what="the restarted replica serves a request")
    served_at = time.monotonic()
    print(
        f"stub kill -> restarted replica healthy in ListReplicas {back_at - killed_at:.1f} s, "
        f"-> first request served by it {served_at - killed_at:.1f} s "
        f"(down {event.down_s:.1f} s; probe period {PROBE.period_s:g} s, "
        f"threshold {PROBE.failure_threshold})"
    )
    assert mesh.supervisor.restarts(mesh.replica_ids[1]) == 0
