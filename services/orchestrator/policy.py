"""Scheduling policy file (`LLMMESH_ORCHESTRATOR_POLICY_FILE`): schema, defaults, loading.

Every key here is enforced by the orchestrator core; unknown keys are errors so a typo cannot
silently fall back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.orchestrator.scheduling.config import PluginConfig, ProfileConfig
from services.orchestrator.scheduling.framework import validate_all
from services.orchestrator.scheduling.registry import PluginConfigError, default_registry


class PoolPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_prompt_tokens: int = Field(gt=0, description="Longest prompt this pool takes.")
    max_in_flight_per_replica: int | None = Field(
        default=None,
        gt=0,
        description="Lease cap per replica of this pool (settings default when unset).",
    )


class ScaleFromZeroPolicy(BaseModel):
    """A pool an actuator starts on demand (activator): a request that only this pool could
    serve, and that finds none of its replicas ready, waits in the admission queue (bounded, up
    to its deadline) for one to become ready instead of failing at once."""

    model_config = ConfigDict(extra="forbid")

    activation_timeout_s: float = Field(
        gt=0,
        description="How long a waiting request gives the pool to get a ready replica; then UNAVAILABLE.",
    )
    model_version: str = Field(
        min_length=1,
        description="Model version the pool's replicas serve (they may not exist yet).",
    )
    models: list[str] = Field(
        min_length=1, description="Triton model names the pool's replicas serve."
    )


class CapacityPolicy(BaseModel):
    """Per-replica lease caps from what the engine reports, so its in-flight batcher stays full
    but does not thrash: cap = min(configured cap, ceil(reported max batch * overcommit))."""

    model_config = ConfigDict(extra="forbid")

    overcommit: float = Field(
        default=1.5,
        ge=1.0,
        description="Leases per batch slot: >1 keeps a short queue at the engine.",
    )
    max_prefill_backlog_s: float = Field(
        default=0.35,
        ge=0.0,
        description=(
            "A replica whose modelled prefill backlog (the load ledger's) exceeds this takes no "
            "new lease: requests wait in the queue and are dispatched again when the soonest "
            "such backlog falls under it, instead of piling onto the one replica whose KV "
            "still fits more sequences. A request whose cached prefix on the replica saves at "
            "least the excess is exempt. In the cost profile's seconds (x engine_time_scale); "
            "0: off."
        ),
    )


class AdmissionPolicy(BaseModel):
    """Inside a priority class, tenants share by weighted fair queuing (self-clocked fair
    queuing over request cost = prompt tokens + max tokens)."""

    model_config = ConfigDict(extra="forbid")

    tenant_weights: dict[str, float] = Field(
        default_factory=dict, description="Share weight per tenant."
    )
    default_tenant_weight: float = Field(default=1.0, gt=0)
    affinity_window: int = Field(
        default=16,
        ge=0,
        description=(
            "Queued requests a replica with room looks at, from the head of the queue's first "
            "class, to be granted first the one with the longest cached prefix there (where the "
            "profile's filters accept the replica for it; a request is passed over that way at "
            "most this many times). Under overload the queue would otherwise hand each request "
            "to whichever replica frees first and lose the cache hits that keep the cluster's "
            "capacity up. 0: strict service order."
        ),
    )

    def weight(self, tenant: str) -> float:
        w = self.tenant_weights.get(tenant, self.default_tenant_weight)
        return w if w > 0 else self.default_tenant_weight


class HealthPolicy(BaseModel):
    """Ejection after repeated failures, as Envoy's outlier detection does: after
    `consecutive_errors` in a row, or when the replica's failure share over its recent requests
    (the last `failure_window_requests` outcomes younger than `failure_window_s`) reaches
    `failure_percentage` with at least `failure_min_requests` of them (Envoy's
    failure-percentage ejection). The same window's failures count as load to the scorers, so a
    replica that answers errors fast never looks idle."""

    model_config = ConfigDict(extra="forbid")

    consecutive_errors: int = Field(
        default=3, ge=1, description="Replica errors or failed probes in a row."
    )
    base_ejection_seconds: float = Field(
        default=30.0, gt=0, description="Ejection time, times the number of ejections so far."
    )
    max_ejection_percent: float = Field(
        default=50.0, ge=0, le=100, description="Never eject more than this share of a pool."
    )
    failure_percentage: float = Field(
        default=50.0,
        gt=0,
        le=100,
        description="Eject when this share (%) of the replica's recent requests failed on it.",
    )
    failure_min_requests: int = Field(
        default=5,
        ge=1,
        description="Recent requests a replica needs before its failure share can eject it.",
    )
    failure_window_requests: int = Field(
        default=50, ge=1, description="Outcomes the failure share is computed over (the latest)."
    )
    failure_window_s: float = Field(
        default=10.0,
        gt=0,
        description="Outcomes older than this (seconds) leave the failure share and the load penalty.",
    )


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    pools: dict[str, PoolPolicy] = Field(
        default_factory=dict,
        description="Length-bucketed pools; a request goes to the smallest pool its prompt fits.",
    )
    scale_from_zero: dict[str, ScaleFromZeroPolicy] = Field(
        default_factory=dict,
        description="Pools (by name) that may have no replica and are started on demand.",
    )
    health: HealthPolicy = Field(default_factory=HealthPolicy)
    capacity: CapacityPolicy = Field(default_factory=CapacityPolicy)
    admission: AdmissionPolicy = Field(default_factory=AdmissionPolicy)
    plugins: list[PluginConfig] = Field(
        default_factory=list, description="Plugin instances added to the built-ins."
    )
    profiles: dict[str, ProfileConfig] = Field(
        default_factory=dict,
        description="Profiles added to the built-ins (default, round-robin, least-loaded, prefix-only).",
    )

    @model_validator(mode="after")
    def _distinct_bounds(self) -> Policy:
        bounds = [p.max_prompt_tokens for p in self.pools.values()]
        if len(bounds) != len(set(bounds)):
            raise ValueError("pools must have distinct max_prompt_tokens")
        names = [p.name for p in self.plugins]
        if len(names) != len(set(names)):
            raise ValueError("plugin names must be unique")
        return self

    def pools_for(self, prompt_tokens: int) -> list[str] | None:
        """Pools that may serve a prompt, preferred first; None when no pools are configured."""
        if not self.pools:
            return None
        fitting = sorted(
            (p.max_prompt_tokens, name)
            for name, p in self.pools.items()
            if p.max_prompt_tokens >= prompt_tokens
        )
        return [name for _, name in fitting]


class PolicyError(ValueError):
    pass


def load_policy(path: Path | None) -> Policy:
    if path is None:
        return Policy()
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"{path}: {exc}") from exc
    try:
        policy = Policy.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise PolicyError(f"{path}: {details}") from exc
    try:
        validate_all(default_registry(), policy.plugins, policy.profiles)
    except PluginConfigError as exc:
        raise PolicyError(f"{path}: {exc}") from exc
    return policy
