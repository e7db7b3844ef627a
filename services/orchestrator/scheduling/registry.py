"""The one place plugins are registered. Registering a TYPE twice raises."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import ValidationError

from services.orchestrator.scheduling.contracts import Filter, Picker, PluginParams, Scorer
from services.orchestrator.scheduling.plugins import (
    circuit,
    estimated_wait,
    healthy,
    hot_spot,
    kv_utilization,
    kv_watermark,
    max_score,
    model_version,
    pool,
    prefix_overlap,
    queue_depth,
    round_robin,
    weighted_random,
)

Kind = Literal["filter", "scorer", "picker"]
Plugin = Filter | Scorer | Picker


class PluginConfigError(ValueError):
    pass


@dataclass(frozen=True)
class PluginSpec:
    type_name: str
    kind: Kind
    params: type[PluginParams]
    cls: type  # the plugin's class
    # Builds the plugin from its parsed params; the class itself unless it needs more.
    factory: Callable[[PluginParams], Plugin] | None = None

    def build(self, params: PluginParams) -> Plugin:
        plugin: Plugin = (self.factory or self.cls)(params)
        return plugin


class PluginRegistry:
    def __init__(self) -> None:
        self._specs: dict[str, PluginSpec] = {}

    def register(self, spec: PluginSpec) -> None:
        if spec.type_name in self._specs:
            raise ValueError(f"plugin type {spec.type_name!r} is already registered")
        self._specs[spec.type_name] = spec

    def spec(self, plugin_type: str) -> PluginSpec:
        spec = self._specs.get(plugin_type)
        if spec is None:
            known = ", ".join(sorted(self._specs))
            raise PluginConfigError(f"unknown plugin type {plugin_type!r} (known: {known})")
        return spec

    def build(self, plugin_type: str, params: dict[str, object]) -> tuple[PluginSpec, Plugin]:
        spec = self.spec(plugin_type)
        try:
            parsed = spec.params.model_validate(params)
        except ValidationError as exc:
            detail = "; ".join(
                f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise PluginConfigError(f"{plugin_type}: {detail}") from exc
        return spec, spec.build(parsed)

    def types(self) -> list[str]:
        return sorted(self._specs)


def _spec(
    kind: Kind,
    cls: type,
    params: type[PluginParams],
    factory: Callable[[PluginParams], Plugin] | None = None,
) -> PluginSpec:
    type_name: str = cls.TYPE  # type: ignore[attr-defined]
    return PluginSpec(type_name, kind, params, cls, factory)


def default_registry(engine_time_scale: float = 1.0) -> PluginRegistry:
    """Every plugin type; those with an engine work model run at `engine_time_scale` (wall
    seconds per modelled second: the orchestrator setting of that name)."""

    def estimated_wait_scorer(params: PluginParams) -> Plugin:
        assert isinstance(params, estimated_wait.Params)
        return estimated_wait.EstimatedWaitScorer(params, time_scale=engine_time_scale)

    reg = PluginRegistry()
    for spec in (
        _spec("filter", healthy.HealthyFilter, healthy.Params),
        _spec("filter", model_version.ModelVersionFilter, model_version.Params),
        _spec("filter", pool.PoolFilter, pool.Params),
        _spec("filter", kv_watermark.KvWatermarkFilter, kv_watermark.Params),
        _spec("filter", circuit.CircuitBreakerFilter, circuit.Params),
        _spec("scorer", prefix_overlap.PrefixOverlapScorer, prefix_overlap.Params),
        _spec("scorer", queue_depth.QueueDepthScorer, queue_depth.Params),
        _spec("scorer", kv_utilization.KvUtilizationScorer, kv_utilization.Params),
        _spec(
            "scorer",
            estimated_wait.EstimatedWaitScorer,
            estimated_wait.Params,
            estimated_wait_scorer,
        ),
        _spec("scorer", hot_spot.HotSpotGuard, hot_spot.Params),
        _spec("picker", max_score.MaxScorePicker, max_score.Params),
        _spec("picker", weighted_random.WeightedRandomPicker, weighted_random.Params),
        _spec("picker", round_robin.RoundRobinPicker, round_robin.Params),
    ):
        reg.register(spec)
    return reg
