"""`make bench-coldpath`: what one request's Python costs on the mesh's CPU when the process ran
just before (hot) and when it sat idle for a while first (cold), in one run.

Why: at one stream, bench-overhead's added TTFT is the gateway's and the orchestrator's work on
one request after each sat idle for the length of a whole generation (tens of ms), and on a
virtual machine an idle vCPU halts (`haltpoll`) and its caches are taken by whatever the host
runs meanwhile: the same code then runs several times slower than in a loop. This measures that
factor on each piece of the request path, in process, pinned to one CPU, so the added TTFT at one
stream can be read as (work per request) x (cold factor), and a change to either is seen.

Pieces (each timed from its call to its answer; perf_counter):
- gateway: `GatewayServicer.Generate` over in-process admission and engine fakes (a lease at
  once, one token), to its first response message: conversion, checks, validation, limits,
  tracing, stream state, the engine request;
- orchestrator: `Orchestrator.admit` then `complete` on 2 ready replicas (default profile, no
  prefix index), a 128-token prompt;
- reference: a fixed pure-Python loop (dict and list work, no I/O): the machine's own factor.
Each piece runs `--requests` times back to back (hot) and with each `--gaps` ms of idle sleep
before every call. Prints p50/p90 per piece and gap with the factor over hot; writes
bench-results/coldpath.json.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any

from bench.overhead import pct, pinning
from bench.report import format_table, write_json
from llmmesh.common.topology import ReplicaAddress
from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.localmesh import ROOT
from services.gateway.admission import AdmissionRequest, AdmissionStatus, Lease, LeaseReport
from services.gateway.core import GatewayCore
from services.gateway.models import ServedModel
from services.gateway.servicer import GatewayServicer
from services.gateway.settings import GatewaySettings, ModelSettings
from services.gateway.triton_stream import EngineChunk, EngineRequest
from services.orchestrator.director import Orchestrator
from services.orchestrator.domain import AdmissionRequest as OrchestratorRequest
from services.orchestrator.domain import Outcome
from services.orchestrator.settings import OrchestratorSettings, ReplicaSpec

TOKENIZER = ROOT / ".build" / "models" / "smollm2-135m-instruct" / "tokenizer.json"
PROMPT = list(range(100, 228))  # bench-overhead's prompt length

# One call of a piece; its seconds (a piece times the part it measures itself).
Timed = Callable[[], Awaitable[float]]


# -- the gateway's collaborators, answering at once -------------------------------------------
class _Admission:
    def __init__(self) -> None:
        self._n = 0
        self._replica = ReplicaAddress("r0", "127.0.0.1:1")

    async def admit(self, request: AdmissionRequest, *, timeout_s: float) -> Lease:
        self._n += 1
        return Lease(f"lease-{self._n}", self._replica, 0.0)

    def complete(self, report: LeaseReport) -> None:
        pass

    async def drain(self) -> None:
        pass

    async def status(self, *, timeout_s: float) -> AdmissionStatus:
        return AdmissionStatus(1, 1, 0)


class _Engine:
    async def stream(
        self,
        address: str,
        authority: str,
        request: EngineRequest,
        *,
        timeout_s: float | None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> AsyncGenerator[EngineChunk, None]:
        yield EngineChunk([42], True, 0)


class _Context:
    """A ServicerContext that notes when the first message is written."""

    def __init__(self) -> None:
        self.first_at: float | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def time_remaining(self) -> float:
        return 300.0

    async def write(self, message: pb.GenerateResponse) -> None:
        if self.first_at is None:
            self.first_at = time.perf_counter()


def gateway_piece() -> Timed:
    model = ServedModel.load(ModelSettings(name="m", tokenizer_path=TOKENIZER))
    core = GatewayCore(
        GatewaySettings(models=[model.settings]), [model], _Admission(), _Engine(), 64
    )
    servicer = GatewayServicer(core)
    request = pb.GenerateRequest(
        model="m", token_ids=pb.TokenIds(ids=PROMPT), sampling=pb.SamplingParams(max_tokens=1)
    )

    async def one() -> float:
        context = _Context()
        start = time.perf_counter()
        await servicer.Generate(request, context)  # type: ignore[arg-type]
        assert context.first_at is not None
        return context.first_at - start

    return one


class ReadyProbe:
    """Every replica ready: the orchestrator's probe for benchmarks run in process."""

    async def ready(self, replica: ReplicaSpec, models: Sequence[str], timeout_s: float) -> bool:
        return True


async def orchestrator_piece() -> Timed:
    settings = OrchestratorSettings(
        replicas=[ReplicaSpec(id=f"r{i}", grpc_address=f"127.0.0.1:{9000 + i}") for i in range(2)]
    )
    core = Orchestrator(settings, ReadyProbe())
    await core.probe_once()
    request = OrchestratorRequest("x", "tensorrt_llm", PROMPT, 64)

    async def one() -> float:
        start = time.perf_counter()
        lease = await core.admit(request, 1.0)
        core.complete(lease.lease_id, Outcome.SUCCESS)
        return time.perf_counter() - start

    return one


def reference_piece() -> Timed:
    loads = {f"r{i}": i * 0.5 for i in range(64)}

    async def one() -> float:
        start = time.perf_counter()
        total = 0.0
        for _ in range(8):
            best = min(loads, key=loads.__getitem__)
            total += sum(v for k, v in loads.items() if k != best)
        if total < 0:
            raise AssertionError
        return time.perf_counter() - start

    return one


async def measure(one: Timed, requests: int, gap_s: float) -> list[float]:
    for _ in range(20):
        await one()
    out: list[float] = []
    for _ in range(requests):
        if gap_s:
            await asyncio.sleep(gap_s)
        out.append(await one())
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    split = pinning(not args.no_pin)
    if split is not None:
        os.sched_setaffinity(0, split[1])
    pieces = {
        "gateway (Generate to first message)": gateway_piece(),
        "orchestrator (admit + complete)": await orchestrator_piece(),
        "reference (pure-Python loop)": reference_piece(),
    }
    rows: list[dict[str, Any]] = []
    for name, one in pieces.items():
        hot = None
        for gap_ms in (0.0, *args.gaps):
            times = await measure(one, args.requests, gap_ms / 1000)
            p50, p90 = pct(times, 0.5) * 1e6, pct(times, 0.9) * 1e6
            hot = p50 if hot is None else hot
            rows.append(
                {"piece": name, "gap_ms": gap_ms, "p50_us": p50, "p90_us": p90, "x_hot": p50 / hot}
            )
            print(f"  {name}, gap {gap_ms:g} ms: p50 {p50:.1f} us", flush=True)
    return {"pinned_cpus": None if split is None else sorted(split[1]), "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=200, help="Calls per piece and gap.")
    p.add_argument("--gaps", type=float, nargs="+", default=[1.0, 5.0, 20.0, 50.0], help="Idle ms.")
    p.add_argument("--no-pin", action="store_true", help="Do not pin to the mesh's CPU.")
    p.add_argument("--output", default="coldpath.json")
    args = p.parse_args()
    logging.disable(logging.WARNING)  # replica readiness logs
    result = asyncio.run(main_async(args))
    print()
    print(
        format_table(
            ["piece", "idle before", "p50 us", "p90 us", "p50 x hot"],
            [
                [
                    r["piece"],
                    "none (hot)" if not r["gap_ms"] else f"{r['gap_ms']:g} ms",
                    f"{r['p50_us']:.1f}",
                    f"{r['p90_us']:.1f}",
                    f"{r['x_hot']:.2f}",
                ]
                for r in result["rows"]
            ],
        )
    )
    path = write_json(args.output, result)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
