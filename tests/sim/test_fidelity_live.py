"""A tiny workload live on the local mesh (emulated replicas) and simulated: the simulator's
TTFT, throughput and hit rate stay within a loose bound of the live run's."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench import workloads as wl
from bench.arms import Arm, MeshSpec, run_arm
from bench.calibrate import EngineShape
from bench.report import summarize
from llmmesh.localmesh import PROBE_INTERVAL_S
from llmmesh.sim import ClusterSpec, Latencies, PoolSpec, simulate

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

TIME_SCALE = 4.0
# The live mesh's fixed per-hop costs (bench/sim_fidelity.py explains them).
LATENCIES = Latencies(
    admit_s=0.004, lookup_s=0.002, dispatch_s=0.003, first_token_s=0.004, completion_s=0.004
)


async def test_tiny_workload_live_and_simulated_agree(tmp_path: Path) -> None:
    requests = wl.shared_prefix(
        groups=3,
        prompts_per_group=12,
        system_tokens=1024,
        question_tokens=64,
        output_tokens=24,
        rate=4.0,
        seed=5,
    )
    shape = EngineShape(num_kv_blocks=512, max_batch_size=16, max_num_tokens=4096)
    run = await run_arm(
        Arm("default", profile="default"),
        MeshSpec(replicas=2, time_scale=TIME_SCALE, shape=shape),
        requests,
        label="sim-fidelity-test",
        workdir=tmp_path / "mesh",
        timeout_s=60.0,
    )
    live = summarize("live", run.results)
    assert live.ok == len(requests)
    # simulate() runs its own (virtual-time) loop: off this test's running loop.
    res = await asyncio.to_thread(
        simulate,
        requests,
        ClusterSpec(
            pools=(
                PoolSpec(
                    2,
                    max_batch_size=shape.max_batch_size,
                    max_num_tokens=shape.max_num_tokens,
                    num_kv_blocks=shape.num_kv_blocks,
                    time_scale=TIME_SCALE,
                ),
            ),
            block_size=shape.block_size,
            metrics_interval_s=PROBE_INTERVAL_S,
            latencies=LATENCIES,
        ),
        "default",
        0,
        oracle=False,
    )
    sim = res.summary
    assert sim.ok == len(requests)
    # Loose: a loaded CI machine delays the live engines and relays (the bounds the benchmark
    # checks are 10%).
    assert sim.ttft_s.p50 == pytest.approx(live.ttft_s.p50, rel=0.5)
    assert sim.throughput_tok_s == pytest.approx(live.throughput_tok_s, rel=0.2)
    assert sim.hit_rate == pytest.approx(live.hit_rate, abs=0.1)
