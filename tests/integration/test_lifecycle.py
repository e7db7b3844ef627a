"""Process lifecycle on real processes: the local mesh's children (services, tritonserver and its
Python backend stubs) die with the process that started the mesh, whatever signal ends it; and
while the mesh runs, its supervisor brings a killed Triton replica or orchestrator back on the
same ports, where routing finds it again once it is ready. Kill-to-back-in-rotation times are
printed (`pytest -s`)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from llmmesh.common.process import tied_to_parent
from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as orch_pb
from llmmesh.localmesh import MODEL_NAME, ROOT, AutoscaledPool
from llmmesh.triton.launcher import SHM_DIR, remove_stale_shm_regions
from tests.integration.conftest import Mesh, eventually, start_mesh

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

STUB = "triton_python_backend_stub"


# ----------------------------------------------------------------------------- /proc helpers
def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a live process, None when it is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] == "Z" else (fields[0], int(fields[1]))


def _alive(pid: int) -> bool:
    return _stat(pid) is not None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


def descendants(root: int) -> dict[int, str]:
    """Every live process under `root` (its children, theirs, ...) -> command line."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            children.setdefault(st[1], []).append(int(entry))
    out: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out[pid] = _cmdline(pid)
        todo.extend(children.get(pid, []))
    return out


# ----------------------------------------------------------------------------- the mesh's own process
# A parent that adopts orphans (PR_SET_CHILD_SUBREAPER) and never reaps them, as an init process
# that reaps late or not at all: it starts the mesh, prints the mesh's pid, and sleeps.
_LAZY_INIT = """
import ctypes, subprocess, sys, time
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
mesh = subprocess.Popen(sys.argv[1:])
print("mesh", mesh.pid, flush=True)
time.sleep(3600)
"""


@dataclass
class MeshRun:
    proc: asyncio.subprocess.Process  # the mesh, or the lazy init above it
    pid: int  # the mesh's process

    async def kill(self, sig: int = signal.SIGKILL) -> None:
        os.kill(self.pid, sig)
        if self.proc.pid == self.pid:
            await self.proc.wait()

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


async def _spawn_mesh(
    workdir: Path, *, lazy_init: bool = False, new_session: bool = False
) -> MeshRun:
    """`python -m llmmesh.localmesh` (one emulator replica, free ports), just started; under
    `_LAZY_INIT` with `lazy_init`; in a process group of its own with `new_session`."""
    mesh = [
        sys.executable,
        "-m",
        "llmmesh.localmesh",
        "--engine=emulator",
        "--replicas=1",
        "--any-ports",
        f"--workdir={workdir}",
    ]
    argv = [sys.executable, "-c", _LAZY_INIT, *mesh] if lazy_init else mesh
    proc = await asyncio.create_subprocess_exec(
        *tied_to_parent(argv),  # should this test die first
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=new_session,
    )
    pid = proc.pid
    if lazy_init:
        assert proc.stdout is not None
        pid = int((await proc.stdout.readline()).split()[1])
    return MeshRun(proc, pid)


async def _mesh_process(
    workdir: Path, *, lazy_init: bool = False, new_session: bool = False
) -> tuple[MeshRun, dict[int, str]]:
    """The mesh's process once up, and its descendants then."""
    run = await _spawn_mesh(workdir, lazy_init=lazy_init, new_session=new_session)
    stdout = run.proc.stdout
    assert stdout is not None
    seen: list[str] = []

    async def up() -> None:
        while line := (await stdout.readline()).decode():
            seen.append(line)
            if "local mesh is up" in line:
                return
        raise AssertionError("the mesh exited before it was up:\n" + "".join(seen))

    try:
        await asyncio.wait_for(up(), 120)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(run.pid, signal.SIGKILL)
        await run.close()
        raise
    return run, descendants(run.pid)


def _kinds(tree: dict[int, str]) -> list[str]:
    kinds = []
    for cmd in tree.values():
        if STUB in cmd:
            kinds.append("stub")
        elif "tritonserver" in cmd:
            kinds.append("tritonserver")
        elif "-m services." in cmd:
            kinds.append(cmd.split("-m services.", 1)[1].split()[0])
    return sorted(kinds)


async def _all_gone(tree: dict[int, str], timeout_s: float) -> float:
    """Seconds until none of `tree` is alive; fails (and cleans up) after `timeout_s`."""
    t0 = time.monotonic()
    try:

        async def gone() -> bool:
            return not any(_alive(p) for p in tree)

        await eventually(gone, timeout_s, what="every child of the killed mesh exits")
    finally:
        for pid in tree:  # only what this test's mesh started, should any be left
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    return time.monotonic() - t0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("lazy_init", [False, True], ids=["reaping-init", "lazy-init"])
async def test_children_die_when_the_mesh_process_is_sigkilled(
    tmp_path: Path, lazy_init: bool
) -> None:
    """With a lazy init, the killed tritonserver stays a zombie, which its backend stub's own
    parent check takes for alive: only the server's group watchdog ends the stub."""
    run, tree = await _mesh_process(tmp_path, lazy_init=lazy_init)
    try:
        kinds = _kinds(tree)
        assert {"tritonserver", "stub", "gateway", "orchestrator", "kv_registry"} <= set(kinds)
        regions = f"llmmesh_triton_{run.pid}_*"
        assert list(SHM_DIR.glob(regions))  # the stub's shared memory, named after its launcher
        await run.kill()
        took = await _all_gone(tree, 10.0)
    finally:
        await run.close()
    # Nobody was left to remove them; the next launch of a server does (here: by hand).
    remove_stale_shm_regions()
    assert not list(SHM_DIR.glob(regions))
    print(
        f"\nSIGKILL of the mesh: {len(tree)} descendants ({', '.join(kinds)}) gone in {took:.2f} s"
    )


def _logged_at(log: Path, text: str) -> datetime.datetime:
    """When the first line of `log` holding `text` was logged (its leading timestamp)."""
    line = next(line for line in log.read_text(errors="replace").splitlines() if text in line)
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")


def _logs_saying(workdir: Path, text: str) -> list[str]:
    """The mesh's logs (`<name>.log`) that hold `text`."""
    return [p.name for p in workdir.glob("*.log") if text in p.read_text(errors="replace")]


@pytest.mark.parametrize("ctrl_c", [False, True], ids=["sigterm", "ctrl-c"])
async def test_a_signal_stops_the_mesh_gracefully(tmp_path: Path, ctrl_c: bool) -> None:
    """SIGTERM to the mesh's process, or SIGINT to its whole process group as Ctrl-C in a
    terminal sends it (the services then see it too): a clean stop, and no restart."""
    run, tree = await _mesh_process(tmp_path, new_session=ctrl_c)
    proc = run.proc
    assert proc.stdout is not None
    assert "tritonserver" in _kinds(tree)
    t0 = time.monotonic()
    if ctrl_c:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    took = await _all_gone(tree, 10.0)
    what = "SIGINT to the group" if ctrl_c else "SIGTERM"
    print(
        f"\n{what} of the mesh: exit 0 after {time.monotonic() - t0:.2f} s, "
        f"children gone {took:.2f} s later"
    )
    output = (await proc.stdout.read()).decode(errors="replace")
    assert "restarting" not in output, output
    # Drained, not killed: Triton unloaded its model.
    triton_log = (tmp_path / "replica-0.triton.log").read_text(errors="replace")
    assert "successfully unloaded" in triton_log
    # The mesh stops its services front to back, Ctrl-C too (it reaches the mesh alone): the
    # registry starts draining only once the gateway has stopped (one that saw Ctrl-C itself
    # drained at the same moment as the gateway, and Redis was gone under a draining gateway).
    assert _logs_saying(tmp_path, "second signal") == []
    gateway_stopped = _logged_at(tmp_path / "gateway.log", "llmmesh.common.server: stopped")
    registry_draining = _logged_at(tmp_path / "kv_registry.log", "llmmesh.common.server: draining")
    assert registry_draining >= gateway_stopped


async def test_the_local_actuators_replicas_die_with_the_autoscaler(tokenizer_path: Path) -> None:
    m = await start_mesh(
        tokenizer_path,
        replicas=1,
        autoscaled_pools=[AutoscaledPool("auto", initial_replicas=1, max_replicas=1)],
        supervise=False,
    )
    try:
        asc = m.mesh.services["autoscaler"]
        assert asc.proc is not None
        tree: dict[int, str] = {}

        async def replica_up() -> bool:
            nonlocal tree
            tree = descendants(asc.proc.pid) if asc.proc is not None else {}
            return {"tritonserver", "stub"} <= set(_kinds(tree))

        await eventually(replica_up, 60, what="the actuator started its replica")
        os.kill(asc.proc.pid, signal.SIGKILL)
        took = await _all_gone(tree, 10.0)
        print(f"\nSIGKILL of the autoscaler: its {len(tree)} descendants gone in {took:.2f} s")
    finally:
        await m.close()
        await m.mesh.stop()


# ----------------------------------------------------------------------------- supervision
@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def smesh(
    tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    # The default health policy: a restarted replica's ejection for its failed probes ends at
    # its first passed probe, so the time measured is the restart itself.
    m = await start_mesh(tokenizer_path, replicas=2, time_scale=0.05, redis=True)
    yield m
    await m.close()
    await m.mesh.stop()


async def _generate(m: Mesh, text: str, request_id: str = "") -> str | None:
    """The replica that served a short request through the gateway, None if it failed."""
    req = pb.GenerateRequest(
        model=MODEL_NAME,
        text=text,
        sampling=pb.SamplingParams(max_tokens=2),
        request_id=request_id,
    )
    try:
        msgs = [msg async for msg in m.gateway.Generate(req, timeout=5)]
    except grpc.aio.AioRpcError:
        return None
    return msgs[-1].complete.replica_id if msgs and msgs[-1].HasField("complete") else None


async def _healthy(m: Mesh, rid: str) -> bool:
    try:
        r = await m.orchestrator.ListReplicas(orch_pb.ListReplicasRequest(), timeout=2)
    except grpc.aio.AioRpcError:
        return False
    return any(x.replica.id == rid and x.healthy for x in r.replicas)


async def test_a_killed_replica_is_restarted_on_its_ports_and_routed_to_again(smesh: Mesh) -> None:
    mesh = smesh.mesh
    rid = mesh.replica_ids[0]
    old = mesh.tritons[0]
    assert old.pid is not None
    stubs = [p for p, cmd in descendants(old.pid).items() if STUB in cmd]
    assert stubs
    assert list(SHM_DIR.glob(f"{old.shm_prefix}*"))
    t0 = time.monotonic()
    os.kill(old.pid, signal.SIGKILL)

    async def not_healthy() -> bool:
        return not await _healthy(smesh, rid)

    await eventually(not_healthy, 10, what="the orchestrator sees the replica down")
    t_down = time.monotonic() - t0

    async def back() -> bool:
        return (
            mesh.tritons[0] is not old and mesh.tritons[0].is_running and await _healthy(smesh, rid)
        )

    await eventually(back, 30, what="the replica restarted and healthy again")
    t_healthy = time.monotonic() - t0
    new = mesh.tritons[0]
    assert new.ports == old.ports
    assert new.grpc_address == old.grpc_address
    assert not any(_alive(p) for p in stubs)  # the old stubs died with their server
    assert not list(SHM_DIR.glob(f"{old.shm_prefix}*"))  # and their shared memory is gone
    n = 0

    async def routed_to_it() -> bool:
        nonlocal n
        n += 1
        return await _generate(smesh, f"are you back? {n}") == rid

    await eventually(routed_to_it, 30, what="a request through the gateway lands on the replica")
    t_routed = time.monotonic() - t0

    # The supervisor counts the restart once its restart step returns, which can be after the
    # orchestrator already probed the new process healthy.
    async def counted() -> bool:
        return mesh.supervisor.restarts(rid) >= 1

    await eventually(counted, 30, what="the supervisor counts the restart")
    assert mesh.supervisor.restarts(rid) == 1
    down = next(e.down_s for e in mesh.supervisor.history if e.name == rid)
    print(
        f"\nreplica kill -9: orchestrator saw it down after {t_down:.2f} s; restarted in "
        f"{down:.2f} s; healthy in ListReplicas after {t_healthy:.2f} s; first request routed "
        f"to it after {t_routed:.2f} s ({n} requests)"
    )


async def test_a_killed_orchestrator_is_restarted_on_its_port(smesh: Mesh) -> None:
    mesh = smesh.mesh
    orch = mesh.services["orchestrator"]
    assert orch.proc is not None
    old_pid, port = orch.proc.pid, orch.grpc_port
    t0 = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)

    async def restarted() -> bool:
        return orch.proc is not None and orch.proc.pid != old_pid and orch.proc.returncode is None

    await eventually(restarted, 30, what="the orchestrator process restarted")
    assert orch.grpc_port == port

    async def serves() -> bool:
        return await _generate(smesh, "hello again") is not None

    await eventually(serves, 30, what="requests through the gateway succeed again")
    t_serving = time.monotonic() - t0

    async def all_healthy() -> bool:
        return all([await _healthy(smesh, rid) for rid in mesh.replica_ids])

    await eventually(all_healthy, 30, what="the new orchestrator sees every replica healthy")
    down = next(e.down_s for e in mesh.supervisor.history if e.name == "orchestrator")
    print(
        f"\norchestrator kill -9: restarted in {down:.2f} s; requests through the gateway "
        f"succeed again after {t_serving:.2f} s"
    )


@pytest.mark.parametrize("name", ["kv_registry", "gateway", "autoscaler"])
async def test_every_other_service_is_restarted_on_its_ports(smesh: Mesh, name: str) -> None:
    svc = smesh.mesh.services[name]
    assert svc.proc is not None
    old_pid = svc.proc.pid
    ports = (svc.grpc_port, svc.metrics_port, svc.http_port)
    before = smesh.mesh.supervisor.restarts(name)
    t0 = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)

    async def restarted() -> bool:
        return smesh.mesh.supervisor.restarts(name) == before + 1

    await eventually(restarted, 30, what=f"{name} restarted")
    assert svc.proc.pid != old_pid
    assert (svc.grpc_port, svc.metrics_port, svc.http_port) == ports

    async def serves() -> bool:
        return await _generate(smesh, f"after {name}") is not None

    await eventually(serves, 30, what="requests through the gateway succeed")
    print(f"\n{name} kill -9: serving through the gateway after {time.monotonic() - t0:.2f} s")


async def test_the_meshs_redis_is_restarted_on_its_port_and_keyed_requests_work_again(
    smesh: Mesh,
) -> None:
    """The gateway keeps its idempotency/resume store in the mesh's supervised redis-server: a
    keyed request works, Redis is killed, the supervisor restarts it on its port, and keyed
    requests work again (the gateway reconnects; an empty store is a cache miss, not an error)."""
    redis = smesh.mesh.redis
    assert redis is not None
    assert redis.proc is not None
    assert await _generate(smesh, "keyed before", request_id="redis-before") is not None
    old_pid, port = redis.proc.pid, redis.port
    before = smesh.mesh.supervisor.restarts("redis")
    os.kill(old_pid, signal.SIGKILL)

    async def restarted() -> bool:
        return smesh.mesh.supervisor.restarts("redis") == before + 1

    await eventually(restarted, 30, what="redis restarted")
    assert redis.proc is not None
    assert redis.proc.pid != old_pid
    assert redis.port == port

    async def keyed_serves() -> bool:
        return await _generate(smesh, "keyed after", request_id="redis-after") is not None

    await eventually(keyed_serves, 30, what="keyed requests through the gateway succeed")
