"""`make bench-envoy`: what Envoy where Istio puts it adds to a token stream, in one run.

Two meshes on the same machine, one after the other, each with one emulated Triton replica:
- direct: the local mesh as `make run` starts it (client -> gateway -> Triton);
- envoy: the same behind the rehearsed Istio data path (`make run MESH=envoy`, dev overlay):
  client -> ingress Envoy -> mTLS -> gateway pod sidecar -> gateway v2 -> outbound Envoy -> mTLS
  -> Triton pod sidecar -> Triton. Requests carry `x-llmmesh-canary: always` (the v2 route, not
  mirrored), so every request crosses four Envoy hops and nothing else runs.

Arms: gRPC `Generate` and OpenAI `/v1/completions` streamed as SSE, at 1 and a higher
concurrency, distinct prompts. Per arm: TTFT p50/p99 at the client, tokens/s, and CPU time per
token of the gateway process and of all Envoy processes together (utime + stime from
/proc/<pid>/stat around the arm). The summary is envoy minus direct (added TTFT) and Envoy CPU per
token, with Envoy CPU ÷ gateway CPU as the ratio against the baseline measured in this run.
Unless --no-pin: engines and the load generator on one half of the CPUs, the mesh on the other.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

import aiohttp
import grpc

from bench.overhead import (
    Sample,
    cpu_seconds,
    distinct_prompt,
    parser,
    pct,
    pin,
    pinning,
    run_level,
)
from bench.report import write_json
from llmmesh.envoymesh.plane import EnvoyDataPlane, EnvoyOptions
from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.gateway.v1 import gateway_pb2_grpc as pb_grpc
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as opb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2_grpc as opb_grpc
from llmmesh.localmesh import MODEL_NAME, LocalMesh, MeshOptions

CANARY = (("x-llmmesh-canary", "always"),)
GRPC, SSE = "gRPC", "SSE"


@dataclass
class Row:
    mesh: str
    path: str
    concurrency: int
    requests: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    tokens_per_s: float
    gateway_cpu_us_per_token: float
    envoy_cpu_us_per_token: float


async def grpc_sample(
    stub: pb_grpc.GatewayServiceAsyncStub,
    metadata: tuple[tuple[str, str], ...],
    prompt: list[int],
    max_tokens: int,
    seed: int,
) -> Sample:
    req = pb.GenerateRequest(
        model=MODEL_NAME,
        token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingParams(max_tokens=max_tokens, seed=seed),
    )
    start = time.perf_counter()
    first, n = 0.0, 0
    async for msg in stub.Generate(req, metadata=metadata, timeout=300):
        if msg.HasField("delta") and msg.delta.token_ids:
            if n == 0:
                first = time.perf_counter() - start
            n += len(msg.delta.token_ids)
    return Sample(first, n, time.perf_counter() - start)


async def sse_sample(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    prompt: list[int],
    max_tokens: int,
    seed: int,
) -> Sample:
    body = {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, tokens = 0.0, 0
    async with session.post(url, json=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.read())[:300]!r}")
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            if first == 0.0 and b'"text":"' in line and b'"text":""' not in line:
                first = time.perf_counter() - start
            if b'"usage":{' in line:
                tokens = int(json.loads(line[6:])["usage"]["completion_tokens"])
    return Sample(first, tokens, time.perf_counter() - start)


async def wait_ready(orchestrator: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(orchestrator) as ch:
        stub = opb_grpc.OrchestratorServiceStub(ch)
        while True:
            resp = await stub.ListReplicas(opb.ListReplicasRequest(), timeout=5)
            if any(r.healthy for r in resp.replicas):
                return
            if time.monotonic() > deadline:
                raise TimeoutError("no replica ready")
            await asyncio.sleep(0.2)  # the orchestrator probes every 0.25 s


async def run_mesh(args: argparse.Namespace, envoy: bool, offset: int) -> list[Row]:
    name = "envoy" if envoy else "direct"
    plane = (
        EnvoyDataPlane(EnvoyOptions(replica_versions=("v2",)), datetime.datetime.now(datetime.UTC))
        if envoy
        else None
    )
    mesh = LocalMesh(
        MeshOptions(
            replicas=1,
            time_scale=args.time_scale,
            log_json=True,
            data_plane=plane,
            extra_env=plane.mesh_gateway_env() if plane else {},
        )
    )
    await mesh.start()
    rows: list[Row] = []
    try:
        await wait_ready(mesh.services["orchestrator"].address)
        metadata: tuple[tuple[str, str], ...] = ()
        if plane is not None:
            serving = plane.gateways["gateway-v2-0"]
            target, http_base = (
                f"127.0.0.1:{plane.ingress_port}",
                f"http://127.0.0.1:{plane.ingress_port}",
            )
            envoy_pids = [p.pid for p in plane.processes()]
            metadata = CANARY
        else:
            serving = mesh.services["gateway"]
            target, http_base = serving.address, serving.http_base_url
            envoy_pids = []
        assert serving.proc is not None
        gw_pid = serving.proc.pid
        cpus = pinning(not args.no_pin)
        if cpus is not None:
            client, servers = cpus
            pin([t.pid for t in mesh.tritons if t.pid is not None], client)
            pin([os.getpid()], client)
            pin([s.proc.pid for s in mesh.services.values() if s.proc is not None], servers)
            pin(envoy_pids, servers)
        channel = grpc.aio.insecure_channel(target)
        stub = pb_grpc.GatewayServiceStub(channel)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=300)
        )
        headers = dict(metadata)

        async def via_grpc(i: int) -> Sample:
            p = distinct_prompt(i, args.prompt_tokens)
            return await grpc_sample(stub, metadata, p, args.output_tokens, i)

        async def via_sse(i: int) -> Sample:
            p = distinct_prompt(i, args.prompt_tokens)
            url = f"{http_base}/v1/completions"
            return await sse_sample(session, url, headers, p, args.output_tokens, i)

        arms: dict[str, Callable[[int], Awaitable[Sample]]] = {GRPC: via_grpc, SSE: via_sse}
        for fn in arms.values():  # warm up channels, connections, tokenizer, engine
            await run_level(fn, 2, 4)
        for conc in args.concurrency:
            requests = max(args.min_requests, conc * args.rounds)
            for path, fn in arms.items():
                base = offset

                async def one(
                    i: int, fn: Callable[[int], Awaitable[Sample]] = fn, base: int = base
                ) -> Sample:
                    return await fn(base + i)

                gw0 = cpu_seconds(gw_pid)
                env0 = sum(cpu_seconds(p) for p in envoy_pids)
                samples, wall = await run_level(one, conc, requests)
                gw_cpu = cpu_seconds(gw_pid) - gw0
                envoy_cpu = sum(cpu_seconds(p) for p in envoy_pids) - env0
                offset += requests
                ttfts = [s.ttft_s * 1000 for s in samples]
                tokens = sum(s.tokens for s in samples) or 1
                rows.append(
                    Row(
                        name,
                        path,
                        conc,
                        requests,
                        pct(ttfts, 0.5),
                        pct(ttfts, 0.99),
                        tokens / wall,
                        gw_cpu / tokens * 1e6,
                        envoy_cpu / tokens * 1e6,
                    )
                )
                print(f"  measured {name} {path} x{conc}", flush=True)
        await session.close()
        await channel.close(None)
    finally:
        await mesh.stop()
    return rows


async def main_async(args: argparse.Namespace) -> int:
    rows = await run_mesh(args, envoy=False, offset=0)
    rows += await run_mesh(args, envoy=True, offset=1_000_000)
    print()
    print(
        f"{'mesh':<6} | {'path':<4} | {'streams':>7} | {'TTFT p50 ms':>11} | {'TTFT p99 ms':>11} | "
        f"{'tokens/s':>8} | {'gw CPU us/tok':>13} | {'Envoy CPU us/tok':>16}"
    )
    print("-" * 98)
    for r in rows:
        print(
            f"{r.mesh:<6} | {r.path:<4} | {r.concurrency:>7} | {r.ttft_p50_ms:>11.2f} | "
            f"{r.ttft_p99_ms:>11.2f} | {r.tokens_per_s:>8.0f} | {r.gateway_cpu_us_per_token:>13.1f} | "
            f"{r.envoy_cpu_us_per_token:>16.1f}"
        )
    by = {(r.mesh, r.path, r.concurrency): r for r in rows}
    summary = []
    print()
    print(
        f"{'path':<4} | {'streams':>7} | {'added TTFT p50 ms':>17} | {'added TTFT p99 ms':>17} | "
        f"{'tokens/s ratio':>14} | {'Envoy CPU us/tok':>16} | {'Envoy ÷ gateway CPU':>19}"
    )
    print("-" * 108)
    for path in (GRPC, SSE):
        for conc in args.concurrency:
            d, e = by[("direct", path, conc)], by[("envoy", path, conc)]
            s = {
                "path": path,
                "concurrency": conc,
                "added_ttft_p50_ms": e.ttft_p50_ms - d.ttft_p50_ms,
                "added_ttft_p99_ms": e.ttft_p99_ms - d.ttft_p99_ms,
                "tokens_per_s_ratio": e.tokens_per_s / d.tokens_per_s,
                "envoy_cpu_us_per_token": e.envoy_cpu_us_per_token,
                "envoy_over_gateway_cpu": e.envoy_cpu_us_per_token / d.gateway_cpu_us_per_token
                if d.gateway_cpu_us_per_token
                else None,
            }
            summary.append(s)
            ratio = s["envoy_over_gateway_cpu"]
            print(
                f"{path:<4} | {conc:>7} | {s['added_ttft_p50_ms']:>17.2f} | "
                f"{s['added_ttft_p99_ms']:>17.2f} | {s['tokens_per_s_ratio']:>14.2f} | "
                f"{e.envoy_cpu_us_per_token:>16.1f} | "
                f"{'-' if ratio is None else f'{ratio:.2f}':>19}"
            )
    out = write_json(
        "envoy.json", {"args": vars(args), "rows": [asdict(r) for r in rows], "summary": summary}
    )
    print(f"\nwrote {out}")
    return 0


def main() -> int:
    import uvloop

    return uvloop.run(main_async(parser(__doc__, [1, 16]).parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
