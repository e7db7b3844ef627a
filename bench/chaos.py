"""`make bench-chaos`: what 200 concurrent streams see when a component of the mesh fails.

One local emulator mesh (supervised, as `make run` runs it), a reference run without faults,
then one scenario at a time, each on the same workload: `--streams` closed-loop clients, each
sending `--rounds` greedy requests (temperature 0, a fixed seed per request; `--tokens` output
tokens on average, lengths spread over [0.5, 1.5] x so the clients drift apart), with the fault
injected once `--fault-at` of the run's tokens have arrived:

| scenario | fault |
|---|---|
| replica-kill | SIGKILL one tritonserver |
| stub-kill | SIGKILL one replica's Python-backend stub (tritonserver stays up) |
| orchestrator-kill | SIGKILL one orchestrator (of two where the mesh runs two) |
| orchestrators-down | SIGKILL every orchestrator, held down `--hold-s` before the supervisor may restart them |
| kv-registry-kill | SIGKILL kv_registry |
| replica-drain | SIGTERM one tritonserver (drain, exit, restart) |
| gateway-kill | SIGKILL the gateway; clients (keyed requests) resume through a second gateway sharing the Redis resume store, from the offset they got to |

Per scenario: requests completed / total; tokens lost and duplicated, each stream compared token
by token with the same request in the reference run (difflib opcodes: deleted and replaced
reference tokens are lost, inserted and replacing ones duplicated; the reference itself is
checked against `llmmesh.emulator.tokens.expected_output_ids`); failed requests by gRPC code; p99
TTFT (send to first token) and the longest stall (largest gap between two tokens of one stream,
across a resume too); time from the fault until the failed component is replaced and back in
rotation (a request through the gateway served by it: probes of 2 tokens, `complete.replica_id`
for a replica; a restarted process that serves, for a service); the share of the orchestrators'
leases (`llmmesh_orchestrator_decisions_total`) that went to the dead replica from 2 s after the
fault until it was healthy again (or the run ended). Only the gateway-kill scenario's client
retries (resumes); elsewhere a broken stream is a failed request.

A scenario whose prerequisite the code does not have yet says "skipped: <why>" (e.g. a second
gateway needs the Redis resume store and a redis-server binary). The mesh runs two orchestrators
where `MeshOptions` can (`orchestrators`); otherwise the orchestrator scenarios run against the
one, and say so.

Prints one table (scenario x metrics, targets met/missed), writes bench-results/chaos.json and a
PNG of tokens/s over time per scenario with the fault and the recovery marked. A smoke run:
`python -m bench.chaos --streams 20 --tokens 100 --scenarios replica-kill`.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.report import RESULTS_DIR, Check, eprint, format_table, percentile, write_json
from llmmesh.common import metric_names as names
from llmmesh.common.components import GATEWAY, KV_REGISTRY, ORCHESTRATOR
from llmmesh.emulator.settings import EmulatorSettings
from llmmesh.emulator.tokens import expected_output_ids
from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.gateway.v1 import gateway_pb2_grpc as pb_grpc
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as orch_pb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2_grpc as orch_grpc
from llmmesh.localmesh import MODEL_NAME, LocalMesh, MeshOptions, ServiceProcess
from llmmesh.redis_server import redis_binary

SCENARIOS = [
    "replica-kill",
    "stub-kill",
    "orchestrator-kill",
    "orchestrators-down",
    "kv-registry-kill",
    "replica-drain",
    "gateway-kill",
]
STUB = "triton_python_backend_stub"
# Targets (issue 11).
BACK_WITHIN_S = 10.0
DEAD_SHARE_MAX = 0.01
DEAD_SHARE_AFTER_S = 2.0
# Gateway-kill clients: resume attempts per request, pause between them.
MAX_RESUMES = 8
RESUME_PAUSE_S = 0.2


# ------------------------------------------------------------------------------ workload
@dataclass(frozen=True)
class Spec:
    """One request of the workload: the same in every run."""

    index: int
    client: int
    prompt: tuple[int, ...]
    max_tokens: int
    seed: int


def workload(streams: int, rounds: int, tokens: int, prompt_tokens: int, seed: int) -> list[Spec]:
    """`streams` x `rounds` requests, client-major; distinct prompts, lengths in [0.5, 1.5] x
    `tokens` (deterministic in `seed`)."""
    rng = random.Random(seed)
    out = []
    for client in range(streams):
        for r in range(rounds):
            i = client * rounds + r
            prompt = tuple(rng.randrange(100, 40000) for _ in range(prompt_tokens))
            n = max(1, round(tokens * rng.uniform(0.5, 1.5)))
            out.append(Spec(i, client, prompt, n, 1000 + i))
    return out


# ------------------------------------------------------------------------------ per stream
@dataclass
class Stream:
    """What one request's client saw (times in seconds since the run started)."""

    index: int
    start_s: float = math.nan
    first_token_s: float | None = None
    end_s: float = math.nan
    tokens: list[int] = field(default_factory=list)
    code: str = ""  # gRPC status code name of the failure; "" when completed
    completed: bool = False
    replica: str = ""
    max_gap_s: float = 0.0
    resumes: int = 0  # reconnects with resume_from (gateway-kill only)
    offset_errors: int = 0  # deltas whose offset was not the number of tokens received

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.start_s


def compare(reference: Sequence[int], got: Sequence[int]) -> tuple[int, int]:
    """(tokens lost, tokens duplicated) of `got` against `reference`: reference tokens that are
    missing or replaced count as lost, extra or replacing tokens as duplicated."""
    if list(reference) == list(got):
        return 0, 0
    lost = dup = 0
    sm = difflib.SequenceMatcher(a=list(reference), b=list(got), autojunk=False)
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag in ("delete", "replace"):
            lost += i2 - i1
        if tag in ("insert", "replace"):
            dup += j2 - j1
    return lost, dup


def lease_share(
    before: dict[str, float], after: dict[str, float], replica: str
) -> tuple[float, float, float]:
    """(share, leases to `replica`, all leases) between two snapshots of leases per replica;
    the share is 0 when no lease was granted in between."""
    total = sum(after.values()) - sum(before.values())
    dead = after.get(replica, 0.0) - before.get(replica, 0.0)
    return (dead / total if total > 0 else 0.0), dead, total


# ------------------------------------------------------------------------------ the mesh side
def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=3) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def _stat(pid: int) -> tuple[str, int] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else (fields[0], int(fields[1]))


def backend_stubs(parent: int) -> list[int]:
    """Pids of the Python-backend stubs tritonserver `parent` (started by our mesh) spawned."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or (st := _stat(int(entry))) is None or st[1] != parent:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if STUB.encode() in f.read():
                    out.append(int(entry))
        except OSError:
            continue
    return out


@dataclass
class Fault:
    """What a scenario did and how to tell the failed part is back."""

    component: str
    at_s: float = math.nan  # run clock
    dead_replica: str | None = None
    # Seconds since the fault when it was back in rotation (None: not within the deadline).
    back_s: float | None = None
    hold_s: float = 0.0  # orchestrators-down: how long the supervisor was held off
    # Replica faults: seconds since the fault when it was replaced (process or stub), healthy
    # in the orchestrator's ListReplicas, first served a request (= back_s).
    stages: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Chaos:
    """The mesh, the gateways, and the faults."""

    def __init__(self, args: argparse.Namespace, mesh: LocalMesh) -> None:
        self.args = args
        self.mesh = mesh
        self.redis = mesh.redis
        self.gateway2: ServiceProcess | None = None
        self.channels: dict[str, grpc.aio.Channel] = {}

    # --- services
    def services(self, component: object) -> list[ServiceProcess]:
        return [s for s in self.mesh.services.values() if s.component == component]

    def stub(self, address: str) -> pb_grpc.GatewayServiceAsyncStub:
        ch = self.channels.get(address)
        if ch is None:
            ch = self.channels[address] = grpc.aio.insecure_channel(address)
        return pb_grpc.GatewayServiceStub(ch)

    @property
    def gateway(self) -> ServiceProcess:
        return self.services(GATEWAY)[0]

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close(None)
        if self.gateway2 is not None:
            await self.gateway2.stop()

    async def start_gateway2(self) -> None:
        """A second gateway like the mesh's (same orchestrator(s), same Redis store), on free
        ports."""
        workdir = self.mesh.workdir / "gateway-2"
        workdir.mkdir(exist_ok=True)
        settings = self.gateway.settings.model_copy(
            update={"grpc_port": 0, "http_port": 0, "metrics_port": 0}
        )
        self.gateway2 = ServiceProcess(GATEWAY, settings, workdir)
        await self.gateway2.start()

    async def _listed(self, svc: ServiceProcess) -> list[orch_pb.ReplicaStatus] | None:
        """One orchestrator's replica list; None when it does not answer."""
        try:
            async with grpc.aio.insecure_channel(svc.address) as ch:
                r = await orch_grpc.OrchestratorServiceStub(ch).ListReplicas(
                    orch_pb.ListReplicasRequest(), timeout=2
                )
        except grpc.aio.AioRpcError:
            return None
        return list(r.replicas)

    async def list_replicas(self) -> list[orch_pb.ReplicaStatus] | None:
        """The first answering orchestrator's replica list."""
        for svc in self.services(ORCHESTRATOR):
            if (replicas := await self._listed(svc)) is not None:
                return replicas
        return None

    async def healthy(self, rid: str) -> bool:
        """Whether any orchestrator routes to `rid` (each probes on its own: the first to see a
        replacement ready may lease to it before the others do)."""
        for svc in self.services(ORCHESTRATOR):
            replicas = await self._listed(svc) or []
            if any(x.replica.id == rid and x.healthy for x in replicas):
                return True
        return False

    async def leases(self) -> dict[str, float]:
        """Leases granted per replica, summed over the orchestrators (0 for one that is down)."""
        out: dict[str, float] = {}
        for svc in self.services(ORCHESTRATOR):
            try:
                samples = await asyncio.to_thread(scrape, svc.metrics_url)
            except OSError:
                continue
            for (name, labels), v in samples.items():
                if name == names.ORCH_DECISIONS:
                    rid = dict(labels).get("replica", "")
                    out[rid] = out.get(rid, 0.0) + v
        return out

    async def probe(self, address: str | None = None) -> str | None:
        """The replica that served a 2-token request through a gateway; None if it failed."""
        req = pb.GenerateRequest(
            model=MODEL_NAME,
            token_ids=pb.TokenIds(ids=[7, 8, 9, random.randrange(100, 40000)]),
            sampling=pb.SamplingParams(max_tokens=2),
        )
        try:
            msgs = [
                m async for m in self.stub(address or self.gateway.address).Generate(req, timeout=3)
            ]
        except grpc.aio.AioRpcError:
            return None
        return msgs[-1].complete.replica_id if msgs and msgs[-1].HasField("complete") else None

    async def serving(self, svc: ServiceProcess) -> bool:
        try:
            async with grpc.aio.insecure_channel(svc.address) as ch:
                r = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
            return bool(r.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.aio.AioRpcError:
            return False

    async def settle(self, timeout_s: float = 120.0) -> bool:
        """Every replica healthy, every service serving, a request served."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            replicas = await self.list_replicas()
            ok = (
                replicas is not None
                and all(t.is_running for t in self.mesh.tritons)
                and all(x.healthy for x in replicas)
                and len(replicas) == len(self.mesh.replica_ids)
                and all(
                    s.proc is not None and s.proc.returncode is None
                    for s in self.mesh.services.values()
                )
                and await self.probe() is not None
            )
            if ok:
                return True
            await asyncio.sleep(0.25)
        return False

    # --- waiting for the failed part to come back
    async def _back(
        self, t0: float, ready: Callable[[], Awaitable[bool]], deadline_s: float
    ) -> float | None:
        end = t0 + deadline_s
        while time.monotonic() < end:
            if await ready():
                return time.monotonic() - t0
            await asyncio.sleep(0.1)
        return None

    def replica_back(
        self, rid: str, replaced: Callable[[], bool], fault: Fault, t_fault: float
    ) -> Callable[[], Awaitable[bool]]:
        """Replaced, then healthy in ListReplicas, then routed to: an orchestrator granted it a
        lease (the load's or the probe's) since it was healthy, or a probe through the gateway
        was served by it (each stage's time recorded in `fault.stages`). Under load the probe
        queues with the load's waiters and goes to whichever replica frees a slot first, so
        the grants are what shows the replica in rotation."""
        healthy_leases: list[float] = []
        probes: list[asyncio.Task[str | None]] = []

        def stage(name: str) -> None:
            fault.stages.setdefault(name, time.monotonic() - t_fault)

        async def back() -> bool:
            if not replaced():
                return False
            stage("replaced_s")
            if not healthy_leases:
                if not await self.healthy(rid):
                    return False
                healthy_leases.append((await self.leases()).get(rid, 0.0))
            stage("healthy_s")
            granted = (await self.leases()).get(rid, 0.0) > healthy_leases[0]
            if not granted:
                # The probe runs beside the polls (it may wait seconds in the queue).
                if probes and probes[0].done():
                    granted = probes.pop().result() == rid
                if not granted:
                    if not probes:
                        probes.append(asyncio.create_task(self.probe()))
                    return False
            for task in probes:
                task.cancel()
            stage("served_s")
            return True

        return back

    def service_back(self, svc: ServiceProcess, old_pid: int) -> Callable[[], Awaitable[bool]]:
        async def back() -> bool:
            p = svc.proc
            if p is None or p.pid == old_pid or p.returncode is not None:
                return False
            if not await self.serving(svc):
                return False
            if svc.component == GATEWAY:
                return await self.probe(svc.address) is not None
            if svc.component == ORCHESTRATOR:
                # Granted a lease since its restart (its counters started at 0).
                try:
                    samples = await asyncio.to_thread(scrape, svc.metrics_url)
                except OSError:
                    return False
                leases = sum(v for (n, _), v in samples.items() if n == names.ORCH_DECISIONS)
                if leases > 0:
                    return True
            return await self.probe() is not None

        return back


# ------------------------------------------------------------------------------ one run
@dataclass
class RunResult:
    scenario: str
    streams: list[Stream]
    fault: Fault | None
    duration_s: float
    token_times: list[float]
    skipped: str | None = None


class Runner:
    def __init__(self, chaos: Chaos, specs: list[Spec], args: argparse.Namespace) -> None:
        self.chaos = chaos
        self.specs = specs
        self.args = args
        self.total_tokens = sum(s.max_tokens for s in specs)

    async def run(
        self,
        scenario: str,
        inject: Callable[[float], Awaitable[Fault]] | None,
        *,
        keyed: bool = False,
        gateways: Sequence[str] = (),
    ) -> RunResult:
        t0 = time.monotonic()
        received = 0
        token_times: list[float] = []
        trigger = asyncio.Event()
        threshold = self.args.fault_at * self.total_tokens
        gws = list(gateways) or [self.chaos.gateway.address]
        preferred = 0  # index into gws; moves on when a gateway fails (keyed clients)
        nonce = f"{os.getpid()}-{int(time.time() * 1000)}"
        streams = [Stream(s.index) for s in self.specs]

        def now() -> float:
            return time.monotonic() - t0

        async def one(spec: Spec) -> None:
            nonlocal received, preferred
            st = streams[spec.index]
            st.start_s = now()
            last = st.start_s
            req = pb.GenerateRequest(
                model=MODEL_NAME,
                token_ids=pb.TokenIds(ids=spec.prompt),
                sampling=pb.SamplingParams(
                    max_tokens=spec.max_tokens, seed=spec.seed, temperature=0
                ),
                request_id=f"chaos-{scenario}-{nonce}-{spec.index}" if keyed else "",
            )
            attempt = 0
            tail = 0  # deltas without tokens since the last one with tokens (resume_events)
            while True:
                gw = gws[preferred % len(gws)]
                if attempt:
                    req.resume_from = len(st.tokens)
                    req.resume_events = tail
                try:
                    call = self.chaos.stub(gw).Generate(req, timeout=self.args.request_timeout_s)
                    async for msg in call:
                        if msg.HasField("delta"):
                            tail = 0 if msg.delta.token_ids else tail + 1
                        if msg.HasField("delta") and msg.delta.token_ids:
                            t = now()
                            if msg.delta.offset != len(st.tokens):
                                st.offset_errors += 1
                            if st.first_token_s is None:
                                st.first_token_s = t
                            st.max_gap_s = max(st.max_gap_s, t - last) if st.tokens else 0.0
                            last = t
                            n = len(msg.delta.token_ids)
                            st.tokens.extend(msg.delta.token_ids)
                            token_times.extend([t] * n)
                            received += n
                            if received >= threshold:
                                trigger.set()
                        elif msg.HasField("complete"):
                            st.completed = True
                            st.replica = msg.complete.replica_id
                    if not st.completed:
                        st.code = "STREAM_ENDED_WITHOUT_COMPLETE"
                    break
                except grpc.aio.AioRpcError as err:
                    code = err.code()
                    retryable = code in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.CANCELLED,
                        grpc.StatusCode.UNKNOWN,
                        grpc.StatusCode.INTERNAL,
                    )
                    if keyed and retryable and attempt < MAX_RESUMES:
                        attempt += 1
                        st.resumes += 1
                        if gws[preferred % len(gws)] == gw:
                            preferred += 1  # this gateway failed: the next one, for everyone
                        await asyncio.sleep(RESUME_PAUSE_S)
                        continue
                    st.code = code.name
                    break
            st.end_s = now()

        async def client(specs: list[Spec]) -> None:
            for s in specs:
                await one(s)

        by_client: dict[int, list[Spec]] = {}
        for s in self.specs:
            by_client.setdefault(s.client, []).append(s)

        async def start_clients() -> None:
            tasks = []
            for specs in by_client.values():
                tasks.append(asyncio.create_task(client(specs)))
                if self.args.ramp_s > 0:
                    await asyncio.sleep(self.args.ramp_s / len(by_client))
            await asyncio.gather(*tasks)

        load = asyncio.create_task(start_clients())
        fault: Fault | None = None
        if inject is not None:
            waiter = asyncio.create_task(trigger.wait())
            await asyncio.wait({load, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if trigger.is_set():
                fault = await inject(t0)
            else:
                fault = Fault("none", notes=["the run ended before the fault point"])
        await load
        duration = now()
        return RunResult(scenario, streams, fault, duration, token_times)


# ------------------------------------------------------------------------------ scenarios
class Scenarios:
    """Each scenario's fault: `inject(t0)` breaks something at once and returns the `Fault`,
    whose recovery (and dead-replica share) are measured by tasks it leaves running;
    `finish()` awaits them."""

    def __init__(self, chaos: Chaos, args: argparse.Namespace) -> None:
        self.chaos = chaos
        self.args = args
        self.pending: list[asyncio.Task[None]] = []
        self.share: dict[str, Any] = {}

    async def finish(self) -> None:
        await asyncio.gather(*self.pending)
        self.pending = []

    def _watch_back(
        self, fault: Fault, t_fault: float, ready: Callable[[], Awaitable[bool]]
    ) -> None:
        async def watch() -> None:
            fault.back_s = await self.chaos._back(t_fault, ready, self.args.recover_timeout_s)

        self.pending.append(asyncio.create_task(watch()))

    def _watch_share(self, rid: str, t_fault: float, restarted: Callable[[], bool]) -> None:
        """Leases to `rid` granted while it was not serving, from DEAD_SHARE_AFTER_S after the
        fault: the window ends at the last leases snapshot after which the orchestrator still
        reported `rid` unhealthy (snapshot first, then the health check, so no lease in the window
        can have gone to the restarted replacement once it serves again; with two orchestrators
        probing independently the error is at most one probe interval)."""

        async def watch() -> None:
            await asyncio.sleep(max(0.0, t_fault + DEAD_SHARE_AFTER_S - time.monotonic()))
            t_start = time.monotonic()
            before = await self.chaos.leases()
            last, t_last = before, t_start
            end = t_fault + self.args.recover_timeout_s
            while time.monotonic() < end:
                snapshot, t_snap = await self.chaos.leases(), time.monotonic()
                if restarted() and await self.chaos.healthy(rid):
                    break
                last, t_last = snapshot, t_snap
                await asyncio.sleep(0.1)
            share, dead, total = lease_share(before, last, rid)
            self.share = {
                "share": share,
                "leases_to_dead": dead,
                "leases_total": total,
                "window_s": t_last - t_start,
            }

        self.pending.append(asyncio.create_task(watch()))

    def _mark(self, fault: Fault, t0: float) -> float:
        t = time.monotonic()
        fault.at_s = t - t0
        return t

    # --- the faults
    async def replica_kill(self, t0: float, index: int = 0, sig: int = signal.SIGKILL) -> Fault:
        mesh = self.chaos.mesh
        rid = mesh.replica_ids[index]
        old = mesh.tritons[index]
        assert old.pid is not None
        fault = Fault(rid, dead_replica=rid)
        t = self._mark(fault, t0)
        os.kill(old.pid, sig)

        def restarted() -> bool:
            return mesh.tritons[index] is not old and mesh.tritons[index].is_running

        self._watch_back(fault, t, self.chaos.replica_back(rid, restarted, fault, t))
        self._watch_share(rid, t, restarted)
        return fault

    async def replica_drain(self, t0: float) -> Fault:
        index = min(2, len(self.chaos.mesh.replica_ids) - 1)
        fault = await self.replica_kill(t0, index, signal.SIGTERM)
        fault.notes.append("SIGTERM: the replica drains, exits, and the supervisor restarts it")
        return fault

    async def stub_kill(self, t0: float) -> Fault:
        mesh = self.chaos.mesh
        index = min(1, len(mesh.replica_ids) - 1)
        rid = mesh.replica_ids[index]
        server = mesh.tritons[index]
        assert server.pid is not None
        stubs = backend_stubs(server.pid)
        fault = Fault(f"{rid} backend stub", dead_replica=rid)
        if not stubs:
            fault.notes.append("no backend stub found under the replica's tritonserver")
            return fault
        t = self._mark(fault, t0)
        for pid in stubs:
            os.kill(pid, signal.SIGKILL)

        def stub_back() -> bool:
            return (
                bool(server.pid and backend_stubs(server.pid)) or mesh.tritons[index] is not server
            )

        self._watch_back(fault, t, self.chaos.replica_back(rid, stub_back, fault, t))
        self._watch_share(rid, t, stub_back)
        return fault

    async def service_kill(self, t0: float, svc: ServiceProcess, label: str | None = None) -> Fault:
        assert svc.proc is not None
        old_pid = svc.proc.pid
        fault = Fault(label or svc.name)
        t = self._mark(fault, t0)
        os.kill(old_pid, signal.SIGKILL)
        self._watch_back(fault, t, self.chaos.service_back(svc, old_pid))
        return fault

    async def orchestrator_kill(self, t0: float) -> Fault:
        orchs = self.chaos.services(ORCHESTRATOR)
        fault = await self.service_kill(t0, orchs[0], f"{orchs[0].name} (1 of {len(orchs)})")
        if len(orchs) < 2:
            fault.notes.append(
                "one orchestrator only (MeshOptions has no `orchestrators`): killed the only "
                "one; the supervisor restarts it"
            )
        return fault

    async def orchestrators_down(self, t0: float) -> Fault:
        chaos = self.chaos
        orchs = chaos.services(ORCHESTRATOR)
        hold = self.args.hold_s
        release_at = time.monotonic() + hold

        def held(svc: ServiceProcess) -> Callable[[], Awaitable[None]]:
            async def restart() -> None:
                await asyncio.sleep(max(0.0, release_at - time.monotonic()))
                await svc.restart()

            return restart

        # The supervisor's units are the services' names: replace each with one whose restart
        # waits for the end of the hold (plain restarts again after the scenario).
        for svc in orchs:
            chaos.mesh.supervisor.watch(svc.name, svc.wait, held(svc))
        fault = Fault(f"all {len(orchs)} orchestrator(s)", hold_s=hold)
        t = self._mark(fault, t0)
        pids = [svc.proc.pid for svc in orchs if svc.proc is not None]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

        async def back() -> bool:
            return all(
                [await chaos.service_back(svc, pid)() for svc, pid in zip(orchs, pids, strict=True)]
            )

        async def watch() -> None:
            fault.back_s = await chaos._back(t, back, hold + self.args.recover_timeout_s)
            for svc in orchs:
                chaos.mesh.supervisor.watch(svc.name, svc.wait, svc.restart)

        self.pending.append(asyncio.create_task(watch()))
        fault.notes.append(f"the supervisor was held off {hold:g} s")
        return fault

    async def kv_registry_kill(self, t0: float) -> Fault:
        return await self.service_kill(t0, self.chaos.services(KV_REGISTRY)[0])

    async def gateway_kill(self, t0: float) -> Fault:
        fault = await self.service_kill(t0, self.chaos.gateway)
        fault.notes.append("clients resume through the second gateway (request id, resume_from)")
        return fault


# ------------------------------------------------------------------------------ report
def percentile_or_nan(values: list[float], q: float) -> float:
    return percentile(values, q) if values else math.nan


def summarize_run(
    run: RunResult, reference: dict[int, list[int]], expected: dict[int, list[int]] | None
) -> dict[str, Any]:
    streams = run.streams
    completed = [s for s in streams if s.completed and not s.code]
    lost = dup = 0
    mismatched = 0
    for s in streams:
        lo, du = compare(reference.get(s.index, []), s.tokens)
        lost, dup = lost + lo, dup + du
        mismatched += bool(lo or du)
    lost_vs_expected = dup_vs_expected = 0
    if expected is not None:
        for s in streams:
            lo, du = compare(expected[s.index], s.tokens)
            lost_vs_expected += lo
            dup_vs_expected += du
    ttfts = [t for s in streams if (t := s.ttft_s) is not None]
    out: dict[str, Any] = {
        "scenario": run.scenario,
        "requests": len(streams),
        "completed": len(completed),
        "tokens_received": sum(len(s.tokens) for s in streams),
        "tokens_reference": sum(len(v) for v in reference.values()),
        "tokens_lost": lost,
        "tokens_duplicated": dup,
        "streams_differing": mismatched,
        "tokens_lost_vs_expected": lost_vs_expected if expected is not None else None,
        "tokens_duplicated_vs_expected": dup_vs_expected if expected is not None else None,
        "failed_by_code": dict(Counter(s.code for s in streams if s.code)),
        "ttft_p50_s": percentile_or_nan(ttfts, 50),
        "ttft_p99_s": percentile_or_nan(ttfts, 99),
        "longest_stall_s": max((s.max_gap_s for s in streams), default=math.nan),
        "offset_errors": sum(s.offset_errors for s in streams),
        "resumed_streams": sum(1 for s in streams if s.resumes),
        "duration_s": run.duration_s,
        "tokens_per_s": sum(len(s.tokens) for s in streams) / run.duration_s
        if run.duration_s > 0
        else math.nan,
    }
    f = run.fault
    if f is not None:
        out["fault"] = {
            "component": f.component,
            "at_s": f.at_s,
            "back_s": f.back_s,
            "hold_s": f.hold_s,
            "stages": f.stages,
            "dead_replica": f.dead_replica,
            "notes": f.notes,
        }
    return out


def targets(row: dict[str, Any], scenario: str) -> list[Check]:
    checks = []
    if scenario != "reference":
        checks += [
            Check("completed share", row["completed"] / max(1, row["requests"]), ">=", 1.0),
            Check("tokens lost", row["tokens_lost"], "<=", 0),
            Check("tokens duplicated", row["tokens_duplicated"], "<=", 0),
        ]
    f = row.get("fault")
    if f is not None:
        back = f["back_s"]
        back_v = math.nan if back is None else back - f["hold_s"]
        checks.append(Check("back in rotation s (after hold)", back_v, "<=", BACK_WITHIN_S))
    dead = row.get("dead_replica_share")
    if dead is not None:
        checks.append(Check("leases to dead replica after 2 s", dead["share"], "<", DEAD_SHARE_MAX))
    if scenario == "orchestrators-down" and "outage" in row:
        checks.append(Check("served during the outage", row["outage"]["served_share"], ">=", 0.99))
    return checks


def check_passed(c: Check) -> bool:
    if c.op == "<":
        return not math.isnan(c.value) and c.value < c.bound
    return c.passed


def outage_service(run: RunResult, hold_s: float, normal_ttft_s: float) -> dict[str, Any]:
    """Requests sent while every orchestrator was down, and how many were served as they would
    have been without the outage: completed without error, their first token no later than the
    reference run's p99 TTFT (`normal_ttft_s`, the same load without a fault) after they were
    sent. A request held until an orchestrator came back waits past that; one sent late in the
    hold may get its first token after the hold ended and still count as served."""
    f = run.fault
    assert f is not None
    start, end = f.at_s, f.at_s + hold_s
    sent = [s for s in run.streams if start <= s.start_s <= end]
    served = [
        s
        for s in sent
        if not s.code
        and s.first_token_s is not None
        and s.first_token_s - s.start_s <= normal_ttft_s
    ]
    return {
        "sent": len(sent),
        "served": len(served),
        "served_share": len(served) / len(sent) if sent else math.nan,
        "normal_ttft_s": normal_ttft_s,
        "failed_by_code": dict(Counter(s.code for s in sent if s.code)),
    }


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def back_cell(fault: dict[str, Any]) -> str:
    if not fault:
        return "-"
    if fault.get("back_s") is None:
        return "never"
    hold = fault.get("hold_s") or 0.0
    return f"{fault['back_s']:.1f}" + (f" (hold {hold:g})" if hold else "")


def table(rows: list[dict[str, Any]]) -> str:
    headers = [
        "scenario",
        "done/total",
        "lost",
        "dup",
        "failed by code",
        "TTFT p99 s",
        "max stall s",
        "back s",
        "dead share",
        "targets",
    ]
    body = []
    for r in rows:
        if r.get("skipped"):
            body.append([r["scenario"], "skipped", "", "", "", "", "", "", "", r["skipped"]])
            continue
        f = r.get("fault") or {}
        dead = r.get("dead_replica_share")
        codes = ", ".join(f"{k} {v}" for k, v in sorted(r["failed_by_code"].items())) or "0"
        missed = [c["name"] for c in r["targets"] if not c["met"]]
        verdict = "met" if not missed else "MISSED: " + "; ".join(missed)
        body.append(
            [
                r["scenario"],
                f"{r['completed']}/{r['requests']}",
                str(r["tokens_lost"]),
                str(r["tokens_duplicated"]),
                codes,
                _fmt(r["ttft_p99_s"], ".2f"),
                _fmt(r["longest_stall_s"], ".2f"),
                back_cell(f),
                "-"
                if dead is None
                else f"{dead['share']:.1%} ({dead['leases_to_dead']:.0f}/{dead['leases_total']:.0f})",
                verdict,
            ]
        )
    return format_table(headers, body)


def plot(runs: list[RunResult], path: Path, bin_s: float = 0.5) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = [r for r in runs if r.skipped is None and r.token_times]
    if not runs:
        return None
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.0 * len(runs)), sharex=True)
    axes_list = list(axes) if len(runs) > 1 else [axes]
    for ax, run in zip(axes_list, runs, strict=True):
        nbins = int(run.duration_s / bin_s) + 1
        counts = [0] * nbins
        for t in run.token_times:
            counts[min(nbins - 1, int(t / bin_s))] += 1
        ax.plot([i * bin_s for i in range(nbins)], [c / bin_s for c in counts], lw=1)
        ax.set_ylabel("tok/s")
        ax.set_title(run.scenario, fontsize=9, loc="left")
        f = run.fault
        if f is not None and not math.isnan(f.at_s):
            ax.axvline(f.at_s, color="red", lw=1, label="fault")
            if f.back_s is not None:
                ax.axvline(f.at_s + f.back_s, color="green", lw=1, ls="--", label="back")
            if f.hold_s:
                ax.axvspan(f.at_s, f.at_s + f.hold_s, color="red", alpha=0.1)
            ax.legend(fontsize=7, loc="upper right")
    axes_list[-1].set_xlabel("s since the run started")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ main
def mesh_options(args: argparse.Namespace, redis: bool) -> MeshOptions:
    """Two orchestrators (active-active), supervised children, and the mesh's Redis resume store
    when a scenario resumes through a second gateway."""
    extra: dict[str, str] = {}
    if args.stall_timeout_s is not None:
        extra["LLMMESH_GATEWAY_STALL_TIMEOUT_S"] = str(args.stall_timeout_s)
    return MeshOptions(
        replicas=args.replicas,
        time_scale=args.time_scale,
        log_json=True,
        supervise=True,
        orchestrators=2,
        redis=redis,
        extra_env=extra,
    )


def gateway_scenario_prerequisite() -> str | None:
    if redis_binary() is None:
        return "no redis-server (make setup unpacks Debian's into .build/redis)"
    return None


async def main_async(args: argparse.Namespace) -> int:
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenarios {sorted(unknown)}; choose from {SCENARIOS}")
    gw_skip = gateway_scenario_prerequisite() if "gateway-kill" in args.scenarios else None
    tmp = Path(tempfile.mkdtemp(prefix="llmmesh-chaos-"))
    options = mesh_options(args, redis="gateway-kill" in args.scenarios and gw_skip is None)
    options.workdir = tmp / "mesh"
    mesh = LocalMesh(options)
    eprint(f"starting the mesh ({args.replicas} emulator replicas) in {options.workdir} ...")
    await mesh.start()
    chaos = Chaos(args, mesh)
    specs = workload(args.streams, args.rounds, args.tokens, args.prompt_tokens, args.seed)
    runner = Runner(chaos, specs, args)
    scen = Scenarios(chaos, args)
    runs: list[RunResult] = []
    rows: list[dict[str, Any]] = []
    try:
        if mesh.redis is not None:
            await chaos.start_gateway2()
        if not await chaos.settle():
            eprint("warning: the mesh did not settle before the reference run")
        eprint(f"reference run: {len(specs)} requests, {runner.total_tokens} tokens ...")
        ref = await runner.run("reference", None)
        runs.append(ref)
        reference = {s.index: s.tokens for s in ref.streams}
        vocab = EmulatorSettings()
        expected = {
            s.index: expected_output_ids(s.seed, s.prompt, s.max_tokens, vocab) for s in specs
        }
        row = summarize_run(ref, reference, expected)
        row["reference_equals_expected"] = all(
            reference[s.index] == expected[s.index] for s in specs
        )
        rows.append(row)
        eprint(f"  {row['completed']}/{row['requests']} in {ref.duration_s:.1f} s")
        injectors: dict[str, Callable[[float], Awaitable[Fault]]] = {
            "replica-kill": scen.replica_kill,
            "stub-kill": scen.stub_kill,
            "orchestrator-kill": scen.orchestrator_kill,
            "orchestrators-down": scen.orchestrators_down,
            "kv-registry-kill": scen.kv_registry_kill,
            "replica-drain": scen.replica_drain,
            "gateway-kill": scen.gateway_kill,
        }
        for name in [s for s in SCENARIOS if s in args.scenarios]:
            if name == "gateway-kill" and gw_skip is not None:
                rows.append({"scenario": name, "skipped": gw_skip})
                runs.append(RunResult(name, [], None, 0.0, [], skipped=gw_skip))
                continue
            if not await chaos.settle():
                eprint(f"warning: the mesh did not settle before {name}")
            eprint(f"{name} ...")
            scen.share = {}
            keyed = name == "gateway-kill"
            gws = (
                [chaos.gateway.address, chaos.gateway2.address]
                if keyed and chaos.gateway2 is not None
                else []
            )
            run = await runner.run(name, injectors[name], keyed=keyed, gateways=gws)
            await scen.finish()
            runs.append(run)
            row = summarize_run(run, reference, expected)
            if run.fault is not None and run.fault.dead_replica and scen.share:
                row["dead_replica_share"] = scen.share
            if name == "orchestrators-down" and run.fault is not None:
                row["outage"] = outage_service(run, args.hold_s, max(rows[0]["ttft_p99_s"], 1.0))
            if name == "gateway-kill":
                row["broken_streams_without_retry"] = row["resumed_streams"]
            rows.append(row)
            if name == "stub-kill":
                # Nothing in the local mesh replaces a replica whose stub died (Kubernetes'
                # liveness probe would): the harness kills its tritonserver (ours) so the
                # supervisor restarts it before the next scenario.
                index = min(1, len(mesh.replica_ids) - 1)
                server = mesh.tritons[index]
                if server.pid is not None and not backend_stubs(server.pid):
                    os.kill(server.pid, signal.SIGKILL)
                    row.setdefault("notes", []).append(
                        "after the run the harness SIGKILLed the stubless tritonserver so the "
                        "supervisor restarts it"
                    )
            eprint(f"  {row['completed']}/{row['requests']} in {run.duration_s:.1f} s")
        for row in rows:
            if row.get("skipped"):
                continue
            checks = targets(row, row["scenario"])
            row["targets"] = [{**asdict(c), "met": check_passed(c)} for c in checks]
    finally:
        await chaos.close()
        await mesh.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(table(rows))
    for r in rows:
        for n in r.get("notes", []) + (r.get("fault") or {}).get("notes", []):
            print(f"  {r['scenario']}: {n}")
        stages = (r.get("fault") or {}).get("stages") or {}
        if stages:
            what = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in stages.items())
            print(f"  {r['scenario']}: after the fault: {what}")
        if "outage" in r:
            o = r["outage"]
            print(
                f"  {r['scenario']}: {o['served']}/{o['sent']} requests sent during the outage "
                f"completed with a first token within the reference p99 TTFT "
                f"({o['normal_ttft_s']:.2f} s); failed {o['failed_by_code']}"
            )
        if r["scenario"] == "gateway-kill" and not r.get("skipped"):
            print(
                f"  gateway-kill: {r['broken_streams_without_retry']} streams broke and resumed "
                "(each would have failed without a client retry)"
            )
    out = write_json(
        args.out,
        {
            "args": vars(args),
            "targets": {
                "back_within_s": BACK_WITHIN_S,
                "dead_share_max": DEAD_SHARE_MAX,
                "dead_share_after_s": DEAD_SHARE_AFTER_S,
            },
            "scenarios": rows,
            "restarts": [asdict(e) for e in mesh.supervisor.history],
        },
    )
    print(f"\nwrote {out}")
    png = plot(runs, RESULTS_DIR / (Path(args.out).stem + ".png"))
    if png is not None:
        print(f"wrote {png}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--scenarios", nargs="+", default=SCENARIOS, help=f"Of {SCENARIOS}.")
    p.add_argument("--streams", type=int, default=200, help="Concurrent client streams.")
    p.add_argument("--rounds", type=int, default=2, help="Requests per stream, back to back.")
    p.add_argument("--tokens", type=int, default=300, help="Mean output tokens per request.")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="Emulator time scale (engine speed)."
    )
    p.add_argument("--fault-at", type=float, default=0.3, help="Share of tokens before the fault.")
    p.add_argument("--hold-s", type=float, default=10.0, help="orchestrators-down: outage length.")
    p.add_argument("--ramp-s", type=float, default=2.0, help="Clients start spread over this.")
    p.add_argument(
        "--recover-timeout-s", type=float, default=30.0, help="Longest wait for a part to be back."
    )
    p.add_argument(
        "--stall-timeout-s",
        type=float,
        default=None,
        help="Gateway stall_timeout_s (default: the gateway's own).",
    )
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="chaos.json", help="File name under bench-results/.")
    return p


def main() -> int:
    import uvloop

    return uvloop.run(main_async(parser().parse_args()))


if __name__ == "__main__":
    sys.exit(main())
