"""Scheduling policy file (`LLMMESH_ORCHESTRATOR_POLICY_FILE`): schema, defaults, loading.

Every key here is enforced by the orchestrator core; unknown keys are errors so a typo cannot
silently fall back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class PoolPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_prompt_tokens: int = Field(gt=0, description="Longest prompt this pool takes.")
    max_in_flight_per_replica: int | None = Field(
        default=None,
        gt=0,
        description="Lease cap per replica of this pool (settings default when unset).",
    )


class RoutingPolicy(BaseModel):
    """score(replica) = prefix_weight * cached-prefix fraction - load_weight * in-flight fraction."""

    model_config = ConfigDict(extra="forbid")

    prefix_weight: float = Field(default=1.0, ge=0)
    load_weight: float = Field(default=1.0, ge=0)


class HealthPolicy(BaseModel):
    """Ejection after repeated failures, as Envoy's outlier detection does."""

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


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    pools: dict[str, PoolPolicy] = Field(
        default_factory=dict,
        description="Length-bucketed pools; a request goes to the smallest pool its prompt fits.",
    )
    routing: RoutingPolicy = Field(default_factory=RoutingPolicy)
    health: HealthPolicy = Field(default_factory=HealthPolicy)

    @model_validator(mode="after")
    def _distinct_bounds(self) -> Policy:
        bounds = [p.max_prompt_tokens for p in self.pools.values()]
        if len(bounds) != len(set(bounds)):
            raise ValueError("pools must have distinct max_prompt_tokens")
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
        return Policy.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise PolicyError(f"{path}: {details}") from exc
