"""Run a real `tritonserver` (the 2.51 binary shipped in the nvidia-pytriton wheel).

    python -m llmmesh.triton.launcher install-stub
    python -m llmmesh.triton.launcher serve --model-repository model_repository/emulator

Requirements the environment must meet, all handled here:
- the Python backend stub for this interpreter's version is copied into backends/python
  (`install_python_backend_stub`, idempotent; copying keeps the stub's RPATH working);
- `LD_LIBRARY_PATH` starts with this interpreter's LIBDIR, else the stub loads another libpython
  and dies with "'_thread.RLock' object has no attribute '_recursion_count'";
- `PYTHONPATH` holds the repository root and this environment's site-packages, so models import
  `llmmesh` and its dependencies.

Lifetime: tritonserver runs in its own process group (so `stop()` reaches its Python backend
stubs) and dies with the thread that started it, whatever ends that thread's process, SIGKILL
included (`llmmesh.common.process.tied_to_parent`; start servers from the main or event-loop
thread, never from a worker thread that may exit first). Its backend stubs are tritonserver's
children, which PR_SET_PDEATHSIG does not reach, and their own parent check is not enough: it
asks whether tritonserver's pid exists (`kill(pid, 0)`), which a dead tritonserver that nobody
has reaped yet still passes, so a stub lives on for as long as the init process that adopted
tritonserver leaves it a zombie (seen here: stubs still up 15 s after a SIGTERM of a benchmark).
So each server gets a watchdog, a tiny process in a session of its own that the launcher's death
signals (SIGURG through PR_SET_PDEATHSIG, or its parent check at start): it then SIGKILLs the server's whole process group, stubs included, and
exits; it exits by itself once the group is gone, and `stop()` ends it with the server
(`tests/integration/test_lifecycle.py` checks that nothing is left after a SIGKILL or SIGTERM of
the process that started the mesh).

Shared memory: the Python backend keeps one region per model instance in /dev/shm, which a
killed tritonserver leaves behind (1 MiB or more each; a container's /dev/shm is often 64 MiB, so
a restart loop would fill it). Each server gets its own region prefix
(`llmmesh_triton_<launcher pid>_<n>_`): its regions are removed once it has exited, and regions
of launchers that are gone (killed before they could clean up) when the next server starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import filecmp
import importlib.util
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Self

from llmmesh.common.process import exited_within, prepend_path, tied_to_parent, until_exited
from llmmesh.common.topology import (
    TRITON_GRPC_PORT,
    TRITON_HTTP_PORT,
    TRITON_METRICS_PORT,
    TRITON_MODEL,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
_POLL_INTERVAL_S = 0.1
SHM_DIR = Path("/dev/shm")
_SHM_PREFIX = "llmmesh_triton_"
_SHM_OWNER = re.compile(rf"^{_SHM_PREFIX}(\d+)_")
_server_numbers = itertools.count()


@dataclass(frozen=True)
class LivenessProbe:
    """A Triton replica's probe: POST one token through the model (Triton 2.51 keeps answering
    its health and model-ready routes with 200 after the model's backend stub died). The
    Kubernetes pool's probes are `TRITON_LIVENESS` and `TRITON_READINESS`
    (mesh/base/triton/pool/triton-pool.yaml; meshcheck's workloads rule checks the manifest
    against them); the local supervisors apply the liveness one. `request_timeout_s` is the
    request's own timeout inside the probe, `timeout_s` the probe's (kubelet's timeoutSeconds)."""

    period_s: float
    timeout_s: float
    request_timeout_s: float
    failure_threshold: int


# Liveness waits long for its request: a saturated engine admits it within a queue's drain
# (a full batch and a full waiting queue ahead of it), a hung one never answers.
TRITON_LIVENESS = LivenessProbe(
    period_s=30.0, timeout_s=60.0, request_timeout_s=55.0, failure_threshold=4
)
# Readiness answers fast (the pool's Service follows it), so its request may still be queued
# behind a full batch when its time runs out: that passes (`generate_probe_command`).
TRITON_READINESS = LivenessProbe(
    period_s=5.0, timeout_s=10.0, request_timeout_s=9.0, failure_threshold=3
)
# The local supervisors' probe (the local mesh's and the local actuator's): the pool manifest's
# liveness timeouts (a saturated but healthy engine answering within them is never restarted),
# a shorter period and threshold than the manifest's 30 s x 4, so a replica whose backend stub
# died is replaced within seconds: locally nothing else replaces it, and a restart costs seconds.
# A probe that times out takes its full timeout, so the period only speeds up catching definite
# failures (a dead stub's error answer).
LOCAL_TRITON_LIVENESS = dataclasses.replace(TRITON_LIVENESS, period_s=1.0, failure_threshold=3)
# The probe's request (also the pool's readinessProbe's).
GENERATE_PROBE_PATH = f"/v2/models/{TRITON_MODEL}/generate"
GENERATE_PROBE_BODY = b'{"input_ids":[1],"input_lengths":1,"request_output_len":1}'
# An error answer holding one of these comes from an engine that is alive but whose waiting
# queue is full (our engines' QueueFullError, Triton's queue policy, TensorRT-LLM's
# max_queue_size): back-pressure, so the probe passes. A saturated engine is neither restarted
# (liveness) nor taken out of its Service (readiness); the orchestrator sheds its load.
PROBE_ALIVE_MARKERS = ("RESOURCE_EXHAUSTED", "maximum queue size")
# An error answer holding one of these comes from a server whose Python-backend stub died
# (Triton 2.51: "Stub process 'tensorrt_llm_0_0' is not healthy."): it does not heal, so a local
# supervisor replaces the server at the first such answer (`BackendDead`).
PROBE_DEAD_MARKERS = ("is not healthy",)
# The pool manifest's exec probes (readiness and liveness) run exactly this program
# (`python3 -c`, arguments from `generate_probe_command`; meshcheck's workloads rule checks
# them), `generate_probe` applies the liveness rule. Arguments: the request's timeout (s), and
# what a request with no answer by then means: `pass` (readiness: it waits in a saturated
# engine's queue behind a full batch, which at peak may outlast a readiness probe; failing it
# would take busy replicas out of their Service one after another) or `fail` (liveness, whose
# timeout outlasts a queue's drain: a hung engine). A refused connection (the server is gone)
# and an error answer (a dead backend stub's) fail either way.
GENERATE_PROBE_SCRIPT = f"""import sys, urllib.error as e, urllib.request as u
try:
    u.urlopen(u.Request("http://127.0.0.1:{TRITON_HTTP_PORT}{GENERATE_PROBE_PATH}",
        data={GENERATE_PROBE_BODY!r}, headers={{"Content-Type": "application/json"}}),
        timeout=float(sys.argv[1]))
except e.HTTPError as x:
    body = x.read().decode(errors="replace")
    sys.exit(0 if any(m in body for m in {PROBE_ALIVE_MARKERS!r}) else 1)
except TimeoutError:
    sys.exit(0 if sys.argv[2] == "pass" else 1)
"""


def generate_probe_command(probe: LivenessProbe, queued: Literal["pass", "fail"]) -> list[str]:
    """The exec probe's command: `GENERATE_PROBE_SCRIPT` with `probe`'s request timeout, and
    what a request still queued when it runs out means."""
    return ["python3", "-c", GENERATE_PROBE_SCRIPT, f"{probe.request_timeout_s:g}", queued]


# The group watchdog (argv: the process group to guard, the launcher's pid). Its parent-death
# signal is SIGURG (set by `setpriv` before exec), whose default action is to be ignored: one that
# arrives before the handler is in place is lost, not fatal, and the parent check right after
# installing the handler catches that case. Either way a gone launcher means: kill the group.
# Then it polls the group and exits once it is empty. Runs with -I -S: no site, no llmmesh
# imports, starts in ~20 ms.
_WATCHDOG = """
import os, signal, sys, time
group, launcher = int(sys.argv[1]), int(sys.argv[2])
def reap(*_):
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
    os._exit(0)
signal.signal(signal.SIGURG, reap)
signal.signal(signal.SIGTERM, reap)
signal.signal(signal.SIGINT, signal.SIG_IGN)
if os.getppid() != launcher:
    reap()
while True:
    time.sleep(1.0)
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        os._exit(0)
    except OSError:
        pass
"""


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first, process group
    third) of a live process (None: gone, or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields


def _group_has_members(pgid: int) -> bool:
    """Whether a live process is in process group `pgid` (read from /proc)."""
    return any(
        (fields := _stat(name)) is not None and int(fields[2]) == pgid
        for name in os.listdir("/proc")
        if name.isdigit()
    )


def pytriton_tritonserver_dir() -> Path:
    """`<site-packages>/pytriton/tritonserver` (found without importing pytriton)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed in this environment")
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def tritonserver_binary() -> Path:
    return pytriton_tritonserver_dir() / "bin" / "tritonserver"


def backend_directory() -> Path:
    return pytriton_tritonserver_dir() / "backends"


def install_python_backend_stub() -> Path:
    """Copy the Python backend stub built for this interpreter's X.Y into backends/python/.
    Idempotent; returns the installed path."""
    base = pytriton_tritonserver_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    src = base / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not src.is_file():
        raise RuntimeError(f"no Python backend stub for Python {version} at {src}")
    dst = base / "backends" / "python" / "triton_python_backend_stub"
    if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copy2(src, tmp)
    tmp.chmod(0o755)
    os.replace(tmp, dst)
    return dst


def tritonserver_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus what tritonserver and the Python backend stub need,
    then `extra` (which wins)."""
    env = dict(os.environ)
    libdir = str(sysconfig.get_config_var("LIBDIR"))
    env["LD_LIBRARY_PATH"] = prepend_path([libdir], env.get("LD_LIBRARY_PATH"))
    site = sysconfig.get_paths()["purelib"]
    env["PYTHONPATH"] = prepend_path([str(REPO_ROOT), site], env.get("PYTHONPATH"))
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class TritonPorts:
    grpc: int
    http: int
    metrics: int

    @classmethod
    def free(cls, host: str = "127.0.0.1") -> TritonPorts:
        from llmmesh.netutil import free_port

        return cls(grpc=free_port(host), http=free_port(host), metrics=free_port(host))


class BackendDead(RuntimeError):
    """A liveness probe's answer says the server's backend died (`PROBE_DEAD_MARKERS`)."""


class TritonStartError(RuntimeError):
    pass


class TritonReadyTimeout(TritonStartError):
    """Running, but not ready within the start's timeout (a slow or stuck model load, not a
    port another process took: that makes tritonserver exit)."""


class TritonServer:
    """One tritonserver process. Use `start()/stop()` (async), `start_sync()/stop_sync()`, or
    `async with` / `with`."""

    def __init__(
        self,
        model_repository: Path,
        ports: TritonPorts,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        *,
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.ports = ports
        self.host = host
        self.env = tritonserver_env(env)
        self.log_path = log_path
        self.extra_args = tuple(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._finished: int | None = None  # the exit status once `_finish` ended the server
        self._log: IO[bytes] | None = None
        self._log_mode = "wb"
        # This server's Python backend shared-memory regions: /dev/shm/<prefix><uuid>.
        self.shm_prefix = f"{_SHM_PREFIX}{os.getpid()}_{next(_server_numbers)}_"

    def respawned(self) -> TritonServer:
        """A new, unstarted server like this one: same repository, ports, environment and log
        file (appended to, so the log keeps what the previous process wrote before it died).
        Used to restart a dead replica where its peers know it."""
        server = TritonServer(
            self.model_repository,
            self.ports,
            self.env,
            self.log_path,
            host=self.host,
            extra_args=self.extra_args,
        )
        server._log_mode = "ab"
        return server

    # ----------------------------------------------------------------- addresses
    @property
    def _connect_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def grpc_address(self) -> str:
        return f"{self._connect_host}:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://{self._connect_host}:{self.ports.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._connect_host}:{self.ports.metrics}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has exited (see `stop()`), else None; also set after
        leaving a `with` / `async with` block, which cannot return it."""
        return self._proc.poll() if self._proc is not None else None

    def command(self) -> list[str]:
        return [
            str(tritonserver_binary()),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_directory()}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports.grpc}",
            f"--http-address={self.host}",
            f"--http-port={self.ports.http}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=false",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self.extra_args,
        ]

    # ----------------------------------------------------------------- lifecycle
    def _spawn(self) -> None:
        if self._proc is not None:
            raise RuntimeError("tritonserver already started")
        install_python_backend_stub()
        remove_stale_shm_regions()
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._log = self.log_path.open(self._log_mode)
        self._finished = None
        self._proc = subprocess.Popen(
            tied_to_parent(self.command()),  # no tritonserver outlives the thread that started it
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() reaches the backend stubs
        )
        # Its backend stubs (not started yet: tritonserver has still to load its models) are
        # killed with its group should this process die first.
        try:
            self._watchdog = subprocess.Popen(
                tied_to_parent(
                    [
                        *(sys.executable, "-I", "-S", "-c", _WATCHDOG),
                        *(str(self._proc.pid), str(os.getpid())),
                    ],
                    signal.SIGURG,
                ),
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # out of reach of the group's and the terminal's signals
            )
        except BaseException:
            self._finish()
            raise

    def _check_ready(self) -> bool:
        """One readiness probe; raises if the process has exited."""
        assert self._proc is not None
        rc = self._proc.poll()
        if rc is not None:
            raise TritonStartError(
                f"tritonserver exited with code {rc} before becoming ready; log tail:\n"
                + self.log_tail()
            )
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1.0) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    async def generate_probe(self, probe: LivenessProbe = TRITON_LIVENESS) -> bool:
        """One liveness probe: POST `GENERATE_PROBE_BODY` to the model's generate route, as the
        pool's livenessProbe does. True on a 2xx answer or a full queue's refusal
        (`PROBE_ALIVE_MARKERS`); raises with the reason otherwise (HTTP status and Triton's
        error, no answer in time, a refused connection): `BackendDead` for a dead backend
        stub's answer ("Stub process 'tensorrt_llm_0_0' is not healthy.")."""
        import aiohttp  # here: the launcher's CLI and watchdog do without it

        timeout = aiohttp.ClientTimeout(total=min(probe.request_timeout_s, probe.timeout_s))
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(
                    f"{self.http_url}{GENERATE_PROBE_PATH}",
                    data=GENERATE_PROBE_BODY,
                    headers={"Content-Type": "application/json"},
                ) as r,
            ):
                if 200 <= r.status < 300:
                    await r.read()
                    return True
                body = (await r.text()).strip()
                if any(m in body for m in PROBE_ALIVE_MARKERS):
                    return True
                if any(m in body for m in PROBE_DEAD_MARKERS):
                    raise BackendDead(f"HTTP {r.status}: {body[:500]}")
                raise RuntimeError(f"HTTP {r.status}: {body[:500]}")
        except TimeoutError as exc:  # liveness: longer than a queue's drain (TRITON_LIVENESS)
            raise RuntimeError(f"no answer within {timeout.total:g} s") from exc
        except aiohttp.ClientError as exc:
            raise RuntimeError(f"{type(exc).__name__}: {exc}") from exc

    def _timeout_error(self, ready_timeout_s: float) -> TritonStartError:
        return TritonReadyTimeout(
            f"tritonserver not ready after {ready_timeout_s:.0f}s; log tail:\n" + self.log_tail()
        )

    async def start(self, ready_timeout_s: float = 120.0) -> None:
        """Spawn and poll /v2/health/ready until ready; on failure the process is stopped and the
        error carries the log tail."""
        self._spawn()
        deadline = time.monotonic() + ready_timeout_s
        try:
            while not await asyncio.to_thread(self._check_ready):
                if time.monotonic() > deadline:
                    raise self._timeout_error(ready_timeout_s)
                await asyncio.sleep(_POLL_INTERVAL_S)
        except BaseException:
            await self.stop(grace_s=5.0)
            raise

    def start_sync(
        self, ready_timeout_s: float = 120.0, *, cancelled: Callable[[], bool] = lambda: False
    ) -> bool:
        """`start()`, blocking; False (the server stopped) once `cancelled()` holds before it
        is ready (a signal handler's flag: an engine load can take minutes)."""
        self._spawn()
        deadline = time.monotonic() + ready_timeout_s
        try:
            while not self._check_ready():
                if cancelled():
                    self.stop_sync(grace_s=5.0)
                    return False
                if time.monotonic() > deadline:
                    raise self._timeout_error(ready_timeout_s)
                time.sleep(_POLL_INTERVAL_S)
        except BaseException:
            self.stop_sync(grace_s=5.0)
            raise
        return True

    async def wait(self) -> int:
        """Wait until the process exits on its own (it is not stopped here), then clean up after
        it as `stop()` does (what is left of its process group is killed, the log closed); its
        exit status."""
        if self._proc is None:
            raise RuntimeError("tritonserver not started")
        await until_exited(self._proc)
        return self._finish()

    async def stop(self, grace_s: float = 15.0) -> int:
        """SIGTERM, wait up to `grace_s`, then SIGKILL the process group. Returns the exit status
        (0 if never started): 0 after a clean shutdown; 1 when tritonserver gave up on its own
        (its log then says "Exit timeout expired", e.g. a model that would not unload); -9 when it
        was still running after `grace_s` and was killed (`grace_s` below tritonserver's
        `--exit-timeout-secs`, 30 by default, ends a hung shutdown here first). Idempotent."""
        if self._proc is None:
            return 0
        self._signal(signal.SIGTERM)
        await asyncio.to_thread(exited_within, self._proc, grace_s)
        return self._finish()

    def stop_sync(self, grace_s: float = 15.0) -> int:
        """`stop()`, blocking."""
        if self._proc is None:
            return 0
        self._signal(signal.SIGTERM)
        exited_within(self._proc, grace_s)
        return self._finish()

    def kill(self) -> int:
        """SIGKILL the server and its backend stubs at once (fault injection: a replica dying)."""
        if self._proc is None:
            return 0
        return self._finish()

    def _signal(self, sig: signal.Signals) -> None:
        """`sig` to the server's process group while its leader is unreaped (running, or a
        zombie: either way the group id is still its own). Never reaps it."""
        assert self._proc is not None
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, sig)

    def _finish(self) -> int:
        assert self._proc is not None
        if self._finished is not None:  # its group may be another's by now: no signal again
            return self._finished
        pid = self._proc.pid
        # Still running after the grace period: kill the whole group (server and backend stubs)
        # while the leader is unreaped, so the group id cannot have been reused.
        self._signal(signal.SIGKILL)
        leader_unreaped = self._proc.returncode is None
        if leader_unreaped:
            # Wait for the leader's exit without reaping it: its zombie keeps the group id.
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        # The server may have exited without stopping its backend stubs (tritonserver's exit
        # timeout, "Exiting immediately", does that): kill what is left of its group. Its id is
        # the server's own while the leader's zombie holds it, or, the leader reaped already (a
        # poll saw it exit), while members are left: with none, the number may be another
        # group's by now.
        if leader_unreaped or _group_has_members(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        rc = self._proc.wait()
        _remove_shm(f"{self.shm_prefix}*")
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait()
            self._watchdog = None
        if self._log is not None:
            self._log.close()
            self._log = None
        self._finished = rc
        return rc

    def log_tail(self, max_bytes: int = 8000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode(errors="replace")

    # ----------------------------------------------------------------- context managers
    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __enter__(self) -> Self:
        self.start_sync()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_sync()


def _remove_shm(pattern: str) -> None:
    if not SHM_DIR.is_dir():
        return
    for region in SHM_DIR.glob(pattern):
        with contextlib.suppress(OSError):
            region.unlink()


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (a dead launcher nobody has reaped yet)."""
    return _stat(pid) is not None


def remove_stale_shm_regions() -> None:
    """Remove the shared-memory regions of servers started by launcher processes that no longer
    exist (a launcher killed with its servers; regions of live launchers are theirs to remove)."""
    if not SHM_DIR.is_dir():
        return
    owners: dict[int, bool] = {}
    for region in SHM_DIR.glob(f"{_SHM_PREFIX}*"):
        m = _SHM_OWNER.match(region.name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid not in owners:
            owners[pid] = _alive(pid)
        if not owners[pid]:
            with contextlib.suppress(OSError):
                region.unlink()


async def start_on_free_ports(
    make: Callable[[], TritonServer], *, attempts: int = 3, ready_timeout_s: float = 120.0
) -> TritonServer:
    """Start a server built by `make` (which picks free ports each call) and return it ready.
    A port that was free a moment before launch can be taken by another process before Triton
    binds it, so a server that exits while starting is retried on new ports, `attempts` times
    in all; one that ran but was not ready in time is not (TritonReadyTimeout)."""
    for attempt in range(attempts):
        server = make()
        try:
            await server.start(ready_timeout_s)
            return server
        except TritonReadyTimeout:
            raise
        except TritonStartError:
            if attempt == attempts - 1:
                raise
    raise ValueError(f"attempts must be positive, got {attempts}")


# --------------------------------------------------------------------- CLI
def _serve(args: argparse.Namespace) -> int:
    ports = TritonPorts(grpc=args.grpc_port, http=args.http_port, metrics=args.metrics_port)
    server = TritonServer(
        Path(args.model_repository),
        ports,
        log_path=Path(args.log_file) if args.log_file else None,
        host=args.host,
    )
    stop_requested = False

    def _on_signal(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if not server.start_sync(args.ready_timeout, cancelled=lambda: stop_requested):
        print("stopped while starting", file=sys.stderr, flush=True)
        return 130
    print(
        f"tritonserver ready (pid {server.pid}): grpc {server.grpc_address}, "
        f"http {server.http_url}, metrics {server.metrics_url}; log {server.log_path}",
        flush=True,
    )
    while not stop_requested and server.is_running:
        time.sleep(_POLL_INTERVAL_S)
    if not server.is_running:
        print(f"tritonserver exited; log tail:\n{server.log_tail()}", file=sys.stderr)
    return server.stop_sync()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmmesh.triton.launcher")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install-stub", help="copy the Python backend stub for this interpreter")
    serve = sub.add_parser("serve", help="run tritonserver in the foreground until SIGINT/SIGTERM")
    serve.add_argument("--model-repository", default=str(REPO_ROOT / "model_repository/emulator"))
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--grpc-port", type=int, default=TRITON_GRPC_PORT)
    serve.add_argument("--http-port", type=int, default=TRITON_HTTP_PORT)
    serve.add_argument("--metrics-port", type=int, default=TRITON_METRICS_PORT)
    serve.add_argument("--log-file", default=None)
    serve.add_argument("--ready-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    if args.cmd == "install-stub":
        print(install_python_backend_stub())
        return 0
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
