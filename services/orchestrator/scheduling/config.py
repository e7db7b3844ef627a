"""Plugins and profiles of the policy file, with the built-in defaults.

    plugins:                       # instances: a name, a registered type, params
      - {name: prefix, type: prefix-overlap-scorer}
    profiles:                      # filters and scorers by plugin name, scorer weights, a picker
      default:
        filters: [healthy, model-version, pool, circuit-breaker, kv-watermark]
        scorers: [{plugin: prefix, weight: 2.0}, ...]
        picker: max-score

Plugins and profiles given in the file are added to the built-ins; a name given in the file
replaces the built-in of that name.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class PluginConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    type: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


class WeightedScorer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plugin: str = Field(min_length=1)
    weight: float = Field(default=1.0, ge=0.0)


class ProfileConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filters: list[str] = Field(default_factory=list)
    scorers: list[WeightedScorer] = Field(default_factory=list)
    picker: str = Field(min_length=1)
    queue_affinity: bool = Field(
        default=True,
        description=(
            "While requests queue, a replica with room takes first the queued request with the "
            "longest cached prefix there (the admission policy's `affinity_window`); false: "
            "strict service order, as a cache-blind balancer."
        ),
    )


FILTERS = ["healthy", "model-version", "pool", "circuit-breaker", "kv-watermark"]

BUILTIN_PLUGINS: list[PluginConfig] = [
    PluginConfig(name="healthy", type="healthy-filter"),
    PluginConfig(name="model-version", type="model-version-filter"),
    PluginConfig(name="pool", type="pool-filter"),
    PluginConfig(name="circuit-breaker", type="circuit-breaker-filter"),
    PluginConfig(name="kv-watermark", type="kv-watermark-filter"),
    PluginConfig(name="prefix", type="prefix-overlap-scorer"),
    PluginConfig(name="queue-depth", type="queue-depth-scorer"),
    PluginConfig(name="kv-utilization", type="kv-utilization-scorer"),
    PluginConfig(name="estimated-wait", type="estimated-wait-scorer"),
    PluginConfig(name="least-work", type="estimated-wait-scorer", params={"prefix_aware": False}),
    PluginConfig(name="hot-spot", type="hot-spot-guard", params={"tolerance": 8}),
    PluginConfig(name="max-score", type="max-score-picker"),
    PluginConfig(name="weighted-random", type="weighted-random-picker"),
    PluginConfig(name="round-robin", type="round-robin-picker"),
]

BUILTIN_PROFILES: dict[str, ProfileConfig] = {
    "default": ProfileConfig(
        filters=FILTERS,
        scorers=[
            WeightedScorer(plugin="estimated-wait", weight=1.0),
            WeightedScorer(plugin="hot-spot", weight=0.1),
        ],
        picker="max-score",
    ),
    "round-robin": ProfileConfig(filters=FILTERS, picker="round-robin", queue_affinity=False),
    "least-loaded": ProfileConfig(
        filters=FILTERS,
        scorers=[
            WeightedScorer(plugin="least-work", weight=1.0),
            WeightedScorer(plugin="hot-spot", weight=0.1),
            WeightedScorer(plugin="prefix", weight=0.02),
        ],
        picker="max-score",
    ),
    "prefix-only": ProfileConfig(
        filters=FILTERS, scorers=[WeightedScorer(plugin="prefix")], picker="max-score"
    ),
}
