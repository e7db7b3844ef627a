from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import SettingsConfigDict

from llmmesh.common.discovery import DnsTarget
from llmmesh.common.settings import ServiceSettings
from llmmesh.common.topology import (
    DEFAULT_MODEL_VERSION,
    DEFAULT_POOL,
    TRITON_METRICS_PORT,
    PoolKey,
)
from services.autoscaler.actuators.local_settings import LocalActuatorSettings
from services.autoscaler.policy import PolicyConfig


class ScrapeTarget(BaseModel):
    """One engine replica whose Prometheus metrics the autoscaler reads."""

    replica_id: str = Field(min_length=1, description="Replica id (the orchestrator's).")
    metrics_url: str = Field(
        min_length=8,
        description=f"URL of the replica's /metrics (Triton port {TRITON_METRICS_PORT}).",
    )
    pool: str = Field(default=DEFAULT_POOL, description="Pool the replica belongs to.")
    model_version: str = Field(
        default=DEFAULT_MODEL_VERSION, description="Model version the replica serves."
    )
    host_header: str = Field(
        default="", description="Host header for the scrape (headless Service host:port)."
    )


class PoolConfig(BaseModel):
    """A pool the autoscaler decides for, and its policy."""

    pool: str = Field(min_length=1, description="Orchestrator pool name.")
    model_version: str = Field(min_length=1, description="Model version its replicas serve.")
    model: str = Field(
        default="",
        description="Served model name labelling gateway/orchestrator metrics; empty: the only model seen.",
    )
    policy: PolicyConfig | None = Field(
        default=None, description="This pool's policy; `default_policy` when unset."
    )

    @property
    def key(self) -> PoolKey:
        return PoolKey(self.pool, self.model_version)


class AutoscalerSettings(ServiceSettings):
    """Autoscaler settings (env prefix LLMMESH_AUTOSCALER_)."""

    model_config = SettingsConfigDict(env_prefix="LLMMESH_AUTOSCALER_", extra="ignore")

    grpc_port: int = Field(
        default=50054, ge=0, le=65535, description="gRPC port; 0 picks a free one."
    )
    metrics_port: int = Field(
        default=9104, ge=0, le=65535, description="Prometheus port; 0 picks a free one."
    )
    interval_s: float = Field(default=5.0, gt=0, description="Seconds between evaluations.")
    pools: list[PoolConfig] = Field(
        default_factory=list,
        description="Pools and their policies (JSON); pools only seen in signals use `default_policy`.",
    )
    default_policy: PolicyConfig = Field(
        default_factory=PolicyConfig, description="Policy of pools without their own (JSON)."
    )
    source: Literal["scrape", "promql"] = Field(
        default="scrape",
        description="Where signals come from: each /metrics directly, or a Prometheus server.",
    )
    targets: list[ScrapeTarget] = Field(
        default_factory=list, description="Engine replicas to scrape (JSON; source=scrape)."
    )
    replica_dns: list[DnsTarget] = Field(
        default_factory=list,
        description="Headless Services whose pods are scraped (the orchestrator's list), besides `targets`.",
    )
    orchestrator_metrics_urls: list[str] = Field(
        default_factory=list,
        description=(
            "The orchestrators' /metrics URLs (source=scrape; JSON list). Each host is resolved "
            "every round to all its addresses, so a headless Service's name reads every pod."
        ),
    )
    gateway_metrics_url: str | None = Field(
        default=None, description="The gateway's /metrics URL (source=scrape)."
    )
    scrape_timeout_s: float = Field(default=2.0, gt=0, description="Timeout of one metrics scrape.")
    prometheus_url: str | None = Field(
        default=None,
        description="Prometheus base URL, e.g. http://prometheus:9090 (source=promql).",
    )
    prometheus_timeout_s: float = Field(
        default=5.0, gt=0, description="Timeout of one PromQL query."
    )
    promql_engine_selector: str = Field(
        default='app=~"triton-.+"', description="PromQL label matchers of the engines' series."
    )
    promql_orchestrator_selector: str = Field(
        default='app="llmmesh-orchestrator"',
        description="PromQL label matchers of the orchestrator's series.",
    )
    promql_gateway_selector: str = Field(
        default='app="llmmesh-gateway",role="serving"',
        description="PromQL label matchers of the serving gateways' series.",
    )
    rate_window_s: float = Field(
        default=60.0, gt=0, description="Window of rates and percentiles (counter increases)."
    )
    signal_max_age_s: float = Field(
        default=30.0, gt=0, description="A signal older than this is unknown (stale)."
    )
    decision_history: int = Field(
        default=1024, gt=0, description="Decisions kept for ListDecisions (all pools)."
    )
    local_actuator: LocalActuatorSettings | None = Field(
        default=None,
        description="Start/stop local Triton processes to follow the decisions (JSON); none: KEDA/HPA act.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        keys = [p.key for p in self.pools]
        if len(set(keys)) != len(keys):
            raise ValueError("pools: each (pool, model_version) may be listed once")
        if self.source == "promql" and not self.prometheus_url:
            raise ValueError("source=promql needs prometheus_url")
        return self

    def policy_for(self, key: PoolKey) -> PolicyConfig:
        for p in self.pools:
            if p.key == key:
                return p.policy or self.default_policy
        return self.default_policy

    def pool_models(self) -> dict[PoolKey, str]:
        return {p.key: p.model for p in self.pools if p.model}
