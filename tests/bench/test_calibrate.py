from __future__ import annotations

import pytest

from bench import calibrate
from bench.workloads import Request, block_tokens

SMALL = calibrate.EngineShape(
    num_kv_blocks=256, max_batch_size=8, max_num_tokens=1024, block_size=16
)


def _reqs(n: int, prompt: int = 64, out: int = 4, gap: float = 1.0) -> list[Request]:
    return [Request(i * gap, block_tokens(9, i, prompt), out) for i in range(n)]


def test_shared_working_set_counts_blocks_in_two_or_more_prompts() -> None:
    head = list(block_tokens(9, 1000, 32))  # two 16-token blocks shared by everyone
    reqs = [Request(0, head + list(block_tokens(9, i, 16)), 1) for i in range(3)]
    reqs.append(Request(0, list(block_tokens(9, 77, 48)), 1))
    assert calibrate.shared_working_set_blocks(reqs, 16) == 2


def test_rr_capacity_is_limited_by_the_slowest_replica() -> None:
    # Replica 0 gets the long prompts (even indices), replica 1 the short ones.
    reqs = [Request(i, block_tokens(9, i, 900 if i % 2 == 0 else 32), 4) for i in range(8)]
    cap = calibrate.rr_capacity(reqs, 2, SMALL)
    slow, fast = cap.per_replica_requests_per_s
    assert slow < fast
    assert cap.requests_per_s == pytest.approx(2 * slow)
    assert cap.output_tokens_per_s == pytest.approx(cap.requests_per_s * 4)


def test_plan_load_sets_time_scale_from_capacity_and_duration() -> None:
    reqs = _reqs(21)  # 20 s of natural arrivals
    plan = calibrate.plan_load(reqs, replicas=2, shape=SMALL, load=0.5, duration_s=10.0)
    assert plan.arrival_time_factor == pytest.approx(0.5)
    assert plan.requests[-1].arrival_s == pytest.approx(10.0)
    assert plan.offered_wall_req_s == pytest.approx(2.0)
    # offered = load * capacity / TIME_SCALE
    assert plan.offered_wall_req_s == pytest.approx(
        plan.load * plan.capacity_model_req_s / plan.emulator_time_scale
    )
    assert plan.capacity_wall_req_s == pytest.approx(4.0)
    assert plan.predicted_rr_ttft_mean_s > 0


def test_open_loop_prediction_with_explicit_assignment() -> None:
    reqs = _reqs(6, gap=10.0)  # far apart: every request finds an idle engine
    rr = calibrate.simulate_open_loop(reqs, 2, SMALL)
    one = calibrate.simulate_open_loop(reqs, 2, SMALL, assign=[0] * 6)
    assert rr.ttft_s == pytest.approx(one.ttft_s)
    assert all(t > 0 for t in rr.ttft_s)


def test_engine_shape_env() -> None:
    env = SMALL.env()
    assert env["LLMMESH_EMULATOR_NUM_KV_BLOCKS"] == "256"
    assert env["LLMMESH_EMULATOR_MAX_NUM_TOKENS"] == "1024"


def test_engine_seconds_add_up_to_about_the_work_of_both_halves() -> None:
    shape = calibrate.EngineShape(num_kv_blocks=4096)
    reqs = [Request(0, list(block_tokens(9, i, 512)), 32) for i in range(16)]
    whole = calibrate.engine_seconds(reqs, shape)
    assert calibrate.engine_seconds([], shape) == 0.0
    assert 0 < calibrate.engine_seconds(reqs[:8], shape) < whole
    # Batched together, the halves take no longer than run one after the other.
    halves = calibrate.engine_seconds(reqs[:8], shape) + calibrate.engine_seconds(reqs[8:], shape)
    assert whole <= halves + 1e-9


def test_a_pool_of_one_is_the_replica_itself() -> None:
    reqs = _reqs(6, prompt=256, gap=0.01)
    one = calibrate.pooled_ttft_s(reqs, 1, SMALL)
    assert one == pytest.approx(calibrate.simulate_open_loop(reqs, 1, SMALL).ttft_s)


def test_the_pooled_engine_serves_a_burst_no_slower_than_round_robin() -> None:
    # A burst of same-size prompts: pooled, k replicas' compute serves them together.
    reqs = [Request(0.0, block_tokens(9, i, 512), 4) for i in range(8)]
    pooled = calibrate.pooled_ttft_s(reqs, 4, SMALL)
    rr = calibrate.simulate_open_loop(reqs, 4, SMALL).ttft_s
    assert max(pooled) <= max(rr) + 1e-9
    assert max(pooled) < max(calibrate.pooled_ttft_s(reqs, 1, SMALL))
    # The answer is per request in the order given, whatever the arrival order.
    shuffled = reqs[::-1]
    assert calibrate.pooled_ttft_s(shuffled, 4, SMALL) == pytest.approx(pooled[::-1])


def test_a_pooled_engine_shares_every_cached_prefix() -> None:
    head = list(block_tokens(9, 1000, 512))
    reqs = [Request(float(i), head + list(block_tokens(9, i, 16)), 1) for i in range(4)]
    pooled = calibrate.pooled_ttft_s(reqs, 4, SMALL)
    rr = calibrate.simulate_open_loop(reqs, 4, SMALL).ttft_s
    # Round robin prefills the head on every replica; the pool once.
    assert all(p < r for p, r in zip(pooled[1:], rr[1:], strict=True))
