from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from bench.arms import Arm, MeshSpec, mesh_options
from bench.calibrate import EngineShape
from bench.pools import arms as pool_arms
from bench.pools import (
    build_parser,
    idle_ttft_s,
    long_slo_s,
    short_pool_size,
    short_ttft_floor_s,
    short_work_share,
    workload,
)
from llmmesh.localmesh import LocalMesh, MeshOptions


def test_profile_and_policy_reach_the_orchestrator_only(tmp_path: Path) -> None:
    policy = {"pools": {"short": {"max_prompt_tokens": 2048}}}
    arm = Arm("p", profile="prefix-only", policy=policy, replica_pools=["short", "long"])
    opts = mesh_options(
        arm, MeshSpec(replicas=2, time_scale=3.0, shape=EngineShape(num_kv_blocks=99)), tmp_path
    )
    assert opts.orchestrator_env["LLMMESH_ORCHESTRATOR_PROFILE"] == "prefix-only"
    path = Path(opts.orchestrator_env["LLMMESH_ORCHESTRATOR_POLICY_FILE"])
    assert yaml.safe_load(path.read_text()) == policy
    assert opts.replica_pools == ["short", "long"]
    assert opts.emulator_env["LLMMESH_EMULATOR_NUM_KV_BLOCKS"] == "99"
    assert opts.time_scale == 3.0
    assert "LLMMESH_ORCHESTRATOR_PROFILE" not in opts.extra_env


def test_default_arm_sets_nothing(tmp_path: Path) -> None:
    opts = mesh_options(Arm("fifo"), MeshSpec(replicas=4, time_scale=1.0), tmp_path)
    assert opts.orchestrator_env == {}
    assert opts.replica_pools is None


def test_pool_arms() -> None:
    fifo, pools = pool_arms(4, 1)
    assert fifo.policy is None
    assert fifo.replica_pools is None
    assert pools.replica_pools == ["short", "long", "long", "long"]
    assert pools.policy is not None
    assert set(pools.policy["pools"]) == {"short", "long"}
    with pytest.raises(ValueError, match="short-replicas"):
        pool_arms(4, 4)


@pytest.mark.parametrize(
    ("pools", "expected"),
    [(None, {}), (["short", "long"], {"pool": "long"})],
)
def test_localmesh_replica_pool(
    tmp_path: Path, pools: list[str] | None, expected: dict[str, str]
) -> None:
    mesh = LocalMesh(MeshOptions(replicas=2, workdir=tmp_path, replica_pools=pools))
    assert mesh._replica_pool(1) == expected


def test_localmesh_replica_pools_must_name_every_replica(tmp_path: Path) -> None:
    mesh = LocalMesh(MeshOptions(replicas=3, workdir=tmp_path, replica_pools=["a"]))
    with pytest.raises(ValueError, match="1 pools for 3 replicas"):
        mesh._replica_pool(0)


@pytest.mark.parametrize(
    ("replicas", "share", "expected"),
    [(8, 0.062, 1), (16, 0.062, 1), (16, 0.07, 2), (4, 0.5, 2), (4, 0.99, 3), (2, 0.0, 1)],
)
def test_short_pool_is_its_share_of_the_work_rounded_up(
    replicas: int, share: float, expected: int
) -> None:
    assert short_pool_size(replicas, share) == expected


def test_short_work_share_and_floor() -> None:
    args = build_parser().parse_args(["--requests", "60"])
    reqs = workload(args)
    shape = EngineShape()
    share = short_work_share(reqs, shape)
    # Short prompts are ~30x shorter than long ones and outputs ~2x: a small share.
    assert 0.0 < share < 0.3
    floor = short_ttft_floor_s(reqs, shape)
    assert 0.0 < floor < 0.05


def test_the_long_slo_is_twice_a_long_prompts_idle_prefill_unless_given() -> None:
    """At 2 s every long request met it in every arm (p99 0.34-0.57 s), so the goodput ratio
    was 1.000 whatever the pools did."""
    args = build_parser().parse_args(["--requests", "60"])
    reqs = workload(args)
    shape = EngineShape()
    idle = idle_ttft_s(reqs, shape, "long")
    assert short_ttft_floor_s(reqs, shape) < idle < 1.0  # 6-8k tokens: one or two steps
    small = dataclasses.replace(shape, max_num_tokens=1024)  # chunked prefill: more steps
    assert idle_ttft_s(reqs, small, "long") > idle
    assert long_slo_s(args, reqs, shape) == pytest.approx(2 * idle)
    given = build_parser().parse_args(["--requests", "60", "--long-slo-s", "1.5"])
    assert long_slo_s(given, reqs, shape) == 1.5
