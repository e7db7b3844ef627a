from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from llmmesh.common.process import tied_to_parent
from llmmesh.netutil import free_port
from llmmesh.triton import launcher
from llmmesh.triton.launcher import (
    REPO_ROOT,
    TritonPorts,
    TritonServer,
    TritonStartError,
    install_python_backend_stub,
    tritonserver_env,
)


def running(server: TritonServer) -> bool:
    return server.is_running


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_install_stub_is_idempotent() -> None:
    first = install_python_backend_stub()
    mtime = first.stat().st_mtime_ns
    assert install_python_backend_stub() == first
    assert first.stat().st_mtime_ns == mtime  # identical: not copied again
    assert os.access(first, os.X_OK)


def test_env_has_libdir_and_pythonpath(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/lib")
    env = tritonserver_env({"LLMMESH_EMULATOR_TIME_SCALE": "0.5"})
    libdir = str(sysconfig.get_config_var("LIBDIR"))
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [libdir, "/opt/lib"]
    paths = env["PYTHONPATH"].split(os.pathsep)
    assert paths == [str(REPO_ROOT), sysconfig.get_paths()["purelib"], "/somewhere"]
    assert env["LLMMESH_EMULATOR_TIME_SCALE"] == "0.5"


def test_addresses_and_command(tmp_path: Path) -> None:
    server = TritonServer(tmp_path, TritonPorts(grpc=1, http=2, metrics=3))
    assert server.grpc_address == "127.0.0.1:1"
    assert server.http_url == "http://127.0.0.1:2"
    assert server.metrics_url == "http://127.0.0.1:3/metrics"
    assert (server.pid, server.is_running, server.returncode) == (None, False, None)
    cmd = server.command()
    assert "--grpc-address=127.0.0.1" in cmd
    assert "--metrics-port=3" in cmd
    assert f"--model-repository={tmp_path.resolve()}" in cmd


class _Starts:
    """Servers whose start fails with `error`; counts the servers made."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.made = 0

    def make(self) -> TritonServer:
        self.made += 1
        starts = self

        class Failing:
            async def start(self, ready_timeout_s: float) -> None:
                raise starts.error

        return Failing()  # type: ignore[return-value]


async def test_a_server_that_exits_while_starting_is_retried_on_new_ports() -> None:
    starts = _Starts(TritonStartError("exited with code 1"))
    with pytest.raises(TritonStartError):
        await launcher.start_on_free_ports(starts.make, attempts=3)
    assert starts.made == 3


async def test_a_server_not_ready_in_time_is_not_started_again() -> None:
    # A slow model load, not a port clash: three tries would triple the wait.
    starts = _Starts(launcher.TritonReadyTimeout("not ready after 600s"))
    with pytest.raises(launcher.TritonReadyTimeout):
        await launcher.start_on_free_ports(starts.make, attempts=3)
    assert starts.made == 1


@pytest.mark.integration
async def test_early_exit_raises_with_log_tail(tmp_path: Path) -> None:
    model = tmp_path / "repo" / "broken"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text('name: "broken"\nbackend: "no_such_backend"\n')
    server = TritonServer(tmp_path / "repo", TritonPorts.free(), log_path=tmp_path / "log")
    with pytest.raises(TritonStartError, match="exited with code") as info:
        await server.start(ready_timeout_s=60)
    assert "broken" in str(info.value)
    assert not server.is_running


@pytest.mark.integration
async def test_start_kill_and_stop(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    server = TritonServer(tmp_path / "repo", TritonPorts.free())
    await server.start(ready_timeout_s=60)
    pid = server.pid
    assert pid is not None
    assert server.is_running
    assert server.kill() == -9
    assert not running(server)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie
    assert await server.stop() == -9  # already dead: stop() just reports it
    assert server.returncode == -9


class _ExitsLeavingAChild(TritonServer):
    """A "server" that starts a child in its process group and exits 1 without stopping it, as
    tritonserver does with its backend stubs when its exit timeout expires."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path, TritonPorts(grpc=1, http=2, metrics=3))
        self.child_pid_file = tmp_path / "child.pid"

    def command(self) -> list[str]:
        return ["/bin/sh", "-c", f"sleep 3600 & echo $! > {self.child_pid_file}; exit 1"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


async def test_stop_reports_the_exit_status_and_kills_left_over_children(tmp_path: Path) -> None:
    server = _ExitsLeavingAChild(tmp_path)
    server._spawn()
    assert server._proc is not None
    server._proc.wait()  # the leader has exited; its child lives on in the group
    child = int(server.child_pid_file.read_text())
    assert _alive(child)
    assert await server.stop() == 1
    assert server.returncode == 1
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "left-over child not killed"
        await asyncio.sleep(0.01)


async def test_wait_returns_once_the_server_exits_on_its_own_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launcher, "SHM_DIR", tmp_path)
    server = _ExitsLeavingAChild(tmp_path)
    region = tmp_path / f"{server.shm_prefix}some-uuid"
    region.write_bytes(b"")  # what its backend stub would have left
    server._spawn()
    child = int(_wait_for_file(server.child_pid_file))
    assert await server.wait() == 1  # no stop(): it ended by itself
    assert not server.is_running
    assert not region.exists()
    deadline = time.monotonic() + 10
    while _alive(child):  # the rest of its group is killed, as stop() does
        assert time.monotonic() < deadline, "left-over child not killed"
        await asyncio.sleep(0.01)


def _wait_for_file(path: Path) -> str:
    deadline = time.monotonic() + 10
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() < deadline, f"{path} not written"
        time.sleep(0.01)
    return path.read_text().strip()


def test_respawned_has_the_same_ports_env_and_log_and_its_own_shm_prefix(tmp_path: Path) -> None:
    server = TritonServer(
        tmp_path, TritonPorts(grpc=1, http=2, metrics=3), {"X": "1"}, tmp_path / "t.log"
    )
    again = server.respawned()
    assert (again.ports, again.env, again.log_path) == (server.ports, server.env, server.log_path)
    assert again.shm_prefix != server.shm_prefix
    assert f"--backend-config=python,shm-region-prefix-name={again.shm_prefix}" in again.command()
    assert again.pid is None


def test_stale_shm_regions_of_dead_launchers_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launcher, "SHM_DIR", tmp_path)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a launcher that no longer exists
    dead = tmp_path / f"llmmesh_triton_{gone.pid}_0_uuid"
    live = tmp_path / f"llmmesh_triton_{os.getpid()}_0_uuid"
    other = tmp_path / "triton_python_backend_shm_region_uuid"  # not ours
    for f in (dead, live, other):
        f.write_bytes(b"")
    launcher.remove_stale_shm_regions()
    assert (dead.exists(), live.exists(), other.exists()) == (False, True, True)


# A launcher process: one "server" (sh) whose group holds a child that ignores its parent's death,
# as a backend stub does while tritonserver is an unreaped zombie.
_LAUNCHER = """
import sys, time
from pathlib import Path
from llmmesh.triton.launcher import TritonPorts, TritonServer
class Server(TritonServer):
    def command(self):
        return ["/bin/sh", "-c", f"sleep 3600 & echo $! > {sys.argv[1]}; exec sleep 3600"]
server = Server(Path(sys.argv[2]), TritonPorts(grpc=1, http=2, metrics=3), log_path=Path(sys.argv[3]))
server._spawn()
print(server.pid, flush=True)
time.sleep(3600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("at_once", [False, True])
def test_the_servers_whole_group_dies_with_its_launcher(tmp_path: Path, at_once: bool) -> None:
    """`at_once`: the launcher is killed as soon as the server is spawned, likely before the
    watchdog has installed its handler (its parent check covers that window)."""
    child_file = tmp_path / "child.pid"
    launcher_proc = subprocess.Popen(
        tied_to_parent(
            [sys.executable, "-c", _LAUNCHER, str(child_file), str(tmp_path), str(tmp_path / "log")]
        ),
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    assert launcher_proc.stdout is not None
    server = int(launcher_proc.stdout.readline())
    pids = [server]
    try:
        if at_once:
            launcher_proc.kill()
            # The server may be killed before its shell started the child: then nothing is left
            # to outlive the launcher but the server itself.
            deadline = time.monotonic() + 10
            while not (child_file.exists() and child_file.read_text().strip()):
                if not _alive(server):
                    break
                assert time.monotonic() < deadline, f"{child_file} not written"
                time.sleep(0.01)  # poll the server's progress
        if child_file.exists() and child_file.read_text().strip():
            pids.append(int(child_file.read_text()))
        elif not at_once:
            pids.append(int(_wait_for_file(child_file)))
        if not at_once:
            assert all(_alive(pid) for pid in pids)
        launcher_proc.kill()
        launcher_proc.wait()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids):
            assert time.monotonic() < deadline, "the server's group outlived its launcher"
            time.sleep(0.01)  # signals are delivered asynchronously; poll their effect
    finally:
        if launcher_proc.poll() is None:
            launcher_proc.kill()
            launcher_proc.wait()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        launcher_proc.stdout.close()


class _Sleeps(TritonServer):
    """A "server" that runs until killed, alone in its process group."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path, TritonPorts(grpc=1, http=2, metrics=3))

    def command(self) -> list[str]:
        return ["/bin/sh", "-c", "exec sleep 3600"]


async def test_a_server_ended_once_is_never_signalled_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill() then stop() (a liveness kill, then the mesh's stop): once reaped, the group id
    may be another process group's, so the second call reports the status and signals
    nothing. The first signals the group only while the leader is unreaped or members hold
    it."""
    server = _Sleeps(tmp_path)
    server._spawn()
    assert server._proc is not None
    pid = server._proc.pid
    signalled: list[tuple[int, int]] = []
    killpg = os.killpg

    def spy(pgid: int, sig: int) -> None:
        signalled.append((pgid, sig))
        killpg(pgid, sig)

    monkeypatch.setattr(os, "killpg", spy)
    assert server.kill() == -9
    assert signalled
    assert all(pgid == pid for pgid, _ in signalled)
    signalled.clear()
    assert await server.stop() == -9
    assert server.kill() == -9
    assert signalled == []


# `python -m llmmesh.triton.launcher serve` with a "server" that never becomes ready (an engine
# still loading): it prints the server's pid once spawned.
_SERVE_NEVER_READY = """
import sys
from llmmesh.triton import launcher
class Loading(launcher.TritonServer):
    def command(self):
        return ["/bin/sh", "-c", "exec sleep 3600"]
    def _spawn(self):
        super()._spawn()
        print(self.pid, flush=True)
launcher.TritonServer = Loading
sys.exit(launcher.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_at_a_signal_while_the_server_is_starting(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """Ctrl-C (or SIGTERM) while the server loads stops it and exits, instead of waiting for
    the server to become ready (up to `--ready-timeout`)."""
    ports = [str(free_port()) for _ in range(3)]
    proc = subprocess.Popen(
        tied_to_parent(
            [
                sys.executable,
                "-c",
                _SERVE_NEVER_READY,
                "serve",
                "--model-repository",
                str(tmp_path),
                "--grpc-port",
                ports[0],
                "--http-port",
                ports[1],
                "--metrics-port",
                ports[2],
                "--ready-timeout",
                "600",
            ]
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    assert proc.stdout is not None
    try:
        server = int(proc.stdout.readline())
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert b"stopped while starting" in err
        assert not _alive(server)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
