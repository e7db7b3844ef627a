"""`make bench-burst`: the overload issue's reproduction, all requests sent at once.

One local emulator mesh with the shipped settings (`--replicas` 2 Triton replicas, the
emulator's default batch size and time scale, no admission wait bound at the gateway), and
for each burst size in `--sizes` (100 400 1000): that many requests of `--prompt-tokens` (64)
unique prompt tokens and `--output-tokens` (100) output tokens, the priority mix of
`bench-overload` (20/60/20% interactive/standard/batch), unkeyed gRPC requests with a client
deadline of `--timeout-s` (120 s), all sent at the same instant. The issue saw, before any of
its work: at 400, 16 streams cut with DEADLINE_EXCEEDED after ~100 tokens and 39 UNAVAILABLE;
at 1000, one replica's Python-backend stub dead ("Stub process ... is not healthy") and 43%
failed.

Per burst: requests served, refused by code (and how many carried retry-after), other failures
by code, streams cut after their first token, engine deaths (the supervisor's replica restarts
plus Triton's "not healthy" stub reports in the replica logs), TTFT p50/p99 of the served,
and whether a lone request is served within the SLO afterwards (seconds until it is). JSON
goes to bench-results/. Targets: no stream cut, no engine death, every failure a refusal with
retry-after, the mesh serving again afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.client import GatewayClient
from bench.overload import Mesh, count_refusals, mixed_request, pct, recovered
from bench.replay import Result, replay
from bench.report import eprint, write_json
from bench.workloads import Request
from llmmesh.localmesh import LocalMesh, MeshOptions


def burst(n: int, prompt_tokens: int, output_tokens: int, seed: int) -> list[Request]:
    """`n` requests arriving at 0: unique prompts, the priority mix."""
    rng = random.Random(seed)
    return [mixed_request(rng, 0.0, i, prompt_tokens, output_tokens, seed) for i in range(n)]


@dataclass
class Burst:
    size: int
    served: int
    refused: dict[str, int]
    refused_with_retry_after: dict[str, int]
    failures: dict[str, int]  # every outcome but "ok", refusals included
    cut_after_first_token: int
    ttft_ms: dict[str, float | None]
    engine_deaths: int = 0
    recovery_s: float | None = None
    served_by_priority: dict[str, int] = field(default_factory=dict)


def summarize(size: int, results: Sequence[Result]) -> Burst:
    """One burst's numbers from its per-request results (no mesh needed: unit-tested)."""
    ok = [r for r in results if r.ok]
    refused, with_retry_after = count_refusals(results)
    ttft = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    return Burst(
        size=size,
        served=len(ok),
        refused=dict(refused),
        refused_with_retry_after=dict(with_retry_after),
        failures=dict(Counter(r.outcome for r in results if not r.ok)),
        cut_after_first_token=sum(1 for r in results if not r.ok and r.output_tokens > 0),
        ttft_ms={"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
        served_by_priority=dict(Counter(str(r.meta.get("priority")) for r in ok)),
    )


def targets(b: Burst) -> dict[str, bool]:
    refusals = sum(b.refused.values())
    return {
        "0 streams cut": b.cut_after_first_token == 0,
        "0 engine deaths": b.engine_deaths == 0,
        "every failure a refusal with retry-after": (
            sum(b.failures.values()) == refusals
            and refusals == sum(b.refused_with_retry_after.values())
        ),
        "serving again": b.recovery_s is not None,
    }


def table(bursts: Sequence[Burst]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    head = (
        f"{'burst':>5} {'served':>6}  {'refused (with retry-after)':<34} {'other failures':<28} "
        f"{'TTFT p50/p99 ms':>16} {'cut':>4} {'deaths':>6} {'recovery':>8}"
    )
    lines = [head]
    for b in bursts:
        refused = ", ".join(
            f"{c}:{n}({b.refused_with_retry_after.get(c, 0)})" for c, n in b.refused.items()
        )
        other = dict(b.failures)
        for code, n in b.refused.items():
            other[code] = other.get(code, 0) - n
        others = ", ".join(f"{c}:{n}" for c, n in other.items() if n) or "-"
        recovery = "-" if b.recovery_s is None else f"{b.recovery_s:.0f}s"
        lines.append(
            f"{b.size:>5} {b.served:>6}  {refused or '-':<34} {others:<28} "
            f"{ms(b.ttft_ms['p50']) + '/' + ms(b.ttft_ms['p99']):>16} "
            f"{b.cut_after_first_token:>4} {b.engine_deaths:>6} {recovery:>8}"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.burst", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 400, 1000])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=100)
    p.add_argument("--timeout-s", type=float, default=120.0, help="client deadline per request")
    p.add_argument("--slo-s", type=float, default=2.0, help="TTFT of the lone request after")
    p.add_argument("--out", default="burst")
    return p


async def main_async(args: argparse.Namespace) -> int:
    mesh = LocalMesh(MeshOptions(replicas=args.replicas, log_json=True))
    await mesh.start()
    bursts: list[Burst] = []
    try:
        m = Mesh(mesh)
        client = GatewayClient(
            mesh.services["gateway"].address, timeout_s=args.timeout_s, keyed=False
        )
        await client.wait_ready()
        try:
            for seed, size in enumerate(args.sizes, start=1):
                deaths = m.engine_deaths()
                eprint(f"burst of {size} ...")
                results = await replay(
                    burst(size, args.prompt_tokens, args.output_tokens, seed),
                    client,
                    max_in_flight=size,
                    request_id_prefix=f"burst-{size}",
                )
                b = summarize(size, results)
                b.recovery_s = await recovered(client, args, seed)
                b.engine_deaths = m.engine_deaths() - deaths
                eprint(f"  served {b.served}/{size}, failures {b.failures}")
                bursts.append(b)
        finally:
            await client.close()
    finally:
        await mesh.stop()
    print(table(bursts))
    verdicts = {str(b.size): targets(b) for b in bursts}
    for size, checks in verdicts.items():
        print(
            f"burst {size}: "
            + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in checks.items())
        )
    payload: dict[str, Any] = {
        "args": vars(args),
        "bursts": [asdict(b) for b in bursts],
        "targets": verdicts,
    }
    print(f"wrote {write_json(f'{args.out}.json', payload)}")
    return 0 if all(all(v.values()) for v in verdicts.values()) else 1


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(main_async(parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
