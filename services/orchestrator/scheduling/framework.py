"""Runs a profile: filters in order, weighted scorers, a picker. Every plugin call is timed
(`llmmesh_orchestrator_plugin_duration_seconds{plugin,type}`); scores are clamped to [0, 1]."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import Histogram

from llmmesh.common import metric_names as names
from services.orchestrator.scheduling.config import (
    BUILTIN_PLUGINS,
    BUILTIN_PROFILES,
    PluginConfig,
    ProfileConfig,
)
from services.orchestrator.scheduling.contracts import (
    Filter,
    Picker,
    ReplicaView,
    RequestView,
    Scorer,
)
from services.orchestrator.scheduling.registry import Plugin, PluginConfigError, PluginRegistry
from services.orchestrator.scheduling.work import WorkModel

_PLUGIN_SECONDS = Histogram(
    names.ORCH_PLUGIN_DURATION,
    "Time in one scheduling plugin call.",
    ["plugin", "type"],
    buckets=(1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2),
)


@dataclass(frozen=True)
class Named:
    name: str
    type: str
    plugin: Plugin


@dataclass(frozen=True)
class Profile:
    name: str
    filters: tuple[Named, ...]
    scorers: tuple[tuple[Named, float], ...]
    picker: Named
    queue_affinity: bool  # `ProfileConfig.queue_affinity`


@dataclass(frozen=True, slots=True)
class Decision:
    replica: ReplicaView | None
    candidates: int
    # The scored candidates and their totals, in the same order (empty when none was eligible).
    scored: Sequence[ReplicaView] = ()
    totals: Sequence[float] = ()

    @property
    def scores(self) -> dict[str, float]:
        """Each scored candidate's total, by replica id."""
        return {r.id: t for r, t in zip(self.scored, self.totals, strict=True)}


def clamp(x: float) -> float:
    return 0.0 if x != x or x < 0.0 else (1.0 if x > 1.0 else x)  # NaN → 0


class Scheduler:
    def __init__(self, profile: Profile, rng: random.Random | None = None):
        self.profile = profile
        self._rng = rng or random.Random()
        # Each plugin's histogram child, resolved once (a `labels` call per plugin call costs
        # more than the observation).
        self._timers: dict[str, Histogram] = {}
        for named in (*profile.filters, *(s for s, _ in profile.scorers), profile.picker):
            self._timers[named.name] = _PLUGIN_SECONDS.labels(named.name, named.type)

    @property
    def work_model(self) -> WorkModel | None:
        """The engine work model of the profile's first scorer that has one (None without)."""
        for s, _ in self.profile.scorers:
            work = getattr(s.plugin, "work", None)
            if isinstance(work, WorkModel):
                return work
        return None

    def filter(
        self, request: RequestView, replicas: Sequence[ReplicaView]
    ) -> Sequence[ReplicaView]:
        """Replicas that pass every filter of the profile, at capacity or not."""
        candidates: Sequence[ReplicaView] = replicas
        for f in self.profile.filters:
            start = time.perf_counter()
            candidates = f.plugin.filter(request, candidates)  # type: ignore[union-attr]
            self._timers[f.name].observe(time.perf_counter() - start)
            if not candidates:
                break
        return candidates

    def decide(self, request: RequestView, replicas: Sequence[ReplicaView]) -> Decision:
        """Filters, then drops replicas at their cap (a request waits rather than spilling over),
        then scores and picks."""
        return self.choose(request, self.filter(request, replicas))

    def choose(self, request: RequestView, eligible: Sequence[ReplicaView]) -> Decision:
        """`decide` among the replicas the filters kept (`filter`'s answer for the request)."""
        candidates = [r for r in eligible if r.in_flight < r.cap]
        if not candidates:
            return Decision(None, len(eligible))
        totals = [0.0] * len(candidates)
        for s, weight in self.profile.scorers:
            start = time.perf_counter()
            scores = s.plugin.score(request, candidates)  # type: ignore[union-attr]
            self._timers[s.name].observe(time.perf_counter() - start)
            if len(scores) != len(candidates):
                raise RuntimeError(
                    f"scorer {s.name} returned {len(scores)} scores for {len(candidates)} replicas"
                )
            totals = [t + weight * clamp(v) for t, v in zip(totals, scores, strict=True)]
        start = time.perf_counter()
        chosen = self.profile.picker.plugin.pick(request, candidates, totals, self._rng)  # type: ignore[union-attr]
        self._timers[self.profile.picker.name].observe(time.perf_counter() - start)
        return Decision(chosen, len(candidates), candidates, totals)


def build_profile(
    name: str,
    registry: PluginRegistry,
    plugins: Sequence[PluginConfig] = (),
    profiles: dict[str, ProfileConfig] | None = None,
) -> Profile:
    """Instantiate profile `name` from built-ins overlaid with the file's plugins and profiles."""
    configs = {p.name: p for p in BUILTIN_PLUGINS}
    configs.update({p.name: p for p in plugins})
    all_profiles = {**BUILTIN_PROFILES, **(profiles or {})}
    pc = all_profiles.get(name)
    if pc is None:
        raise PluginConfigError(
            f"unknown profile {name!r} (known: {', '.join(sorted(all_profiles))})"
        )

    def make(plugin_name: str, kind: str) -> Named:
        cfg = configs.get(plugin_name)
        if cfg is None:
            raise PluginConfigError(f"profile {name!r}: unknown plugin {plugin_name!r}")
        spec, plugin = registry.build(cfg.type, cfg.params)
        if spec.kind != kind:
            raise PluginConfigError(
                f"profile {name!r}: plugin {plugin_name!r} is a {spec.kind}, not a {kind}"
            )
        return Named(plugin_name, cfg.type, plugin)

    return Profile(
        name=name,
        filters=tuple(make(f, "filter") for f in pc.filters),
        scorers=tuple((make(s.plugin, "scorer"), s.weight) for s in pc.scorers),
        picker=make(pc.picker, "picker"),
        queue_affinity=pc.queue_affinity,
    )


def validate_all(
    registry: PluginRegistry, plugins: Sequence[PluginConfig], profiles: dict[str, ProfileConfig]
) -> None:
    """Build every plugin and profile once so a bad file fails at load, not at the first request."""
    for p in plugins:
        registry.build(p.type, p.params)
    for name in {**BUILTIN_PROFILES, **profiles}:
        build_profile(name, registry, plugins, profiles)


__all__ = [
    "Decision",
    "Filter",
    "Picker",
    "Profile",
    "Scheduler",
    "Scorer",
    "build_profile",
    "validate_all",
]
