"""The local mesh on real processes: kv_registry, N Triton replicas (the engine emulator or
SmolLM2-135M-Instruct on CPU, chosen per pool: `MeshOptions.engine`, `pool_engines`), orchestrator,
gateway and autoscaler. Used by `make run` and by the integration tests.

Every child is configured by a settings object of its own class (the services' settings, the
emulator's, the CPU engine's); its environment is derived from that object
(`llmmesh.common.settings.to_env`), so no variable name is spelt here. Services bind the ports
they are given (0 = any free port) and report the bound ports through a ready file; Triton
replicas get free ports picked just before launch.

Lifecycle: every child dies with the mesh's process whatever ends it, SIGKILL included (each is
spawned with `llmmesh.common.process.tied_to_parent`; so start the mesh from the main thread or
the event loop's thread); `stop()` (and SIGTERM/SIGINT of `python -m llmmesh.localmesh`) stops
them gracefully, front to back. While it runs, a `llmmesh.supervisor.Supervisor` restarts a child
that exits (Triton replica, orchestrator, kv_registry, gateway, autoscaler) with backoff, on the
ports it had, so its peers reconnect to the same address; a restarted Triton replica is back in
the orchestrator's rotation once its readiness probe passes (server and models ready). Like the
kubelet, it also probes each static Triton replica's liveness (one token through the model,
`MeshOptions.triton_liveness`, `LOCAL_TRITON_LIVENESS` by default) and kills and restarts a
replica that failed it `failure_threshold` times in a row: one whose Python-backend stub died,
which Triton keeps reporting ready. `MeshOptions.supervise=False` leaves dead children dead (tests of the failure itself).

A launcher: it imports the services' settings classes and the orchestrator's policy model, which
the shared library (llmmesh.common and the other library modules) never does; nothing in
services imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from pydantic_settings import BaseSettings

from llmmesh.common.components import AUTOSCALER, GATEWAY, KV_REGISTRY, ORCHESTRATOR, Component
from llmmesh.common.process import tied_to_parent
from llmmesh.common.settings import (
    ENV_ROOT,
    KvBlockSettings,
    ServiceSettings,
    split_env,
    to_env,
    with_env,
)
from llmmesh.common.topology import DEFAULT_MODEL_VERSION, TRITON_MODEL
from llmmesh.emulator.settings import EmulatorSettings
from llmmesh.redis_server import RedisServer
from llmmesh.supervisor import Liveness, RestartPolicy, Supervisor
from llmmesh.triton.launcher import (
    LOCAL_TRITON_LIVENESS,
    BackendDead,
    LivenessProbe,
    TritonPorts,
    TritonServer,
    start_on_free_ports,
)
from services.autoscaler.actuators.local_settings import LocalActuatorSettings, ManagedPool
from services.autoscaler.policy import PolicyConfig
from services.autoscaler.settings import AutoscalerSettings, PoolConfig, ScrapeTarget
from services.gateway.settings import GatewaySettings, ModelSettings
from services.kv_registry.settings import KvRegistrySettings
from services.orchestrator.policy import Policy, ScaleFromZeroPolicy
from services.orchestrator.settings import OrchestratorSettings, ReplicaSpec

ROOT = Path(__file__).resolve().parents[1]
EMULATOR_REPOSITORY = ROOT / "model_repository" / "emulator"
SMOLLM2_REPOSITORY = ROOT / "model_repository" / "smollm2"
#: Engines a static replica can run: the emulator (fast, deterministic tokens; tests and
#: benchmarks) or SmolLM2-135M-Instruct on CPU (a real LLM; `make run`).
EngineName = Literal["emulator", "smollm2"]
ENGINE_REPOSITORIES: dict[str, Path] = {
    "emulator": EMULATOR_REPOSITORY,
    "smollm2": SMOLLM2_REPOSITORY,
}
# Readiness budget per engine: the real model imports torch and loads its weights (~20-40 s on
# two cores, longer when several replicas load at once).
ENGINE_READY_TIMEOUT_S: dict[str, float] = {"emulator": 120.0, "smollm2": 600.0}
DEFAULT_TOKENIZER = ROOT / ".build" / "models" / "smollm2-135m-instruct" / "tokenizer.json"
CPU_ENGINE_CACHE = ROOT / ".build" / "models" / "smollm2-135m-instruct" / "cpu-engine"
MODEL_NAME = "smollm2-135m-instruct"
# How long a child service may take to finish in-flight RPCs on SIGTERM (local runs stop fast).
DRAIN_SECONDS = 10.0
# The orchestrator probes and scrapes its replicas this often (seconds; fast for tests).
PROBE_INTERVAL_S = 0.25
AUTOSCALER_INTERVAL_S = 1.0

#: Each service's settings class, where its env prefix and default ports are declared.
SERVICE_SETTINGS: dict[Component, type[ServiceSettings]] = {
    GATEWAY: GatewaySettings,
    ORCHESTRATOR: OrchestratorSettings,
    KV_REGISTRY: KvRegistrySettings,
    AUTOSCALER: AutoscalerSettings,
}


def default_port(component: Component, port: str = "grpc_port") -> int:
    """A service's default port (`grpc_port`, `metrics_port`, the gateway's `http_port`), as
    its settings class declares it."""
    default = SERVICE_SETTINGS[component].model_fields[port].default
    if not isinstance(default, int):
        raise TypeError(f"{component.name}.{port} has no integer default")
    return default


class ServiceProcess:
    """A `python -m services.<name>` child process configured by one settings object of the
    service's class: its `LLMMESH_<NAME>_*` environment is derived from that object (`to_env`),
    so no variable name is spelt by hand. It reports its bound ports through the ready file the
    settings name (set here); `env` holds what it shares with the other children (block
    identity, variables of no llmmesh component)."""

    def __init__(
        self,
        component: Component,
        settings: ServiceSettings,
        workdir: Path,
        env: Mapping[str, str] | None = None,
        name: str = "",
    ):
        if not isinstance(settings, SERVICE_SETTINGS[component]):
            raise TypeError(f"{component.name} is configured by {SERVICE_SETTINGS[component]}")
        self.name = name or component.name  # several of one component: orchestrator-1, ...
        self.component = component
        self._ready_file = workdir / f"{self.name}.ready.json"
        self.settings = settings.model_copy(update={"ready_file": self._ready_file})
        self._env = dict(env or {})
        self._log_path = workdir / f"{self.name}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.grpc_port = 0
        self.metrics_port = 0
        self.http_port = 0  # 0: the service serves no HTTP API

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path:
        return self._log_path

    def environment(self) -> dict[str, str]:
        """The child's environment: this process's, the shared variables, then the settings."""
        env = {**os.environ, **self._env, **to_env(self.settings)}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    async def start(self, timeout_s: float = 60.0) -> None:
        self._ready_file.unlink(missing_ok=True)
        env = self.environment()
        log = self._log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            *tied_to_parent([sys.executable, "-m", self.component.module]),  # dies with the mesh
            env=env,
            stdout=log,
            stderr=log,
            cwd=ROOT,
            # Not in the terminal's process group: Ctrl-C reaches the mesh alone, which stops
            # the services in order (front to back); each would otherwise stop at once, and
            # take the mesh's own stop signal as a second one (its drain cut short).
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while not self._ready_file.exists():
            if self.proc.returncode is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.proc.kill()  # not left running behind the error (a retry starts another)
                await self.proc.wait()
                raise TimeoutError(f"{self.name} not ready after {timeout_s}s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)  # polling a file the child writes once it serves
        ports = json.loads(self._ready_file.read_text())
        self.grpc_port, self.metrics_port = int(ports["grpc_port"]), int(ports["metrics_port"])
        self.http_port = int(ports.get("http_port", 0))

    async def restart(self, timeout_s: float = 60.0) -> None:
        """Start again, after the process exited, on the ports it had bound (its peers dial
        those), and wait until it is ready."""
        if self.proc is not None and self.proc.returncode is None:
            raise RuntimeError(f"{self.name} is still running")
        ports: dict[str, int] = {"grpc_port": self.grpc_port, "metrics_port": self.metrics_port}
        if self.http_port:
            ports["http_port"] = self.http_port
        self.settings = self.settings.model_copy(update=ports)
        await self.start(timeout_s)

    async def wait(self) -> int:
        """Wait until the process exits; its exit status."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} not started")
        return await self.proc.wait()

    @property
    def http_base_url(self) -> str:
        """Base URL of the service's HTTP API (the gateway's OpenAI API: `<base>/v1/...`)."""
        if not self.http_port:
            raise RuntimeError(f"{self.name} serves no HTTP API")
        return f"http://127.0.0.1:{self.http_port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()


@dataclass(frozen=True)
class AutoscaledPool:
    """A pool the autoscaler's local actuator starts and stops (no static replicas): the
    orchestrator declares it scale-from-zero, so requests wait for its first replica."""

    pool: str
    model_version: str = DEFAULT_MODEL_VERSION
    min_replicas: int = 0
    max_replicas: int = 2
    # Started by the actuator at its first evaluation, before the policy decides.
    initial_replicas: int = 0
    model_repository: Path = EMULATOR_REPOSITORY
    models: tuple[str, ...] = (TRITON_MODEL,)
    activation_timeout_s: float = 60.0
    # The autoscaler's policy for the pool (services.autoscaler.policy.PolicyConfig fields);
    # min/max replicas above override its bounds.
    policy: Mapping[str, object] = field(default_factory=dict)


@dataclass
class MeshOptions:
    """What the local mesh runs. The `*_env` mappings are `LLMMESH_*` variables written by hand;
    each is checked against the settings class of its prefix (a name that is no field of it is a
    ValueError, where the child would ignore it) and overrides what the mesh sets itself."""

    replicas: int = 2
    time_scale: float = 1.0
    tokenizer_path: Path = DEFAULT_TOKENIZER
    workdir: Path | None = None
    # Service ports: 0 = any free port (tests); `make run` uses the services' defaults.
    gateway_port: int = 0
    gateway_http_port: int = 0
    orchestrator_port: int = 0
    # Orchestrators run active-active (the first on `orchestrator_port`, the others on free
    # ports; services "orchestrator", "orchestrator-1", ...); the gateway spreads Admit over all
    # of them and the local actuator registers its replicas with each. 1 by default: tests that
    # read one orchestrator's view and metrics see the whole mesh; `make run` uses 2.
    orchestrators: int = 1
    kv_registry_port: int = 0
    autoscaler_port: int = 0
    log_json: bool = True
    # For every child: service and engine settings by their prefix, block identity
    # (LLMMESH_KV_*); variables of no llmmesh component are passed on as they are.
    extra_env: dict[str, str] = field(default_factory=dict)
    # Emulator replicas only (LLMMESH_EMULATOR_*), also those the local actuator starts.
    emulator_env: dict[str, str] = field(default_factory=dict)
    # Pool of each replica (index i -> replica-i) in the orchestrator's replica list; every
    # replica is in the orchestrator's default pool when unset.
    replica_pools: list[str] | None = None
    # The orchestrator only (LLMMESH_ORCHESTRATOR_*, e.g. PROFILE).
    orchestrator_env: dict[str, str] = field(default_factory=dict)
    # The gateway's context length for the model (prompt + completion tokens).
    context_length: int = 8192
    # Pools run by the autoscaler's local actuator, besides the `replicas` static ones.
    autoscaled_pools: list[AutoscaledPool] = field(default_factory=list)
    # Engine of the static replicas, and overrides per pool (pool name -> engine; the pools are
    # those named in `replica_pools`).
    engine: EngineName = "emulator"
    pool_engines: dict[str, EngineName] = field(default_factory=dict)
    # Real-model replicas only (LLMMESH_CPU_ENGINE_*).
    cpu_engine_env: dict[str, str] = field(default_factory=dict)
    # Restart children that exit while the mesh runs (False: tests of a failure itself), and
    # how (backoff, crash-loop bound).
    supervise: bool = True
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    # With `supervise`: each static replica's liveness probe, as the kubelet runs the pool's
    # (one token through the model): a replica whose backend stub died, which Triton still
    # reports ready, is killed and restarted. None: no probe.
    triton_liveness: LivenessProbe | None = LOCAL_TRITON_LIVENESS
    # A redis-server child (supervised like the others) that the gateway keeps its
    # idempotency/resume store in (`GatewaySettings.resume_redis_url`), as a gateway tier of
    # several pods does in Kubernetes: a request id retried through another gateway resumes.
    # False: the gateway's in-process store (one gateway).
    redis: bool = False
    # Proxies in the request path (the Envoy rehearsal of the Istio data path,
    # llmmesh.envoymesh); None: every process dials the others directly.
    data_plane: DataPlane | None = None


class DataPlane(Protocol):
    """What stands between the mesh's processes, called at three points of `LocalMesh.start`
    (after the replicas, for each replica's entry in the orchestrator's list, after the
    gateway) and first in `stop` (its gateways with the mesh's, then its proxies)."""

    async def replicas_started(self, mesh: LocalMesh) -> None: ...

    def replica_route(self, index: int) -> dict[str, Any]:
        """ReplicaSpec fields replacing the direct address of replica `index`."""
        ...

    async def gateway_started(self, mesh: LocalMesh) -> None: ...

    async def stop(self) -> None: ...

    async def stop_gateways(self) -> None:
        """The gateways it started, draining through its proxies."""
        ...

    async def stop_proxies(self) -> None:
        """Its proxies, once every gateway drained."""
        ...

    def endpoints(self) -> dict[str, str]: ...

    def processes(self) -> Sequence[Restartable]:
        """Its processes, supervised as the mesh's own (restarted when they exit)."""
        ...


class Restartable(Protocol):
    name: str

    async def wait(self) -> int | None: ...

    async def restart(self) -> None: ...


S = TypeVar("S", bound=BaseSettings)
Svc = TypeVar("Svc", bound=ServiceSettings)


def engine_time_scale(time_scale: float) -> float:
    """The orchestrator's `engine_time_scale` for emulators at `time_scale` (0: they do not
    wait at all, and are modelled at the cost profile's speed)."""
    return time_scale if time_scale > 0 else 1.0


def _check_only(cls: type[BaseSettings], env: Mapping[str, str], option: str) -> None:
    """Every variable in `env` (the MeshOptions field `option`) names a field of `cls`."""
    _, rest = split_env(env, [cls])
    if rest:
        raise ValueError(f"MeshOptions.{option}: not {cls.__name__} settings: {sorted(rest)}")


def _only(settings: S, env: Mapping[str, str], option: str) -> S:
    """`settings` with `env` (the MeshOptions field `option`, only its class's) applied."""
    _check_only(type(settings), env, option)
    return with_env(settings, env)


class LocalMesh:
    def __init__(self, options: MeshOptions):
        self.options = options
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if options.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="llmmesh-")
            self.workdir = Path(self._tmp.name)
        else:
            self.workdir = options.workdir
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.tritons: list[TritonServer] = []
        self.replica_ids: list[str] = []
        self.services: dict[str, ServiceProcess] = {}
        self.supervisor = Supervisor(options.restart_policy)
        self.redis: RedisServer | None = None
        self._started = False
        self._extra, passthrough = split_env(
            options.extra_env, [*SERVICE_SETTINGS.values(), KvBlockSettings, EmulatorSettings]
        )
        stray = {k: v for k, v in passthrough.items() if k.upper().startswith(ENV_ROOT)}
        if stray:
            # Imported here: the package imports torch, which only real-model meshes need.
            from llmmesh.cpu_engine.settings import CpuEngineSettings

            _, unknown = split_env(stray, [CpuEngineSettings])
            if unknown:
                raise ValueError(
                    f"MeshOptions.extra_env: no llmmesh component reads {sorted(unknown)}"
                )
        _check_only(OrchestratorSettings, options.orchestrator_env, "orchestrator_env")
        _check_only(EmulatorSettings, options.emulator_env, "emulator_env")
        if options.cpu_engine_env:
            from llmmesh.cpu_engine.settings import CpuEngineSettings

            _check_only(CpuEngineSettings, options.cpu_engine_env, "cpu_engine_env")
        # Every child's environment beyond its own settings: block identity, and the extra
        # variables of no llmmesh component.
        blocks = with_env(KvBlockSettings(), self._extra.get(KvBlockSettings, {}))
        self._shared_env = {**passthrough, **to_env(blocks)}

    def _configure(self, settings: Svc, own_env: Mapping[str, str] = {}, option: str = "") -> Svc:
        """A service's settings: `settings`, what every local service gets, then `extra_env`,
        then `own_env` (the MeshOptions field `option`, for this service only)."""
        settings = settings.model_copy(
            update={"log_json": self.options.log_json, "drain_seconds": DRAIN_SECONDS}
        )
        settings = with_env(settings, self._extra.get(type(settings), {}))
        return _only(settings, own_env, option) if own_env else settings

    def _service(
        self, component: Component, settings: ServiceSettings, name: str = ""
    ) -> ServiceProcess:
        svc = ServiceProcess(component, settings, self.workdir, self._shared_env, name)
        self.services[svc.name] = svc
        return svc

    @property
    def orchestrators(self) -> list[ServiceProcess]:
        """Every orchestrator of the mesh, the first ("orchestrator") first."""
        return [svc for name, svc in self.services.items() if svc.component is ORCHESTRATOR]

    @property
    def orchestrator_addresses(self) -> list[str]:
        return [svc.address for svc in self.orchestrators]

    async def start(self) -> None:
        o = self.options
        kv = self._service(
            KV_REGISTRY,
            self._configure(KvRegistrySettings(grpc_port=o.kv_registry_port, metrics_port=0)),
        )
        await kv.start()
        # A task group: one replica that fails to start cancels the others' starts, rather
        # than leaving them running (and respawning) after the mesh's stop. Its first error is
        # the mesh's.
        try:
            async with asyncio.TaskGroup() as replicas:
                for _ in range(o.replicas):
                    replicas.create_task(self.add_replica())
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from failed
        if o.data_plane is not None:
            await o.data_plane.replicas_started(self)
        orch_settings = self._configure(
            OrchestratorSettings(
                grpc_port=o.orchestrator_port,
                metrics_port=0,
                health_interval_s=PROBE_INTERVAL_S,
                metrics_interval_s=PROBE_INTERVAL_S,
                # The emulators' speed: the orchestrator models them as slowed as they run
                # (time scale 0, no waiting at all: modelled at the profile's own speed).
                engine_time_scale=engine_time_scale(o.time_scale),
                kv_registry_address=kv.address,
                replicas=[
                    ReplicaSpec.model_validate(
                        {
                            "id": rid,
                            "grpc_address": t.grpc_address,
                            "metrics_url": t.metrics_url,
                            **self._replica_pool(i),
                            **(o.data_plane.replica_route(i) if o.data_plane else {}),
                        }
                    )
                    for i, (rid, t) in enumerate(zip(self.replica_ids, self.tritons, strict=True))
                ],
            ),
            o.orchestrator_env,
            "orchestrator_env",
        )
        if o.autoscaled_pools:
            if orch_settings.policy_file is not None:
                raise ValueError("autoscaled_pools writes the orchestrator's policy file itself")
            orch_settings = orch_settings.model_copy(
                update={"policy_file": self._scale_from_zero_policy(o.autoscaled_pools)}
            )
        if o.orchestrators < 1:
            raise ValueError("MeshOptions.orchestrators: at least 1")
        orch = self._service(ORCHESTRATOR, orch_settings)
        others = [
            self._service(
                ORCHESTRATOR,
                orch_settings.model_copy(update={"grpc_port": 0}),
                f"{ORCHESTRATOR.name}-{i}",
            )
            for i in range(1, o.orchestrators)
        ]
        await asyncio.gather(orch.start(), *(x.start() for x in others))
        if o.redis:
            self.redis = RedisServer(self.workdir / "redis")
            await self.redis.start()
        gw = self._service(
            GATEWAY,
            self._configure(
                GatewaySettings(
                    grpc_port=o.gateway_port,
                    http_port=o.gateway_http_port,
                    metrics_port=0,
                    orchestrator_address=orch.address,
                    orchestrator_addresses=self.orchestrator_addresses,
                    models=[
                        ModelSettings(
                            name=MODEL_NAME,
                            tokenizer_path=o.tokenizer_path,
                            context_length=o.context_length,
                        )
                    ],
                    resume_redis_url=None if self.redis is None else self.redis.url,
                )
            ),
        )
        await gw.start()  # first: the autoscaler reads the gateway's TTFT/ITL and token rates
        if o.data_plane is not None:
            await o.data_plane.gateway_started(self)
        actuator, pools = self._local_actuator()
        asc = self._service(
            AUTOSCALER,
            self._configure(
                AutoscalerSettings(
                    grpc_port=o.autoscaler_port,
                    metrics_port=0,
                    interval_s=AUTOSCALER_INTERVAL_S,
                    orchestrator_metrics_urls=[svc.metrics_url for svc in self.orchestrators],
                    gateway_metrics_url=gw.metrics_url,
                    targets=[
                        ScrapeTarget(
                            replica_id=rid, metrics_url=t.metrics_url, **self._replica_pool(i)
                        )
                        for i, (rid, t) in enumerate(
                            zip(self.replica_ids, self.tritons, strict=True)
                        )
                    ],
                    local_actuator=actuator,
                    pools=pools,
                )
            ),
        )
        await asc.start()
        self._started = True
        if o.supervise:
            for svc in self.services.values():
                self.supervisor.watch(svc.name, svc.wait, svc.restart)
            if self.redis is not None:
                self.supervisor.watch("redis", self.redis.wait, self.redis.restart)
            for index in range(len(self.tritons)):
                self._supervise_replica(index)
            if o.data_plane is not None:
                for proc in o.data_plane.processes():
                    self.supervisor.watch(f"envoy {proc.name}", proc.wait, proc.restart)

    def _supervise_replica(self, index: int) -> None:
        """Restart replica-`index` on its ports (the orchestrator's replica list and the
        autoscaler's targets keep its address) when its tritonserver exits, or when it failed its
        liveness probe `failure_threshold` times in a row (then its whole process group is
        killed first)."""
        timeout = ENGINE_READY_TIMEOUT_S[self.replica_engine(index)]
        probe = self.options.triton_liveness
        liveness = None
        if probe is not None:

            async def alive() -> bool:
                return await self.tritons[index].generate_probe(probe)

            async def kill() -> None:
                self.tritons[index].kill()

            liveness = Liveness(
                alive, kill, probe.period_s, probe.failure_threshold, fatal=(BackendDead,)
            )

        async def wait() -> int:
            return await self.tritons[index].wait()

        async def restart() -> None:
            server = self.tritons[index].respawned()
            self.tritons[index] = server
            await server.start(ready_timeout_s=timeout)

        self.supervisor.watch(self.replica_ids[index], wait, restart, liveness)

    def _scale_from_zero_policy(self, pools: Sequence[AutoscaledPool]) -> Path:
        """The orchestrator's policy file declaring the autoscaled pools scale-from-zero."""
        policy = Policy(
            scale_from_zero={
                p.pool: ScaleFromZeroPolicy(
                    activation_timeout_s=p.activation_timeout_s,
                    model_version=p.model_version,
                    models=list(p.models),
                )
                for p in pools
            }
        )
        path = self.workdir / "orchestrator-policy.json"  # JSON is YAML
        path.write_text(policy.model_dump_json(include={"scale_from_zero"}))
        return path

    def _emulator(self, **fields: object) -> EmulatorSettings:
        """An emulator replica's settings: `fields`, the mesh's time scale, then `extra_env`
        and `emulator_env`."""
        o = self.options
        settings = EmulatorSettings.model_validate({"time_scale": o.time_scale, **fields})
        settings = with_env(settings, self._extra.get(EmulatorSettings, {}))
        return _only(settings, o.emulator_env, "emulator_env")

    def _local_actuator(self) -> tuple[LocalActuatorSettings | None, list[PoolConfig]]:
        """The autoscaler's local actuator over the autoscaled pools, and their policies."""
        pools = self.options.autoscaled_pools
        if not pools:
            return None, []
        actuator = LocalActuatorSettings(
            orchestrator_address=self.services[ORCHESTRATOR.name].address,
            orchestrator_addresses=self.orchestrator_addresses,
            kv_registry_address=self.services[KV_REGISTRY.name].address,
            # The actuator sets each replica's id and registry address itself.
            engine_env={**self._shared_env, **to_env(self._emulator())},
            log_dir=self.workdir,
            pools=[
                ManagedPool(
                    pool=p.pool,
                    model_version=p.model_version,
                    model_repository=p.model_repository,
                    models=list(p.models),
                    initial_replicas=p.initial_replicas,
                )
                for p in pools
            ],
        )
        return actuator, [
            PoolConfig(
                pool=p.pool,
                model_version=p.model_version,
                # The gateway labels its latency and token metrics with the served name.
                model=MODEL_NAME,
                policy=PolicyConfig.model_validate(
                    {**p.policy, "min_replicas": p.min_replicas, "max_replicas": p.max_replicas}
                ),
            )
            for p in pools
        ]

    def _replica_pool(self, index: int) -> dict[str, str]:
        pools = self.options.replica_pools
        if pools is None:
            return {}
        if len(pools) != self.options.replicas:
            raise ValueError(
                f"replica_pools names {len(pools)} pools for {self.options.replicas} replicas"
            )
        return {"pool": pools[index]}

    async def add_replica(self) -> TritonServer:
        index = len(self.replica_ids)
        rid = f"replica-{index}"
        self.replica_ids.append(rid)
        self.tritons.append(self._triton(rid))  # keeps replica_ids and tritons aligned

        def fresh() -> TritonServer:
            self.tritons[index] = self._triton(rid)
            return self.tritons[index]

        timeout = ENGINE_READY_TIMEOUT_S[self.replica_engine(index)]
        server = await start_on_free_ports(fresh, ready_timeout_s=timeout)
        if self._started and self.options.supervise:
            self._supervise_replica(index)
        return server

    def replica_engine(self, index: int) -> EngineName:
        """The engine replica-`index` runs: its pool's override, else `options.engine`."""
        o = self.options
        unknown = set(o.pool_engines) - set(o.replica_pools or ())
        if unknown:
            raise ValueError(f"pool_engines names pools no replica is in: {sorted(unknown)}")
        if o.replica_pools is not None and index < len(o.replica_pools):
            return o.pool_engines.get(o.replica_pools[index], o.engine)
        return o.engine

    def _triton(self, rid: str) -> TritonServer:
        if self.replica_engine(self.replica_ids.index(rid)) == "smollm2":
            return self._cpu_engine_triton(rid)
        settings = self._emulator(
            replica_id=rid, kv_registry_address=self.services[KV_REGISTRY.name].address
        )
        return TritonServer(
            EMULATOR_REPOSITORY,
            TritonPorts.free(),
            env={**self._shared_env, **to_env(settings)},
            log_path=self.workdir / f"{rid}.triton.log",
        )

    def _cpu_engine_triton(self, rid: str) -> TritonServer:
        """A replica serving SmolLM2 on CPU. It publishes no KV events (no prefix cache), so it
        gets no kv_registry address. torch threads are split between the real-model replicas,
        and the dequantized weights are cached under .build/ (the first start writes them),
        unless `cpu_engine_env` says otherwise."""
        # Imported here: the package imports torch, which only real-model meshes need.
        from llmmesh.cpu_engine.settings import CpuEngineSettings

        o = self.options
        n = sum(self.replica_engine(i) == "smollm2" for i in range(o.replicas)) or 1
        threads = max(1, (os.cpu_count() or 1) // n)
        settings = CpuEngineSettings.model_validate(
            {"num_threads": threads, "cache_dir": CPU_ENGINE_CACHE}
        )
        settings = _only(settings, o.cpu_engine_env, "cpu_engine_env")
        return TritonServer(
            SMOLLM2_REPOSITORY,
            TritonPorts.free(),
            env={**self._shared_env, **to_env(settings)},
            log_path=self.workdir / f"{rid}.triton.log",
        )

    async def stop(self) -> None:
        """Front to back: the gateways drain (every one at once; their streams still flow
        through the data plane's proxies, which stop after them), then the engines (which flush
        their last KV events to the registry while it still runs), then the registry.
        Supervision ends first: these exits are not failures."""
        await self.supervisor.close()
        plane = self.options.data_plane
        gateway = self.services.get("gateway")
        await asyncio.gather(
            *([] if gateway is None else [gateway.stop()]),
            *([] if plane is None else [plane.stop_gateways()]),
        )
        if plane is not None:
            await plane.stop_proxies()
        autoscaler = self.services.get("autoscaler")
        if autoscaler is not None:
            await autoscaler.stop()
        await asyncio.gather(*(svc.stop() for svc in self.orchestrators))
        # Every one (`stop` is idempotent): one whose restart a signal cut, or that died
        # unsupervised, still has its log, watchdog and shared memory to release.
        await asyncio.gather(*(t.stop() for t in self.tritons), return_exceptions=True)
        kv = self.services.get("kv_registry")
        if kv is not None:
            await kv.stop()
        if self.redis is not None:
            self.redis.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def endpoints(self) -> dict[str, str]:
        out = {f"{name} gRPC": svc.address for name, svc in self.services.items()}
        out.update(
            {
                f"{name} HTTP (OpenAI API)": f"{svc.http_base_url}/v1"
                for name, svc in self.services.items()
                if svc.http_port
            }
        )
        out.update(
            {
                f"{name} metrics": f"http://127.0.0.1:{svc.metrics_port}/metrics"
                for name, svc in self.services.items()
            }
        )
        for rid, t in zip(self.replica_ids, self.tritons, strict=True):
            out[f"{rid} Triton gRPC"] = t.grpc_address
            out[f"{rid} Triton metrics"] = t.metrics_url
        if self.redis is not None:
            out["redis (gateway resume store)"] = self.redis.url
        if self.options.data_plane is not None:
            out.update(self.options.data_plane.endpoints())
        return out


async def _run(args: argparse.Namespace) -> int:
    def port(component: Component, name: str = "grpc_port") -> int:
        return 0 if args.any_ports else default_port(component, name)

    data_plane = None
    if args.mesh == "envoy":
        # Imported here: it renders the overlay with kubectl, which only this mode needs.
        from llmmesh.envoymesh.plane import EnvoyDataPlane, EnvoyOptions
        from llmmesh.envoymesh.translate import Unsupported

        try:
            data_plane = EnvoyDataPlane(
                EnvoyOptions(ingress_port=0 if args.any_ports else args.ingress_port),
                datetime.datetime.now(datetime.UTC),
            )
        except Unsupported as exc:
            print(f"the local Envoy mesh cannot rehearse the manifests: {exc}", file=sys.stderr)
            return 2
    mesh = LocalMesh(
        MeshOptions(
            replicas=args.replicas,
            time_scale=args.time_scale,
            engine=args.engine,
            workdir=Path(args.workdir),
            gateway_port=port(GATEWAY),
            gateway_http_port=port(GATEWAY, "http_port"),
            orchestrator_port=port(ORCHESTRATOR),
            orchestrators=args.orchestrators,
            kv_registry_port=port(KV_REGISTRY),
            autoscaler_port=port(AUTOSCALER),
            log_json=False,
            redis=args.redis,
            data_plane=data_plane,
            extra_env=data_plane.mesh_gateway_env() if data_plane else {},
        )
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    starting = asyncio.ensure_future(mesh.start())

    received: list[int] = []

    def on_signal(sig: signal.Signals) -> None:
        mesh.supervisor.halt()  # the children may see Ctrl-C too: their exits are no crashes
        received.append(sig)
        stop.set()
        starting.cancel()  # a start in progress (replicas load for minutes) ends now

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        try:
            await starting
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not stop.is_set() or (task is not None and task.cancelling()):
                raise
            print("stopping (interrupted while starting)...", flush=True)
            return 128 + received[0]  # as a shell reports a process its signal ended
        width = max(len(k) for k in mesh.endpoints())
        print(f"llmmesh local mesh is up ({args.replicas} x {args.engine} replicas):")
        for k, v in mesh.endpoints().items():
            print(f"  {k:<{width}}  {v}")
        print(
            f"logs in {mesh.workdir}; try: make generate PROMPT='Hello'   (Ctrl-C stops)",
            flush=True,
        )
        await stop.wait()
        print("stopping...", flush=True)
    finally:
        with contextlib.suppress(Exception):
            await mesh.stop()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="Run the llmmesh local mesh in the foreground.")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument(
        "--orchestrators",
        type=int,
        default=2,
        help="Orchestrators run active-active (no single point of failure in the request path).",
    )
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="Emulator cost-model time scale."
    )
    parser.add_argument("--workdir", default=str(ROOT / ".build" / "run"))
    parser.add_argument(
        "--engine",
        choices=sorted(ENGINE_REPOSITORIES),
        default="smollm2",
        help="What the Triton replicas serve: SmolLM2-135M-Instruct on CPU, or the emulator.",
    )
    parser.add_argument(
        "--redis",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Keep the gateway's idempotency/resume store in a supervised redis-server child.",
    )
    parser.add_argument(
        "--mesh",
        choices=["none", "envoy"],
        default="none",
        help="envoy: Envoy where Istio puts it, configured from the dev overlay (mesh/README.md).",
    )
    parser.add_argument(
        "--ingress-port", type=int, default=8081, help="The ingress Envoy's port (--mesh envoy)."
    )
    parser.add_argument(
        "--any-ports",
        action="store_true",
        help="Bind every service to a free port instead of the default ports.",
    )
    args = parser.parse_args()
    # The supervisor's restarts and crash loops, on stderr.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import uvloop

    return uvloop.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
