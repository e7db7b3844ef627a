"""Shared plumbing of the comparison benchmarks (`bench.routing`, `bench.pools`): run every arm
on the same requests in one process, one fresh mesh per arm, and collect what the tables and the
JSON need."""

from __future__ import annotations

import hashlib
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.arms import Arm, ArmRun, MeshSpec, run_arm
from bench.replay import Result
from bench.report import Summary, eprint, summarize, summary_dict
from bench.workloads import Request

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".build" / "bench"


@dataclass
class WorkloadRun:
    workload: str
    runs: list[ArmRun]
    summaries: list[Summary]

    def summary(self, arm: str) -> Summary:
        return next(s for s in self.summaries if s.arm == arm)


async def run_arms(
    experiment: str,
    workload: str,
    arms: Sequence[Arm],
    spec: MeshSpec,
    requests: Sequence[Request],
    *,
    oracle: float = math.nan,
    max_in_flight: int = 512,
    summarize_fn: Callable[[str, Sequence[Result], float], Summary] | None = None,
) -> WorkloadRun:
    runs: list[ArmRun] = []
    summaries: list[Summary] = []
    for arm in arms:
        label = f"{experiment}/{workload}/{arm.name}"
        t = time.monotonic()
        run = await run_arm(
            arm,
            spec,
            requests,
            label=label,
            workdir=WORK / experiment / workload / arm.name,
            max_in_flight=max_in_flight,
        )
        s = (
            summarize_fn(arm.name, run.results, oracle)
            if summarize_fn
            else summarize(arm.name, run.results, oracle=oracle)
        )
        eprint(
            f"[{label}] {s.ok}/{s.requests} ok, mean TTFT {s.ttft_s.mean:.3f}s, "
            f"{s.throughput_tok_s:.0f} tok/s, hit {s.hit_rate:.3f}, replicas {s.replicas}, "
            f"{time.monotonic() - t:.0f}s with mesh start/stop"
            + (f", errors {s.errors}" if s.errors else "")
        )
        runs.append(run)
        summaries.append(s)
    return WorkloadRun(workload, runs, summaries)


def compact_results(results: Sequence[Result]) -> list[dict[str, Any]]:
    """Per-request records for the JSON file (token gaps left out to keep it small)."""
    return [
        {
            "index": r.index,
            "scheduled_s": round(r.scheduled_s, 6),
            "send_lag_s": round(r.send_lag_s, 6),
            "ttft_s": None if r.ttft_s is None else round(r.ttft_s, 6),
            "itl_mean_s": None if r.itl_mean_s is None else round(r.itl_mean_s, 6),
            "e2e_s": None if r.e2e_s is None else round(r.e2e_s, 6),
            "prompt_tokens": r.prompt_tokens,
            "output_tokens": r.output_tokens,
            "cached_prompt_tokens": r.cached_prompt_tokens,
            "replica_id": r.replica_id,
            "queue_ms": round(r.queue_ms, 3),
            "outcome": r.outcome,
            "error": r.error,
            "meta": r.meta,
        }
        for r in results
    ]


def workload_json(wr: WorkloadRun, spec: MeshSpec, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "mesh": {
            "replicas": spec.replicas,
            "emulator_time_scale": spec.time_scale,
            "engine": {
                "num_kv_blocks": spec.shape.num_kv_blocks,
                "max_batch_size": spec.shape.max_batch_size,
                "max_num_tokens": spec.shape.max_num_tokens,
                "block_size": spec.shape.block_size,
                "cost_profile": spec.shape.cost_profile,
            },
            "context_length": spec.context_length,
        },
        **extra,
        "arms": [
            {
                "name": run.arm.name,
                "profile": run.arm.profile,
                "policy": run.arm.policy,
                "replica_pools": run.arm.replica_pools,
                "wall_s": run.wall_s,
                "logs": run.workdir,
                "replica_status": run.replica_status,
                "summary": summary_dict(s),
                "requests": compact_results(run.results),
            }
            for run, s in zip(wr.runs, wr.summaries, strict=True)
        ],
    }


CODE_DIRS = ("services", "llmmesh", "model_repository")


def code_fingerprint() -> str:
    """Hash of the paths and modification times of the code under test: compared at the start
    and the end of a run, it tells whether someone changed the services mid-run."""
    h = hashlib.sha256()
    for d in CODE_DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            h.update(f"{path.relative_to(ROOT)}:{path.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [
        line[3:]
        for line in git("status", "--porcelain").splitlines()
        if line[3:].startswith(tuple(f"{d}/" for d in CODE_DIRS))
    ]
    return {"head": git("rev-parse", "HEAD"), "dirty_code_files": dirty}


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": git_state(),
        "code_fingerprint": code_fingerprint(),
    }


def check_code_unchanged(env: dict[str, Any]) -> bool:
    """Warn (stderr) and return False when the code under test changed since `environment()`."""
    now = code_fingerprint()
    if now != env["code_fingerprint"]:
        eprint(
            "WARNING: services/llmmesh/model_repository sources changed during this run; "
            "arms may have run different code"
        )
        return False
    return True
