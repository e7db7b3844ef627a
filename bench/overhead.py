"""`make bench-overhead`: what the mesh adds on top of Triton.

Same run, same engines (emulated Triton replicas on this machine):
- direct: the gateway's own Triton streaming client straight to a replica (no gateway process,
  no orchestrator);
- mesh: the gateway's gRPC API (gateway → orchestrator Admit → Triton stream → relay);
- bare: a bare grpc.aio server streaming the same number of messages per request, with no work
  per message: the ceiling for relay throughput in one Python process.
At 1, 32 and 128 concurrent streams: TTFT p50/p99 (direct vs mesh, and the difference), tokens/s
relayed, and the CPU time the gateway and orchestrator processes spent per token (/proc: unlike
latency and throughput it does not move with what else the machine runs); ratios are against
numbers measured in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass

import grpc

from bench.report import write_json
from llmmesh.common.topology import TRITON_MODEL
from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.gateway.v1 import gateway_pb2_grpc as pb_grpc
from llmmesh.localmesh import MODEL_NAME, LocalMesh, MeshOptions
from services.gateway.triton_stream import EngineRequest, TritonPool


@dataclass
class Sample:
    ttft_s: float
    tokens: int
    total_s: float


@dataclass
class Row:
    path: str
    concurrency: int
    requests: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    tokens_per_s: float
    # CPU time the mesh's own processes spent per relayed token (from /proc; mesh path only)
    gateway_cpu_us_per_token: float | None = None
    orchestrator_cpu_us_per_token: float | None = None


def distinct_prompt(i: int, tokens: int) -> list[int]:
    """Distinct prompts: the benchmarks measure relay cost, not prefix routing."""
    return [100 + (i * 7919 + k) % 40000 for k in range(tokens)]


async def grpc_sample(
    stub: pb_grpc.GatewayServiceAsyncStub,
    prompt: list[int],
    max_tokens: int,
    seed: int,
    request_id: str = "",
) -> Sample:
    """One Generate call timed at the client; without a request id (an idempotency key) unless
    one is given."""
    req = pb.GenerateRequest(
        model=MODEL_NAME,
        token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingParams(max_tokens=max_tokens, seed=seed),
        request_id=request_id,
    )
    start = time.perf_counter()
    first = 0.0
    n = 0
    async for msg in stub.Generate(req, timeout=300):
        if msg.HasField("delta") and msg.delta.token_ids:
            if n == 0:
                first = time.perf_counter() - start
            n += len(msg.delta.token_ids)
    return Sample(first, n, time.perf_counter() - start)


async def direct_sample(
    pool: TritonPool, address: str, prompt: list[int], max_tokens: int, seed: int
) -> Sample:
    """One stream straight to a Triton replica with the gateway's own client."""
    er = EngineRequest(
        f"d{seed}-{time.perf_counter_ns()}",
        TRITON_MODEL,
        prompt,
        max_tokens,
        2,
        1.0,
        1.0,
        0,
        seed,
    )
    start = time.perf_counter()
    first = 0.0
    n = 0
    async for chunk in pool.stream(address, "", er, timeout_s=300):
        if chunk.token_ids:
            if n == 0:
                first = time.perf_counter() - start
            n += len(chunk.token_ids)
    return Sample(first, n, time.perf_counter() - start)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def run_level(
    one: Callable[[int], Awaitable[Sample]], concurrency: int, requests: int
) -> tuple[list[Sample], float]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    out: list[Sample] = []

    async def worker() -> None:
        while not queue.empty():
            out.append(await one(queue.get_nowait()))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out, time.perf_counter() - start


class BareStreamer:
    """A bare grpc.aio server that streams `n` GenerateResponse messages per call."""

    def __init__(self, tokens: int):
        self.tokens = tokens
        self.server = grpc.aio.server()
        self.port = 0

    async def start(self) -> None:
        tokens = self.tokens

        async def generate(
            request: pb.GenerateRequest, context: object
        ) -> AsyncIterator[pb.GenerateResponse]:
            for i in range(tokens):
                yield pb.GenerateResponse(
                    request_id=request.request_id,
                    delta=pb.TokenDelta(text="x", token_ids=[i], offset=i),
                )

        handler = grpc.method_handlers_generic_handler(
            "llmmesh.gateway.v1.GatewayService",
            {
                "Generate": grpc.unary_stream_rpc_method_handler(
                    generate,
                    request_deserializer=pb.GenerateRequest.FromString,
                    response_serializer=pb.GenerateResponse.SerializeToString,
                )
            },
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (/proc/<pid>/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main_async(args: argparse.Namespace) -> int:
    def prompt(i: int) -> list[int]:
        return distinct_prompt(i, args.prompt_tokens)

    mesh = LocalMesh(MeshOptions(replicas=args.replicas, time_scale=args.time_scale, log_json=True))
    await mesh.start()
    rows: list[Row] = []
    try:
        gw_channel = grpc.aio.insecure_channel(mesh.services["gateway"].address)
        gateway = pb_grpc.GatewayServiceStub(gw_channel)
        pool = TritonPool()
        bare = BareStreamer(args.output_tokens)
        await bare.start()
        bare_channel = grpc.aio.insecure_channel(f"127.0.0.1:{bare.port}")
        bare_stub = pb_grpc.GatewayServiceStub(bare_channel)

        async def via_stub(stub: pb_grpc.GatewayServiceAsyncStub, i: int) -> Sample:
            return await grpc_sample(stub, prompt(i), args.output_tokens, i)

        async def direct(i: int) -> Sample:
            address = mesh.tritons[i % len(mesh.tritons)].grpc_address
            return await direct_sample(pool, address, prompt(i), args.output_tokens, i)

        paths: dict[str, Callable[[int], Awaitable[Sample]]] = {
            "triton-direct": direct,
            "mesh (gateway gRPC)": lambda i: via_stub(gateway, i),
            "bare grpc.aio": lambda i: via_stub(bare_stub, i),
        }
        pids = {}
        for svc in ("gateway", "orchestrator"):
            proc = mesh.services[svc].proc
            assert proc is not None
            pids[svc] = proc.pid
        # Warm up channels, tokenizers and engines.
        for fn in paths.values():
            await run_level(fn, 2, 4)
        for conc in args.concurrency:
            requests = max(args.min_requests, conc * args.rounds)
            for name, fn in paths.items():
                cpu_before = {svc: cpu_seconds(pid) for svc, pid in pids.items()}
                samples, wall = await run_level(fn, conc, requests)
                tokens = sum(s.tokens for s in samples)
                cpu = {
                    svc: (cpu_seconds(pid) - cpu_before[svc]) / max(tokens, 1) * 1e6
                    for svc, pid in pids.items()
                }
                ttfts = [s.ttft_s * 1000 for s in samples]
                mesh_path = name == "mesh (gateway gRPC)"
                rows.append(
                    Row(
                        name,
                        conc,
                        requests,
                        pct(ttfts, 0.5),
                        pct(ttfts, 0.99),
                        tokens / wall,
                        cpu["gateway"] if mesh_path else None,
                        cpu["orchestrator"] if mesh_path else None,
                    )
                )
                print(f"  measured {name} x{conc}", flush=True)
        await pool.close()
        await gw_channel.close(None)
        await bare_channel.close(None)
        await bare.server.stop(None)
    finally:
        await mesh.stop()

    summary = []
    print()
    print(
        f"{'streams':>7} | {'path':<20} | {'TTFT p50 ms':>11} | {'TTFT p99 ms':>11} | {'tokens/s':>9}"
        f" | {'gateway CPU µs/token':>20} | {'orchestrator CPU µs/token':>25}"
    )
    print("-" * 124)
    for r in rows:
        gw = "" if r.gateway_cpu_us_per_token is None else f"{r.gateway_cpu_us_per_token:.1f}"
        orch = (
            ""
            if r.orchestrator_cpu_us_per_token is None
            else f"{r.orchestrator_cpu_us_per_token:.1f}"
        )
        print(
            f"{r.concurrency:>7} | {r.path:<20} | {r.ttft_p50_ms:>11.2f} | {r.ttft_p99_ms:>11.2f} | {r.tokens_per_s:>9.0f}"
            f" | {gw:>20} | {orch:>25}"
        )
    print()
    print(
        f"{'streams':>7} | {'added TTFT p50 ms':>17} | {'added TTFT p99 ms':>17} | {'mesh/direct tok/s':>17} | {'mesh/bare tok/s':>15}"
    )
    print("-" * 86)
    by = {(r.path, r.concurrency): r for r in rows}
    for conc in args.concurrency:
        d, m, b = (
            by[("triton-direct", conc)],
            by[("mesh (gateway gRPC)", conc)],
            by[("bare grpc.aio", conc)],
        )
        s = {
            "concurrency": conc,
            "added_ttft_p50_ms": m.ttft_p50_ms - d.ttft_p50_ms,
            "added_ttft_p99_ms": m.ttft_p99_ms - d.ttft_p99_ms,
            "mesh_over_direct_throughput": m.tokens_per_s / d.tokens_per_s,
            "mesh_over_bare_throughput": m.tokens_per_s / b.tokens_per_s,
        }
        summary.append(s)
        print(
            f"{conc:>7} | {s['added_ttft_p50_ms']:>17.2f} | {s['added_ttft_p99_ms']:>17.2f} | "
            f"{s['mesh_over_direct_throughput']:>17.2f} | {s['mesh_over_bare_throughput']:>15.2f}"
        )
    out = write_json(
        "overhead.json",
        {"args": vars(args), "rows": [asdict(r) for r in rows], "summary": summary},
    )
    print(f"\nwrote {out}")
    return 0


def parser(doc: str | None, concurrency: list[int]) -> argparse.ArgumentParser:
    """The arguments `bench.overhead` and `bench.gateway` share."""
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument(
        "--time-scale", type=float, default=0.1, help="Emulator time scale (engine speed)."
    )
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=concurrency)
    p.add_argument("--rounds", type=int, default=2, help="Requests per stream at each level.")
    p.add_argument("--min-requests", type=int, default=32)
    return p


def main() -> int:
    import uvloop

    return uvloop.run(main_async(parser(__doc__, [1, 32, 128]).parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
