"""`make bench-backlog`: what an orchestrator's Admit costs while a queue waits for a full pool.

The director in process (no gRPC), pinned to the mesh's CPU: `--long` replicas in a long pool
(2 leases each) and `--short` in a short pool (default cap), all ready, default profile. The long
pool is filled, then `--waiting` long requests (each its own prompt length) queue for it; then
`--requests` short requests each Admit and complete at once, as requests flow through the pool
that has room while the other is backlogged. Each completion is an event: a pass over the queue.

Reported per queue length: wall and CPU (time.process_time) per short Admit and completion, and
the ratio to the run's empty-queue figure. A pass over the queue is O(queue) (each waiter is at
least checked); a decision is O(replicas): a pass that decided once per waiter would cost
O(queue x replicas) per event, which the ratio shows. The waiters must still be queued at the
end (none granted to a pool they may not use, none refused); the run fails otherwise. Writes
bench-results/backlog.json; `--compare` prints an earlier run's figures beside these.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from typing import Any

from bench.coldpath import ReadyProbe
from bench.overhead import pinning
from bench.report import format_table, write_json
from services.orchestrator.director import Orchestrator
from services.orchestrator.domain import AdmissionRequest, Outcome
from services.orchestrator.policy import Policy, PoolPolicy
from services.orchestrator.settings import OrchestratorSettings, ReplicaSpec

MODEL = "tensorrt_llm"
SHORT_MAX = 1000  # tokens: the short pool's longest prompt
LONG_PROMPT = 5000  # tokens: the queued requests' prompts start here


async def one_level(long: int, short: int, waiting: int, requests: int) -> dict[str, Any]:
    specs = [
        ReplicaSpec(id=f"long{i}", grpc_address=f"127.0.0.1:{9000 + i}", pool="long")
        for i in range(long)
    ] + [
        ReplicaSpec(id=f"short{i}", grpc_address=f"127.0.0.1:{10000 + i}", pool="short")
        for i in range(short)
    ]
    policy = Policy(
        pools={
            "short": PoolPolicy(max_prompt_tokens=SHORT_MAX),
            "long": PoolPolicy(max_prompt_tokens=16 * LONG_PROMPT, max_in_flight_per_replica=2),
        }
    )
    # Standard requests may hold half the queue (`queue_share_standard`).
    core = Orchestrator(
        OrchestratorSettings(replicas=specs, max_queue=2 * waiting + 16), ReadyProbe(), policy
    )
    await core.probe_once()

    def req(rid: str, tokens: int) -> AdmissionRequest:
        return AdmissionRequest(rid, MODEL, list(range(tokens)), 64)

    held = [await core.admit(req(f"held{i}", LONG_PROMPT), 10.0) for i in range(2 * long)]
    queued = [
        asyncio.ensure_future(core.admit(req(f"wait{i}", LONG_PROMPT + i), 3600.0))
        for i in range(waiting)
    ]
    await asyncio.sleep(0)  # one tick: each admit task runs to its wait in the queue
    if core.queue_depth != waiting:
        raise SystemExit(f"{waiting - core.queue_depth} long requests were not queued")
    for i in range(20):  # warm up
        lease = await core.admit(req(f"warm{i}", 500), 1.0)
        core.complete(lease.lease_id, Outcome.SUCCESS)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(requests):
        lease = await core.admit(req(f"short{i}", 500), 1.0)
        if not lease.replica.id.startswith("short"):
            raise SystemExit(f"a short request went to {lease.replica.id}")
        core.complete(lease.lease_id, Outcome.SUCCESS)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if core.queue_depth != waiting or any(t.done() for t in queued):
        raise SystemExit(f"{waiting - core.queue_depth} queued long requests left the queue")
    for t in queued:
        t.cancel()
    await asyncio.gather(*queued, return_exceptions=True)
    for lease in held:
        core.complete(lease.lease_id, Outcome.SUCCESS)
    return {
        "waiting": waiting,
        "wall_us_per_request": wall / requests * 1e6,
        "cpu_us_per_request": cpu / requests * 1e6,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    split = pinning(not args.no_pin)
    if split is not None:
        os.sched_setaffinity(0, split[1])
    rows = []
    for waiting in args.waiting:
        row = await one_level(args.long, args.short, waiting, args.requests)
        print(f"  {waiting} waiting: {row['cpu_us_per_request']:.0f} us CPU", flush=True)
        rows.append(row)
    empty = next((r["cpu_us_per_request"] for r in rows if r["waiting"] == 0), None)
    for r in rows:
        r["x_empty"] = None if not empty else r["cpu_us_per_request"] / empty
    return {
        "pinned_cpus": None if split is None else sorted(split[1]),
        "replicas": {"long": args.long, "short": args.short},
        "rows": rows,
    }


def table(result: dict[str, Any], before: dict[str, Any] | None) -> str:
    earlier = {r["waiting"]: r for r in (before or {}).get("rows", [])}
    headers = ["queued long requests", "wall us", "CPU us", "CPU x empty queue"]
    if before is not None:
        headers += ["before: CPU us", "before: x empty"]
    rows = []
    for r in result["rows"]:
        line = [
            str(r["waiting"]),
            f"{r['wall_us_per_request']:.0f}",
            f"{r['cpu_us_per_request']:.0f}",
            "-" if r["x_empty"] is None else f"{r['x_empty']:.2f}",
        ]
        if before is not None:
            b = earlier.get(r["waiting"])
            line += (
                ["-", "-"]
                if b is None
                else [f"{b['cpu_us_per_request']:.0f}", f"{b.get('x_empty') or 0:.2f}"]
            )
        rows.append(line)
    return format_table(headers, rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--long", type=int, default=4, help="Replicas in the long pool.")
    p.add_argument("--short", type=int, default=60, help="Replicas in the short pool.")
    p.add_argument("--waiting", type=int, nargs="+", default=[0, 100, 1000])
    p.add_argument("--requests", type=int, default=200, help="Short requests per level.")
    p.add_argument("--no-pin", action="store_true", help="Do not pin to the mesh's CPU.")
    p.add_argument("--compare", help="An earlier run's JSON: its figures beside these.")
    p.add_argument("--output", default="backlog.json")
    args = p.parse_args()
    if 0 not in args.waiting:
        p.error("--waiting must include 0 (the ratios are to the empty queue)")
    before = None
    if args.compare:
        with open(args.compare) as f:
            before = json.load(f)
    logging.disable(logging.WARNING)  # replica readiness logs
    result = asyncio.run(main_async(args))
    print()
    print(table(result, before))
    path = write_json(args.output, result)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
