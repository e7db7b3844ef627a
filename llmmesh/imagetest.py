"""`make image-test`: prove the llmmesh image works, from the image itself.

The four services run from the image (`buildah run --isolation chroot --network host`, as root
on the host; `podman run` is refused by this sandbox's rlimits) against emulator Triton replicas
started on the host by the project's launcher (`llmmesh.triton.launcher`). The gateway's
tokenizer is bind-mounted read-only where the Deployments mount the model repository's
(`/models/tokenizer/tokenizer.json`, mesh/base/config/gateway.env). Checks, each reported ok or
FAILED:
- the image: size (uncompressed, and gzip-compressed as a registry stores it), OCI labels
  (source, version = the package version, revision), its user (10001, as the Deployments'
  securityContext), no pip / setuptools / build tools / torch / pytriton / compiler inside;
- every service: started from the image, running as uid 10001, gRPC health SERVING, /metrics
  serving its `llmmesh_<service>_` series, and a graceful exit (status 0) on SIGTERM;
- a generation streamed through the gateway's gRPC API (Generate) and its OpenAI API
  (/v1/chat/completions, stream=true), its /health and /ready, and the autoscaler evaluating
  the replicas.
Exits 1 when a check fails. Needs root (buildah), the image built (`make image`) and the venv
(`make setup`: tritonserver, the tokenizer).

A launcher, like llmmesh.localmesh: it imports the services' settings classes (the environment
of each service comes from its settings object, `to_env`), and nothing imports it. Children die
with this process (`tied_to_parent` on each `buildah run`; its process group is killed on the
way out). Only a SIGKILL of this process can leave the in-container service behind (buildah's
chroot runtime does not pass the parent's death on): its process group is the `buildah run`
pid printed in the log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmmesh.common.components import AUTOSCALER, GATEWAY, KV_REGISTRY, ORCHESTRATOR, Component
from llmmesh.common.process import tied_to_parent
from llmmesh.common.settings import ServiceSettings, to_env
from llmmesh.emulator.settings import EmulatorSettings
from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.gateway.v1 import gateway_pb2_grpc as pb_grpc
from llmmesh.tools.imagetag import IMAGE_REPO, package_version
from llmmesh.triton.launcher import TritonPorts, TritonServer, start_on_free_ports
from services.autoscaler.settings import AutoscalerSettings, ScrapeTarget
from services.gateway.settings import GatewaySettings, ModelSettings
from services.kv_registry.settings import KvRegistrySettings
from services.orchestrator.settings import OrchestratorSettings, ReplicaSpec

ROOT = Path(__file__).resolve().parents[1]
EMULATOR_REPOSITORY = ROOT / "model_repository" / "emulator"
WORKDIR = ROOT / ".build" / "image-test"  # logs and ready files, replaced each run
TOKENIZER_DIR = ROOT / ".build" / "models" / "smollm2-135m-instruct"
MODEL_NAME = "smollm2-135m-instruct"
#: The user the image runs as, as the Deployments' securityContext names it.
IMAGE_UID = 10001
#: Where the services see the host's work directory (ready files) and the tokenizer.
RUN_DIR = "/run/llmmesh"
MODELS_DIR = "/models/tokenizer"
#: What the final stage must not contain (modules, and programs on PATH).
FORBIDDEN_MODULES = (
    "pip",
    "setuptools",
    "wheel",
    "grpc_tools",
    "torch",
    "pytriton",
    "transformers",
)
FORBIDDEN_PROGRAMS = ("gcc", "cc", "c++", "g++", "make", "pip", "pip3")
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0


@dataclass
class Report:
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((name, ok, detail))
        print(
            f"  {'ok    ' if ok else 'FAILED'}  {name}{f': {detail}' if detail else ''}", flush=True
        )
        return ok

    @property
    def failed(self) -> list[str]:
        return [name for name, ok, _ in self.checks if not ok]


def buildah(*args: str, timeout_s: float = 120.0) -> str:
    """`buildah <args>`'s stdout; raises with its stderr on failure."""
    done = subprocess.run(
        ["buildah", *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def compressed_size(image: str) -> int:
    """Bytes a registry stores for `image`: its gzip-compressed layers and config."""
    with tempfile.TemporaryDirectory(prefix="llmmesh-image-") as tmp:
        buildah("push", "--quiet", image, f"oci:{tmp}/oci", timeout_s=300)
        index = json.loads(Path(tmp, "oci", "index.json").read_text())
        digest = index["manifests"][0]["digest"].split(":", 1)[1]
        manifest = json.loads(Path(tmp, "oci", "blobs", "sha256", digest).read_text())
        return int(manifest["config"]["size"]) + sum(int(x["size"]) for x in manifest["layers"])


def check_image(report: Report, image: str, container: str) -> None:
    info = json.loads(buildah("inspect", "--type", "image", image))
    config = info["OCIv1"]["config"]
    labels: dict[str, str] = config.get("Labels") or {}
    size = json.loads(buildah("images", "--json", image))[0]["size"]
    report.check(
        "image size", True, f"{size} uncompressed, {compressed_size(image) / 1e6:.0f} MB compressed"
    )
    version = package_version()
    for key, want in (
        ("org.opencontainers.image.source", None),
        ("org.opencontainers.image.version", version),
        ("org.opencontainers.image.revision", None),
    ):
        value = labels.get(key, "")
        ok = bool(value) and value != "unknown" and (want is None or value == want)
        report.check(f"label {key}", ok, value or "missing")
    report.check(
        "image user", config.get("User") == f"{IMAGE_UID}:{IMAGE_UID}", str(config.get("User"))
    )
    probe = (
        "import importlib.metadata as m, importlib.util as u, json, os, shutil, sys; "
        "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'python': sys.version.split()[0], "
        "'version': m.version('llmmesh'), "
        f"'modules': [x for x in {list(FORBIDDEN_MODULES)!r} if u.find_spec(x)], "
        f"'programs': [x for x in {list(FORBIDDEN_PROGRAMS)!r} if shutil.which(x)], "
        "'caches': [p for p in ('/root/.cache', '/tmp/pip', '/src', '/opt/build') if os.path.exists(p)]}))"
    )
    found = json.loads(
        buildah("run", "--isolation", "chroot", container, "--", "python", "-c", probe)
    )
    report.check(
        "runs as non-root",
        found["uid"] == IMAGE_UID and found["gid"] == IMAGE_UID,
        f"uid {found['uid']} gid {found['gid']}",
    )
    report.check(
        "llmmesh version in the image",
        found["version"] == version,
        f"{found['version']} (python {found['python']})",
    )
    report.check(
        "no build tools, torch or pytriton",
        not (found["modules"] or found["programs"] or found["caches"]),
        ", ".join(found["modules"] + found["programs"] + found["caches"]) or "none",
    )


class ImageService:
    """One service run from the image: `buildah run ... -- python -m services.<name>` with the
    environment of its settings object; bound ports come back through a ready file in the
    bind-mounted work directory."""

    def __init__(
        self,
        component: Component,
        settings: ServiceSettings,
        container: str,
        workdir: Path,
        volumes: Sequence[str] = (),
    ):
        self.component = component
        self.name = component.name
        self._ready = workdir / f"{self.name}.ready.json"
        self.settings = settings.model_copy(update={"ready_file": Path(RUN_DIR) / self._ready.name})
        self._container = container
        self._workdir = workdir
        self._volumes = volumes
        self.log_path = workdir / f"{self.name}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.grpc_port = self.metrics_port = self.http_port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        env = [arg for k, v in to_env(self.settings).items() for arg in ("-e", f"{k}={v}")]
        vols = [arg for v in (f"{self._workdir}:{RUN_DIR}", *self._volumes) for arg in ("-v", v)]
        return [
            "buildah", "run", "--isolation", "chroot", "--network", "host", *vols, *env,
            self._container, "--", "python", "-m", self.component.module,
        ]  # fmt: skip

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *tied_to_parent(self.command()),
                stdout=log,
                stderr=log,
                start_new_session=True,  # its process group: buildah, its runtime, the service
            )
        print(f"  started {self.name} (buildah run pid/process group {self.proc.pid})", flush=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._ready.exists():
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not become ready:\n{self.log_tail()}")
            await asyncio.sleep(0.1)  # polling the file the service writes once it serves
        ports = json.loads(self._ready.read_text())
        self.grpc_port, self.metrics_port = int(ports["grpc_port"]), int(ports["metrics_port"])
        self.http_port = int(ports.get("http_port", 0))

    def _group(self) -> Iterator[tuple[int, list[str]]]:
        """(pid, argv) of the processes in this service's process group."""
        if self.proc is None:
            return
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                pgid = int(stat.rsplit(")", 1)[1].split()[2])
                if pgid == self.proc.pid:
                    argv = (entry / "cmdline").read_bytes().split(b"\0")
                    yield int(entry.name), [a.decode(errors="replace") for a in argv if a]

    def service_pid(self) -> int | None:
        """The service's Python process inside the container (not buildah's helpers)."""
        for pid, argv in self._group():
            if argv and Path(argv[0]).name.startswith("python") and self.component.module in argv:
                return pid
        return None

    def service_uid(self) -> int | None:
        pid = self.service_pid()
        if pid is None:
            return None
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
        return None

    async def stop(self) -> int | None:
        """SIGTERM to the service itself (its drain), then buildah's exit status."""
        if self.proc is None or self.proc.returncode is not None:
            return None if self.proc is None else self.proc.returncode
        pid = self.service_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            self.kill()
            return await self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


async def health(address: str) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def http_get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        return resp.status, await resp.text()


async def check_service(
    report: Report, session: aiohttp.ClientSession, svc: ImageService, prefix: str
) -> None:
    uid = svc.service_uid()
    report.check(
        f"{svc.name}: runs from the image as uid {IMAGE_UID}", uid == IMAGE_UID, f"uid {uid}"
    )
    try:
        status = await health(svc.address)
    except grpc.aio.AioRpcError as e:
        status = f"{e.code().name}: {e.details()}"
    report.check(f"{svc.name}: gRPC health", status == "SERVING", status)
    code, text = await http_get(session, svc.metrics_url)
    series = sum(line.startswith(prefix) for line in text.splitlines())
    report.check(
        f"{svc.name}: /metrics",
        code == 200 and series > 0,
        f"HTTP {code}, {series} {prefix}* samples",
    )


async def generate_grpc(report: Report, gateway: ImageService) -> None:
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.GatewayServiceStub(channel)
        models = (await stub.ListModels(pb.ListModelsRequest(), timeout=10)).models
        report.check(
            "gateway gRPC: ListModels",
            [m.name for m in models] == [MODEL_NAME],
            ", ".join(f"{m.name} (chat {m.supports_chat})" for m in models),
        )
        request = pb.GenerateRequest(
            model=MODEL_NAME,
            text="The capital of France is",
            sampling=pb.SamplingParams(max_tokens=16, seed=1),
        )
        deltas, text, complete = 0, "", None
        started = time.perf_counter()
        ttft = 0.0
        async for msg in stub.Generate(request, timeout=60):
            if msg.HasField("delta"):
                deltas += bool(msg.delta.token_ids)  # the last may bring only the finish
                ttft = ttft or time.perf_counter() - started
                text += msg.delta.text
            elif msg.HasField("complete"):
                complete = msg.complete
        ok = deltas >= 2 and complete is not None and complete.usage.completion_tokens > 0
        detail = f"{deltas} deltas, TTFT {ttft * 1e3:.0f} ms"
        if complete is not None:
            detail += (
                f", {complete.usage.completion_tokens} tokens, finish "
                f"{pb.FinishReason.Name(complete.finish_reason)}, replica {complete.replica_id}"
            )
        report.check("gateway gRPC: Generate streams", ok, detail)


async def generate_openai(
    report: Report, session: aiohttp.ClientSession, gateway: ImageService
) -> None:
    base = f"http://127.0.0.1:{gateway.http_port}"
    for route in ("/health", "/ready", "/v1/models"):
        code, _ = await http_get(session, base + route)
        report.check(f"gateway HTTP: GET {route}", code == 200, f"HTTP {code}")
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16,
        "stream": True,
        "seed": 1,
    }
    chunks, done, content = 0, False, ""
    async with session.post(
        f"{base}/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=60)
    ) as resp:
        status, ctype = resp.status, resp.headers.get("Content-Type", "")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                done = True
                continue
            chunks += 1
            for choice in json.loads(data).get("choices", []):
                content += (choice.get("delta") or {}).get("content") or ""
    report.check(
        "gateway OpenAI: /v1/chat/completions streams (SSE)",
        status == 200 and "text/event-stream" in ctype and chunks >= 2 and done,
        f"HTTP {status}, {chunks} chunks, [DONE] {done}, {len(content)} characters",
    )


async def check_autoscaler(
    report: Report, session: aiohttp.ClientSession, svc: ImageService, replicas: int
) -> None:
    """The autoscaler scraped the orchestrator and the replicas: it reports their count."""
    deadline, value = time.monotonic() + 15, None
    while time.monotonic() < deadline:
        _, text = await http_get(session, svc.metrics_url)
        for line in text.splitlines():
            if line.startswith("llmmesh_autoscaler_current_replicas{"):
                value = float(line.rsplit(" ", 1)[1])
        if value == replicas:
            break
        await asyncio.sleep(0.5)
    report.check(
        "autoscaler: evaluates the replicas",
        value == replicas,
        f"llmmesh_autoscaler_current_replicas {value}, expected {replicas}",
    )


async def run(args: argparse.Namespace) -> int:
    report = Report()
    tokenizer = Path(args.tokenizer_dir)
    if not (tokenizer / "tokenizer.json").exists():
        print(f"{tokenizer}/tokenizer.json is missing: run `make setup` first", file=sys.stderr)
        return 2
    started = time.monotonic()
    print(f"image-test {args.image}")
    container = buildah("from", "--pull-never", "--quiet", args.image).strip()
    workdir = WORKDIR
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    workdir.chmod(0o777)  # the services (uid 10001) write their ready files here
    services: list[ImageService] = []
    tritons: list[TritonServer] = []

    def service(
        component: Component, settings: ServiceSettings, volumes: Sequence[str] = ()
    ) -> ImageService:
        svc = ImageService(component, settings, container, workdir, volumes)
        services.append(svc)
        return svc

    try:
        check_image(report, args.image, container)
        kv = service(KV_REGISTRY, KvRegistrySettings(grpc_port=0, metrics_port=0))
        await kv.start()

        def triton(rid: str) -> TritonServer:
            settings = EmulatorSettings(replica_id=rid, kv_registry_address=kv.address)
            return TritonServer(
                EMULATOR_REPOSITORY,
                TritonPorts.free(),
                env=to_env(settings),
                log_path=workdir / f"{rid}.triton.log",
            )

        ids = [f"replica-{i}" for i in range(args.replicas)]
        tritons.extend(
            await asyncio.gather(
                *(start_on_free_ports(functools.partial(triton, rid)) for rid in ids)
            )
        )
        print(f"  started {len(tritons)} emulator Triton replicas on the host", flush=True)
        orch = service(
            ORCHESTRATOR,
            OrchestratorSettings(
                grpc_port=0,
                metrics_port=0,
                kv_registry_address=kv.address,
                health_interval_s=0.25,
                metrics_interval_s=0.25,
                replicas=[
                    ReplicaSpec(id=rid, grpc_address=t.grpc_address, metrics_url=t.metrics_url)
                    for rid, t in zip(ids, tritons, strict=True)
                ],
            ),
        )
        await orch.start()
        gw = service(
            GATEWAY,
            GatewaySettings(
                grpc_port=0,
                http_port=0,
                metrics_port=0,
                orchestrator_address=orch.address,
                models=[
                    ModelSettings(
                        name=MODEL_NAME, tokenizer_path=Path(MODELS_DIR, "tokenizer.json")
                    )
                ],
            ),
            volumes=[f"{tokenizer}:{MODELS_DIR}:ro"],
        )
        await gw.start()
        asc = service(
            AUTOSCALER,
            AutoscalerSettings(
                grpc_port=0,
                metrics_port=0,
                interval_s=1.0,
                orchestrator_metrics_urls=[orch.metrics_url],
                gateway_metrics_url=gw.metrics_url,
                targets=[
                    ScrapeTarget(replica_id=rid, metrics_url=t.metrics_url)
                    for rid, t in zip(ids, tritons, strict=True)
                ],
            ),
        )
        await asc.start()
        await wait_routable(orch)
        async with aiohttp.ClientSession() as session:
            for svc in services:
                await check_service(report, session, svc, f"llmmesh_{svc.name}_")
            await generate_grpc(report, gw)
            await generate_openai(report, session, gw)
            await check_autoscaler(report, session, asc, args.replicas)
            _, text = await http_get(session, gw.metrics_url)
            ok = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("llmmesh_gateway_requests_total{")
                and 'outcome="success"' in line
            )
            report.check("gateway: requests counted as success", ok >= 2, f"{ok:.0f}")
        for svc in reversed(services):
            rc = await svc.stop()
            report.check(f"{svc.name}: graceful exit on SIGTERM", rc == 0, f"status {rc}")
    except Exception as e:  # a failed start or check: reported, and the logs' tails shown
        report.check("run", False, f"{type(e).__name__}: {e}")
        for svc in services:
            print(f"--- {svc.name} log tail ---\n{svc.log_tail()}", file=sys.stderr)
    finally:
        for svc in services:
            svc.kill()
        await asyncio.gather(*(t.stop() for t in tritons if t.is_running), return_exceptions=True)
        with contextlib.suppress(RuntimeError):
            buildah("rm", container)
    failed = report.failed
    print(
        f"image-test: {len(report.checks) - len(failed)}/{len(report.checks)} checks ok in "
        f"{time.monotonic() - started:.0f} s; logs in {workdir}"
    )
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


async def wait_routable(orch: ImageService, timeout_s: float = 30.0) -> None:
    """Until the orchestrator reports every replica healthy (its probes run every 0.25 s)."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            _, text = await http_get(session, orch.metrics_url)
            healthy = [
                line
                for line in text.splitlines()
                if line.startswith("llmmesh_orchestrator_replica_healthy{")
            ]
            if healthy and all(line.endswith(" 1.0") for line in healthy):
                return
            await asyncio.sleep(0.25)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmmesh.imagetest", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--image", default=f"{IMAGE_REPO}:{package_version()}")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--tokenizer-dir", default=str(TOKENIZER_DIR))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("image-test runs buildah as root (--isolation chroot)", file=sys.stderr)
        return 2
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
