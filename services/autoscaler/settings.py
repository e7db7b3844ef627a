from __future__ import annotations

from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from llmmesh.common.discovery import DnsTarget
from llmmesh.common.settings import ServiceSettings


class ScrapeTarget(BaseModel):
    """One engine replica whose Prometheus metrics the autoscaler reads."""

    replica_id: str = Field(min_length=1, description="Replica id.")
    metrics_url: str = Field(
        min_length=8, description="URL of the replica's /metrics (Triton port 8002)."
    )
    pool: str = Field(default="default", description="Pool the replica belongs to.")
    model_version: str = Field(default="v1", description="Model version the replica serves.")
    host_header: str = Field(
        default="", description="Host header for the scrape (headless Service host:port)."
    )


class AutoscalerSettings(ServiceSettings):
    """Autoscaler settings (env prefix LLMMESH_AUTOSCALER_)."""

    model_config = SettingsConfigDict(env_prefix="LLMMESH_AUTOSCALER_", extra="ignore")

    grpc_port: int = Field(
        default=50054, ge=0, le=65535, description="gRPC port; 0 picks a free one."
    )
    metrics_port: int = Field(
        default=9104, ge=0, le=65535, description="Prometheus port; 0 picks a free one."
    )
    targets: list[ScrapeTarget] = Field(
        default_factory=list, description="Replicas to scrape (JSON)."
    )
    replica_dns: list[DnsTarget] = Field(
        default_factory=list,
        description="Headless Services whose pods are scraped (the orchestrator's list), besides `targets`.",
    )
    interval_s: float = Field(default=5.0, gt=0, description="Seconds between evaluations.")
    scrape_timeout_s: float = Field(default=2.0, gt=0, description="Timeout of one metrics scrape.")
    target_requests_per_replica: float = Field(
        default=16.0, gt=0, description="Active + waiting requests one replica should carry."
    )
    kv_high_watermark: float = Field(
        default=0.85, gt=0, le=1, description="Pool KV use above this asks for one more replica."
    )
    min_replicas: int = Field(default=1, ge=0, description="Floor per pool.")
    max_replicas: int = Field(default=16, gt=0, description="Ceiling per pool.")
