from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar

import pytest
from prometheus_client import REGISTRY

from services.orchestrator.scheduling.config import (
    BUILTIN_PROFILES,
    PluginConfig,
    ProfileConfig,
    WeightedScorer,
)
from services.orchestrator.scheduling.contracts import (
    PluginParams,
    ReplicaLoad,
    ReplicaView,
    RequestView,
)
from services.orchestrator.scheduling.framework import Scheduler, build_profile, clamp
from services.orchestrator.scheduling.registry import (
    PluginConfigError,
    PluginSpec,
    default_registry,
)
from tests.orchestrator.scheduling.test_plugins import pid, rep, reqv


class Wild:
    """A misbehaving scorer: out-of-range and NaN scores the framework must clamp."""

    TYPE: ClassVar[str] = "wild-scorer"

    def __init__(self, params: PluginParams):
        self.params = params

    def score(self, request: RequestView, replicas: Sequence[ReplicaView]) -> Sequence[float]:
        return [5.0, -3.0, float("nan")][: len(replicas)]


def with_wild() -> tuple[Scheduler, list[ReplicaView]]:
    reg = default_registry()
    reg.register(PluginSpec("wild-scorer", "scorer", PluginParams, Wild))
    profile = build_profile(
        "w",
        reg,
        [PluginConfig(name="wild", type="wild-scorer")],
        {
            "w": ProfileConfig(
                scorers=[WeightedScorer(plugin="wild", weight=2.0)], picker="max-score"
            )
        },
    )
    return Scheduler(profile, random.Random(0)), [rep("a"), rep("b"), rep("c")]


@pytest.mark.parametrize(("x", "y"), [(-1.0, 0.0), (0.3, 0.3), (7.0, 1.0), (float("nan"), 0.0)])
def test_clamp(x: float, y: float) -> None:
    assert clamp(x) == y


def test_scores_are_clamped_and_weighted() -> None:
    sched, replicas = with_wild()
    d = sched.decide(reqv(), replicas)
    assert d.scores == {"a": 2.0, "b": 0.0, "c": 0.0}
    assert d.replica is not None
    assert d.replica.id == "a"


def test_every_plugin_call_is_timed() -> None:
    sched, replicas = with_wild()
    before = REGISTRY.get_sample_value(
        "llmmesh_orchestrator_plugin_duration_seconds_count",
        {"plugin": "wild", "type": "wild-scorer"},
    )
    sched.decide(reqv(), replicas)
    after = REGISTRY.get_sample_value(
        "llmmesh_orchestrator_plugin_duration_seconds_count",
        {"plugin": "wild", "type": "wild-scorer"},
    )
    assert (after or 0) == (before or 0) + 1


def test_replicas_at_cap_are_skipped_but_count_as_candidates() -> None:
    sched = Scheduler(build_profile("least-loaded", default_registry()), random.Random(0))
    d = sched.decide(reqv(), [rep("a", in_flight=8, cap=8)])
    assert d.replica is None
    assert d.candidates == 1


def test_duplicate_registration_raises() -> None:
    reg = default_registry()
    with pytest.raises(ValueError, match="already registered"):
        reg.register(PluginSpec("healthy-filter", "filter", PluginParams, Wild))


@pytest.mark.parametrize("name", sorted(BUILTIN_PROFILES))
def test_builtin_profiles_build(name: str) -> None:
    profile = build_profile(name, default_registry())
    assert profile.picker.name in {"max-score", "round-robin"}


@pytest.mark.parametrize(
    ("plugins", "profiles", "name", "message"),
    [
        ([], {}, "nope", "unknown profile"),
        (
            [PluginConfig(name="x", type="nope")],
            {"p": ProfileConfig(filters=["x"], picker="max-score")},
            "p",
            "unknown plugin type",
        ),
        (
            [],
            {"p": ProfileConfig(filters=["prefix"], picker="max-score")},
            "p",
            "is a scorer, not a filter",
        ),
        ([], {"p": ProfileConfig(picker="healthy")}, "p", "is a filter, not a picker"),
        (
            [PluginConfig(name="q", type="queue-depth-scorer", params={"bogus": 1})],
            {"p": ProfileConfig(scorers=[WeightedScorer(plugin="q")], picker="max-score")},
            "p",
            "bogus",
        ),
    ],
)
def test_bad_configuration_is_reported(
    plugins: list[PluginConfig], profiles: dict[str, ProfileConfig], name: str, message: str
) -> None:
    with pytest.raises(PluginConfigError, match=message):
        build_profile(name, default_registry(), plugins, profiles)


@pytest.mark.parametrize(
    ("backlog_s", "expected"),
    [
        (0.0, "cached"),  # equal load: the replica holding the prefix breaks the tie
        (0.005, "cached"),  # a few ms more predicted wait: still a near-tie
        (0.2, "idle"),  # well behind: least-loaded picks by load, cache-blind
    ],
)
def test_least_loaded_lets_the_prefix_break_only_near_ties(backlog_s: float, expected: str) -> None:
    request = reqv(prompt_tokens=2048, prompt_blocks=64, prefix_blocks={"cached": 64})
    for seed in range(8):
        sched = Scheduler(build_profile("least-loaded", default_registry()), random.Random(seed))
        d = sched.decide(
            request,
            [
                rep("idle", load=ReplicaLoad()),
                rep("cached", load=ReplicaLoad(prefill_tokens=1, prefill_s=backlog_s)),
            ],
        )
        assert pid(d.replica) == expected
