"""The local mesh on real processes: kv_registry, N Triton replicas (the engine emulator or
SmolLM2-135M-Instruct on CPU, chosen per pool: `MeshOptions.engine`, `pool_engines`), orchestrator,
gateway and autoscaler. Used by `make run` and by the integration tests.

Services bind the ports they are given (0 = any free port) and report the bound ports through a
ready file; Triton replicas get free ports picked just before launch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from llmmesh.triton.launcher import TritonPorts, TritonServer, start_on_free_ports

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


class ServiceProcess:
    """A `python -m services.<name>` child process reporting its ports through a ready file.

    Its HTTP port (the gateway's OpenAI API) is any free one unless the environment given here
    names one (`LLMMESH_<NAME>_HTTP_PORT`); services without one ignore the setting."""

    def __init__(self, name: str, env: Mapping[str, str], workdir: Path):
        self.name = name
        self._env = env
        self._ready_file = workdir / f"{name}.ready.json"
        self._log_path = workdir / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.grpc_port = 0
        self.metrics_port = 0
        self.http_port = 0  # 0: the service serves no HTTP API

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def log_path(self) -> Path:
        return self._log_path

    async def start(self, timeout_s: float = 60.0) -> None:
        self._ready_file.unlink(missing_ok=True)
        prefix = f"LLMMESH_{self.name.upper()}_"
        env = {
            **os.environ,
            f"{prefix}HTTP_PORT": "0",
            **self._env,
            f"{prefix}READY_FILE": str(self._ready_file),
        }
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        log = self._log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", f"services.{self.name}", env=env, stdout=log, stderr=log, cwd=ROOT
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while not self._ready_file.exists():
            if self.proc.returncode is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready after {timeout_s}s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)  # polling a file the child writes once it serves
        ports = json.loads(self._ready_file.read_text())
        self.grpc_port, self.metrics_port = int(ports["grpc_port"]), int(ports["metrics_port"])
        self.http_port = int(ports.get("http_port", 0))

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
    model_version: str = "v1"
    min_replicas: int = 0
    max_replicas: int = 2
    # Started by the actuator at its first evaluation, before the policy decides.
    initial_replicas: int = 0
    model_repository: Path = EMULATOR_REPOSITORY
    models: tuple[str, ...] = ("tensorrt_llm",)
    activation_timeout_s: float = 60.0
    # The autoscaler's policy for the pool (services.autoscaler.policy.PolicyConfig fields);
    # min/max replicas above override its bounds.
    policy: Mapping[str, object] = field(default_factory=dict)


@dataclass
class MeshOptions:
    replicas: int = 2
    time_scale: float = 1.0
    tokenizer_path: Path = DEFAULT_TOKENIZER
    workdir: Path | None = None
    # Service ports: 0 = any free port (tests); `make run` uses the services' defaults.
    gateway_port: int = 0
    gateway_http_port: int = 0
    orchestrator_port: int = 0
    kv_registry_port: int = 0
    autoscaler_port: int = 0
    log_json: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)
    emulator_env: dict[str, str] = field(default_factory=dict)
    # Pool of each replica (index i -> replica-i) in the orchestrator's replica list; every
    # replica is in the orchestrator's default pool when unset.
    replica_pools: list[str] | None = None
    # Extra environment for the orchestrator only (e.g. LLMMESH_ORCHESTRATOR_PROFILE).
    orchestrator_env: dict[str, str] = field(default_factory=dict)
    # The gateway's context length for the model (prompt + completion tokens).
    context_length: int = 8192
    # Pools run by the autoscaler's local actuator, besides the `replicas` static ones.
    autoscaled_pools: list[AutoscaledPool] = field(default_factory=list)
    # Engine of the static replicas, and overrides per pool (pool name -> engine; the pools are
    # those named in `replica_pools`).
    engine: EngineName = "emulator"
    pool_engines: dict[str, EngineName] = field(default_factory=dict)
    # Extra environment for real-model replicas only (LLMMESH_CPU_ENGINE_*).
    cpu_engine_env: dict[str, str] = field(default_factory=dict)


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

    def _common_env(self) -> dict[str, str]:
        return {
            "LLMMESH_KV_BLOCK_SIZE": os.environ.get("LLMMESH_KV_BLOCK_SIZE", "32"),
            **{
                f"LLMMESH_{s}_LOG_JSON": str(self.options.log_json).lower()
                for s in ("GATEWAY", "ORCHESTRATOR", "KV_REGISTRY", "AUTOSCALER")
            },
            **{
                f"LLMMESH_{s}_DRAIN_SECONDS": "10"
                for s in ("GATEWAY", "ORCHESTRATOR", "KV_REGISTRY", "AUTOSCALER")
            },
            **self.options.extra_env,
        }

    async def start(self) -> None:
        o = self.options
        common = self._common_env()
        kv = ServiceProcess(
            "kv_registry",
            {
                **common,
                "LLMMESH_KV_REGISTRY_GRPC_PORT": str(o.kv_registry_port),
                "LLMMESH_KV_REGISTRY_METRICS_PORT": "0",
            },
            self.workdir,
        )
        self.services["kv_registry"] = kv
        await kv.start()
        await asyncio.gather(*(self.add_replica() for _ in range(o.replicas)))
        orch = ServiceProcess(
            "orchestrator",
            {
                **common,
                "LLMMESH_ORCHESTRATOR_GRPC_PORT": str(o.orchestrator_port),
                "LLMMESH_ORCHESTRATOR_METRICS_PORT": "0",
                "LLMMESH_ORCHESTRATOR_HEALTH_INTERVAL_S": "0.25",
                "LLMMESH_ORCHESTRATOR_METRICS_INTERVAL_S": "0.25",
                "LLMMESH_ORCHESTRATOR_KV_REGISTRY_ADDRESS": self.services["kv_registry"].address,
                "LLMMESH_ORCHESTRATOR_REPLICAS": json.dumps(
                    [
                        {
                            "id": rid,
                            "grpc_address": t.grpc_address,
                            "metrics_url": t.metrics_url,
                            **self._replica_pool(i),
                        }
                        for i, (rid, t) in enumerate(
                            zip(self.replica_ids, self.tritons, strict=True)
                        )
                    ]
                ),
                **self._scale_from_zero_env(),
                **o.orchestrator_env,
            },
            self.workdir,
        )
        self.services["orchestrator"] = orch
        await orch.start()
        gw = ServiceProcess(
            "gateway",
            {
                **common,
                "LLMMESH_GATEWAY_GRPC_PORT": str(o.gateway_port),
                "LLMMESH_GATEWAY_HTTP_PORT": str(o.gateway_http_port),
                "LLMMESH_GATEWAY_METRICS_PORT": "0",
                "LLMMESH_GATEWAY_ORCHESTRATOR_ADDRESS": orch.address,
                "LLMMESH_GATEWAY_MODELS": json.dumps(
                    [
                        {
                            "name": MODEL_NAME,
                            "tokenizer_path": str(o.tokenizer_path),
                            "context_length": o.context_length,
                        }
                    ]
                ),
            },
            self.workdir,
        )
        self.services["gateway"] = gw
        await gw.start()  # first: the autoscaler reads the gateway's TTFT/ITL and token rates
        asc = ServiceProcess(
            "autoscaler",
            {
                **common,
                "LLMMESH_AUTOSCALER_GRPC_PORT": str(o.autoscaler_port),
                "LLMMESH_AUTOSCALER_METRICS_PORT": "0",
                "LLMMESH_AUTOSCALER_INTERVAL_S": "1",
                "LLMMESH_AUTOSCALER_ORCHESTRATOR_METRICS_URL": (
                    f"http://127.0.0.1:{orch.metrics_port}/metrics"
                ),
                "LLMMESH_AUTOSCALER_GATEWAY_METRICS_URL": (
                    f"http://127.0.0.1:{gw.metrics_port}/metrics"
                ),
                "LLMMESH_AUTOSCALER_TARGETS": json.dumps(
                    [
                        {"replica_id": rid, "metrics_url": t.metrics_url, **self._replica_pool(i)}
                        for i, (rid, t) in enumerate(
                            zip(self.replica_ids, self.tritons, strict=True)
                        )
                    ]
                ),
                **self._local_actuator_env(),
            },
            self.workdir,
        )
        self.services["autoscaler"] = asc
        await asc.start()

    def _scale_from_zero_env(self) -> dict[str, str]:
        """The orchestrator's policy file declaring the autoscaled pools scale-from-zero."""
        pools = self.options.autoscaled_pools
        if not pools:
            return {}
        if "LLMMESH_ORCHESTRATOR_POLICY_FILE" in self.options.orchestrator_env:
            raise ValueError("autoscaled_pools writes the orchestrator's policy file itself")
        from services.orchestrator.policy import Policy, ScaleFromZeroPolicy

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
        return {"LLMMESH_ORCHESTRATOR_POLICY_FILE": str(path)}

    def _local_actuator_env(self) -> dict[str, str]:
        """The autoscaler runs the local actuator over the autoscaled pools."""
        pools = self.options.autoscaled_pools
        if not pools:
            return {}
        from services.autoscaler.actuators.local import LocalActuatorSettings, ManagedPool

        orch = self.services["orchestrator"]
        actuator = LocalActuatorSettings(
            orchestrator_address=orch.address,
            kv_registry_address=self.services["kv_registry"].address,
            engine_env={
                **self._common_env(),
                "LLMMESH_EMULATOR_TIME_SCALE": str(self.options.time_scale),
                **self.options.emulator_env,
            },
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
        return {
            "LLMMESH_AUTOSCALER_LOCAL_ACTUATOR": actuator.model_dump_json(),
            "LLMMESH_AUTOSCALER_POOLS": json.dumps(
                [
                    {
                        "pool": p.pool,
                        "model_version": p.model_version,
                        # The gateway labels its latency and token metrics with the served name.
                        "model": MODEL_NAME,
                        "policy": {
                            **p.policy,
                            "min_replicas": p.min_replicas,
                            "max_replicas": p.max_replicas,
                        },
                    }
                    for p in pools
                ]
            ),
            "LLMMESH_AUTOSCALER_ORCHESTRATOR_METRICS_URL": (
                f"http://127.0.0.1:{orch.metrics_port}/metrics"
            ),
        }

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
        return await start_on_free_ports(fresh, ready_timeout_s=timeout)

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
        kv = self.services["kv_registry"]
        return TritonServer(
            EMULATOR_REPOSITORY,
            TritonPorts.free(),
            env={
                **self._common_env(),
                "LLMMESH_EMULATOR_REPLICA_ID": rid,
                "LLMMESH_EMULATOR_KV_REGISTRY_ADDRESS": kv.address,
                "LLMMESH_EMULATOR_TIME_SCALE": str(self.options.time_scale),
                **self.options.emulator_env,
            },
            log_path=self.workdir / f"{rid}.triton.log",
        )

    def _cpu_engine_triton(self, rid: str) -> TritonServer:
        """A replica serving SmolLM2 on CPU. It publishes no KV events (no prefix cache), so it
        gets no kv_registry address. torch threads are split between the real-model replicas,
        and the dequantized weights are cached under .build/ (the first start writes them),
        unless `cpu_engine_env` says otherwise."""
        o = self.options
        n = sum(self.replica_engine(i) == "smollm2" for i in range(o.replicas)) or 1
        threads = max(1, (os.cpu_count() or 1) // n)
        return TritonServer(
            SMOLLM2_REPOSITORY,
            TritonPorts.free(),
            env={
                **self._common_env(),
                "LLMMESH_CPU_ENGINE_NUM_THREADS": str(threads),
                "LLMMESH_CPU_ENGINE_CACHE_DIR": str(CPU_ENGINE_CACHE),
                **o.cpu_engine_env,
            },
            log_path=self.workdir / f"{rid}.triton.log",
        )

    async def stop(self) -> None:
        """Front to back: no new requests, then engines (which flush their last KV events to
        the registry while it still runs), then the registry."""
        for name in ("gateway", "autoscaler", "orchestrator"):
            svc = self.services.get(name)
            if svc is not None:
                await svc.stop()
        await asyncio.gather(
            *(t.stop() for t in self.tritons if t.is_running), return_exceptions=True
        )
        kv = self.services.get("kv_registry")
        if kv is not None:
            await kv.stop()
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
        return out


async def _run(args: argparse.Namespace) -> int:
    mesh = LocalMesh(
        MeshOptions(
            replicas=args.replicas,
            time_scale=args.time_scale,
            engine=args.engine,
            workdir=Path(args.workdir),
            gateway_port=50051,
            gateway_http_port=8080,
            orchestrator_port=50052,
            kv_registry_port=50053,
            autoscaler_port=50054,
            log_json=False,
        )
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await mesh.start()
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
        "--time-scale", type=float, default=1.0, help="Emulator cost-model time scale."
    )
    parser.add_argument("--workdir", default=str(ROOT / ".build" / "run"))
    parser.add_argument(
        "--engine",
        choices=sorted(ENGINE_REPOSITORIES),
        default="smollm2",
        help="What the Triton replicas serve: SmolLM2-135M-Instruct on CPU, or the emulator.",
    )
    args = parser.parse_args()
    import uvloop

    return uvloop.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
