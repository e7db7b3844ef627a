"""The local mesh on real processes: kv_registry, N Triton replicas (emulator), orchestrator,
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

from llmmesh.netutil import free_port
from llmmesh.triton.launcher import TritonPorts, TritonServer, TritonStartError

ROOT = Path(__file__).resolve().parents[1]
EMULATOR_REPOSITORY = ROOT / "model_repository" / "emulator"
DEFAULT_TOKENIZER = ROOT / ".build" / "models" / "smollm2-135m-instruct" / "tokenizer.json"
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
        asc = ServiceProcess(
            "autoscaler",
            {
                **common,
                "LLMMESH_AUTOSCALER_GRPC_PORT": str(o.autoscaler_port),
                "LLMMESH_AUTOSCALER_METRICS_PORT": "0",
                "LLMMESH_AUTOSCALER_INTERVAL_S": "1",
                "LLMMESH_AUTOSCALER_TARGETS": json.dumps(
                    [
                        {"replica_id": rid, "metrics_url": t.metrics_url}
                        for rid, t in zip(self.replica_ids, self.tritons, strict=True)
                    ]
                ),
            },
            self.workdir,
        )
        self.services["gateway"] = gw
        self.services["autoscaler"] = asc
        await asyncio.gather(gw.start(), asc.start())

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
        self.tritons.append(self._triton(rid))
        for attempt in range(3):
            try:
                await self.tritons[index].start()
                return self.tritons[index]
            except TritonStartError:
                # A free port picked before launch can be taken by another process before
                # Triton binds it: retry with new ports.
                if attempt == 2:
                    raise
                self.tritons[index] = self._triton(rid)
        raise AssertionError("unreachable")

    def _triton(self, rid: str) -> TritonServer:
        kv = self.services["kv_registry"]
        return TritonServer(
            EMULATOR_REPOSITORY,
            TritonPorts(grpc=free_port(), http=free_port(), metrics=free_port()),
            env={
                **self._common_env(),
                "LLMMESH_EMULATOR_REPLICA_ID": rid,
                "LLMMESH_EMULATOR_KV_REGISTRY_ADDRESS": kv.address,
                "LLMMESH_EMULATOR_TIME_SCALE": str(self.options.time_scale),
                **self.options.emulator_env,
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
        print("llmmesh local mesh is up:")
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
    args = parser.parse_args()
    import uvloop

    return uvloop.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
