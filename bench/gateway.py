"""`make bench-gateway`: what each gateway front costs, in one run on the same engines.

Arms (emulated Triton replicas on this machine, distinct prompts, no request ids):
- triton-direct: the gateway's Triton streaming client straight to a replica (the baseline);
- gateway gRPC: `GatewayService/Generate`;
- gateway gRPC keyed: the same with a unique request id, i.e. through the idempotency store
  (informational: what keeping a request resumable costs);
- gateway HTTP: OpenAI `/v1/completions` with `stream: true`, read as raw Server-Sent Events
  with aiohttp (no SDK: this measures the gateway, not a client library).

At 1 and a higher concurrency: TTFT p50/p99 and the TTFT added over direct, tokens/s relayed,
and the gateway process's CPU-seconds per 1k tokens (utime + stime from /proc/<pid>/stat around
each arm). The verdict: HTTP overhead ÷ gRPC overhead (gateway CPU per token) ≤ 1.5. Pinned as
bench-overhead (engines and load generator on one CPU, the mesh's services on another; --no-pin).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import grpc

from bench.overhead import (
    MESH_SERVICES,
    Sample,
    direct_sample,
    distinct_prompt,
    grpc_sample,
    parser,
    pct,
    pin,
    pinning,
    run_level,
)
from bench.report import write_json
from llmmesh.generated.gateway.v1 import gateway_pb2_grpc as pb_grpc
from llmmesh.localmesh import MODEL_NAME, LocalMesh, MeshOptions
from services.gateway.triton_stream import TritonPool

DIRECT, GRPC, KEYED, HTTP = "triton-direct", "gateway gRPC", "gRPC keyed", "gateway HTTP"
BUDGET = 1.5


@dataclass
class Row:
    path: str
    concurrency: int
    requests: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    tokens_per_s: float
    gateway_cpu_s_per_1k_tokens: float


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime 14 and stime 15 (1-based, proc(5)).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def http_sample(
    session: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int, seed: int
) -> Sample:
    """One streamed completion over raw SSE; tokens from the final usage chunk."""
    body = {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = 0.0
    tokens = 0
    async with session.post(url, json=body) as resp:
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


async def main_async(args: argparse.Namespace) -> int:
    mesh = LocalMesh(MeshOptions(replicas=args.replicas, time_scale=args.time_scale, log_json=True))
    await mesh.start()
    rows: list[Row] = []
    try:
        gw = mesh.services["gateway"]
        assert gw.proc is not None
        gw_pid = gw.proc.pid
        cores = pinning(not args.no_pin)  # as bench-overhead: engines + load | mesh
        if cores is not None:
            pin([os.getpid(), *(t.pid for t in mesh.tritons if t.pid is not None)], cores[0])
            pin(
                [p.pid for n in MESH_SERVICES if (p := mesh.services[n].proc) is not None], cores[1]
            )
        channel = grpc.aio.insecure_channel(gw.address)
        stub = pb_grpc.GatewayServiceStub(channel)
        pool = TritonPool()
        connector = aiohttp.TCPConnector(limit=0)
        session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=300)
        )
        url = f"{gw.http_base_url}/v1/completions"

        def prompt(i: int) -> list[int]:
            return distinct_prompt(i, args.prompt_tokens)

        async def direct(i: int) -> Sample:
            address = mesh.tritons[i % len(mesh.tritons)].grpc_address
            return await direct_sample(pool, address, prompt(i), args.output_tokens, i)

        async def via_grpc(i: int) -> Sample:
            return await grpc_sample(stub, prompt(i), args.output_tokens, i)

        async def via_grpc_keyed(i: int) -> Sample:
            return await grpc_sample(stub, prompt(i), args.output_tokens, i, f"bench-{i}")

        async def via_http(i: int) -> Sample:
            return await http_sample(session, url, prompt(i), args.output_tokens, i)

        arms: dict[str, Callable[[int], Awaitable[Sample]]] = {
            DIRECT: direct,
            GRPC: via_grpc,
            KEYED: via_grpc_keyed,
            HTTP: via_http,
        }
        for fn in arms.values():  # warm up channels, connections, tokenizer, engines
            await run_level(fn, 2, 4)
        offset = 0
        for conc in args.concurrency:
            requests = max(args.min_requests, conc * args.rounds)
            for name, fn in arms.items():
                base = offset  # every arm and level gets prompts no arm saw before

                async def one(
                    i: int, fn: Callable[[int], Awaitable[Sample]] = fn, base: int = base
                ) -> Sample:
                    return await fn(base + i)

                cpu0 = process_cpu_s(gw_pid)
                samples, wall = await run_level(one, conc, requests)
                cpu = process_cpu_s(gw_pid) - cpu0
                offset += requests
                ttfts = [s.ttft_s * 1000 for s in samples]
                tokens = sum(s.tokens for s in samples)
                rows.append(
                    Row(
                        name,
                        conc,
                        requests,
                        pct(ttfts, 0.5),
                        pct(ttfts, 0.99),
                        tokens / wall,
                        # The direct arm never touches the gateway: its figure is the idle cost.
                        cpu / tokens * 1000 if tokens else 0.0,
                    )
                )
                print(f"  measured {name} x{conc}", flush=True)
        await session.close()
        await pool.close()
        await channel.close(None)
    finally:
        await mesh.stop()

    print()
    print(
        f"{'streams':>7} | {'path':<14} | {'TTFT p50 ms':>11} | {'TTFT p99 ms':>11} | "
        f"{'tokens/s':>9} | {'gw CPU s/1k tok':>15}"
    )
    print("-" * 84)
    for r in rows:
        print(
            f"{r.concurrency:>7} | {r.path:<14} | {r.ttft_p50_ms:>11.2f} | {r.ttft_p99_ms:>11.2f} | "
            f"{r.tokens_per_s:>9.0f} | {r.gateway_cpu_s_per_1k_tokens:>15.4f}"
        )
    by = {(r.path, r.concurrency): r for r in rows}
    summary = []
    print()
    print(
        f"{'streams':>7} | {'added TTFT p50 ms gRPC/HTTP':>27} | {'added TTFT p99 ms gRPC/HTTP':>27} | "
        f"{'tok/s per gw process gRPC/HTTP':>30} | {'HTTP÷gRPC CPU':>13} | {'<= 1.5x':>8}"
    )
    print("-" * 128)
    for conc in args.concurrency:
        d, g, h, k = by[(DIRECT, conc)], by[(GRPC, conc)], by[(HTTP, conc)], by[(KEYED, conc)]
        ratio = (
            h.gateway_cpu_s_per_1k_tokens / g.gateway_cpu_s_per_1k_tokens
            if g.gateway_cpu_s_per_1k_tokens
            else float("inf")
        )
        s = {
            "concurrency": conc,
            "grpc_added_ttft_p50_ms": g.ttft_p50_ms - d.ttft_p50_ms,
            "http_added_ttft_p50_ms": h.ttft_p50_ms - d.ttft_p50_ms,
            "grpc_added_ttft_p99_ms": g.ttft_p99_ms - d.ttft_p99_ms,
            "http_added_ttft_p99_ms": h.ttft_p99_ms - d.ttft_p99_ms,
            "grpc_tokens_per_s": g.tokens_per_s,
            "http_tokens_per_s": h.tokens_per_s,
            "grpc_gateway_cpu_s_per_1k_tokens": g.gateway_cpu_s_per_1k_tokens,
            "http_gateway_cpu_s_per_1k_tokens": h.gateway_cpu_s_per_1k_tokens,
            "http_over_grpc_overhead": ratio,
            "keyed_grpc_gateway_cpu_s_per_1k_tokens": k.gateway_cpu_s_per_1k_tokens,
            "keyed_over_grpc_cpu": k.gateway_cpu_s_per_1k_tokens / g.gateway_cpu_s_per_1k_tokens
            if g.gateway_cpu_s_per_1k_tokens
            else None,
            # Informational: added TTFT is noisier than CPU per token on a shared machine.
            "http_over_grpc_added_ttft_p50": (h.ttft_p50_ms - d.ttft_p50_ms)
            / (g.ttft_p50_ms - d.ttft_p50_ms)
            if g.ttft_p50_ms > d.ttft_p50_ms
            else None,
            "within_budget": ratio <= BUDGET,
        }
        summary.append(s)
        added_p50 = f"{s['grpc_added_ttft_p50_ms']:.2f} / {s['http_added_ttft_p50_ms']:.2f}"
        added_p99 = f"{s['grpc_added_ttft_p99_ms']:.2f} / {s['http_added_ttft_p99_ms']:.2f}"
        tps = f"{g.tokens_per_s:.0f} / {h.tokens_per_s:.0f}"
        verdict = "yes" if s["within_budget"] else "NO"
        print(
            f"{conc:>7} | {added_p50:>27} | {added_p99:>27} | {tps:>30} | {ratio:>13.2f} | {verdict:>8}"
        )
    out = write_json(
        "gateway.json",
        {
            "args": vars(args),
            "budget_http_over_grpc": BUDGET,
            "rows": [asdict(r) for r in rows],
            "summary": summary,
        },
    )
    print(f"\nwrote {out}")
    return 0


def main() -> int:
    import uvloop

    return uvloop.run(main_async(parser(__doc__, [1, 32]).parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
