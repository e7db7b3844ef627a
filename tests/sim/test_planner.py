"""The capacity planner on a toy profile whose answer is known in closed form."""

from __future__ import annotations

import dataclasses

import pytest

from bench.workloads import Request
from llmmesh import accelerators
from llmmesh.sim import ClusterSpec, PoolSpec
from llmmesh.sim.planner import Targets, plan

# Every iteration takes 0.5 s whatever it does (tiny model, fixed overhead).
TOY = dataclasses.replace(
    accelerators.LLAMA_3_1_8B_H100_BF16,
    name="toy",
    params=1.0,
    n_layers=1,
    n_heads=1,
    n_kv_heads=1,
    head_dim=1,
    overhead_s=0.5,
)


def test_planner_finds_the_known_replica_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """40 one-token requests arrive together; a replica runs one at a time (batch 1), 0.5 s
    each, so its k-th request sees TTFT 0.5 k. p99 TTFT <= 2.01 s allows 4 per replica:
    10 replicas (9 leave some replica 5 deep: 2.5 s)."""
    monkeypatch.setitem(accelerators.PROFILES, "toy", TOY)
    requests = [Request(0.0, [100 + i, 7, 8, 9], 1) for i in range(40)]
    requests.append(Request(360.0, [5, 6, 7, 8], 1))  # 41 output tokens in 0.1 h
    cheap = PoolSpec(0, profile="toy", max_batch_size=1, num_kv_blocks=64, price_per_hour=1.0)
    dear = dataclasses.replace(cheap, price_per_hour=3.0, max_batch_size=2)
    options = plan(
        requests,
        [cheap, dear],
        Targets(ttft_p99_s=2.01, itl_p99_s=0.05),  # steps are 0.5 s plus ~1e-12
        base=ClusterSpec(block_size=4),
        profile="round-robin",
    )
    by_price = {o.pools[0].usd_per_hour: o for o in options}
    assert by_price[1.0].pools[0].replicas == 10
    assert by_price[1.0].feasible
    assert by_price[1.0].usd_per_hour == pytest.approx(10.0)
    # 410 output tokens per hour: $10/h is 10 / 410 * 1e6 per million.
    assert by_price[1.0].usd_per_m_output == pytest.approx(10.0 / 410 * 1e6, rel=1e-3)
    # Batch 2: an idle engine starts iterating with the first request that reaches it, then
    # takes two per step, so 1 + 2 + 2 + 2 = 7 requests within 2 s: ceil(40 / 7) = 6 replicas.
    assert by_price[3.0].pools[0].replicas == 6
    assert options[0].usd_per_hour == pytest.approx(10.0)  # the cheapest first
