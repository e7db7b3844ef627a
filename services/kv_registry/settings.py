from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from llmmesh.common.settings import ServiceSettings


class KvRegistrySettings(ServiceSettings):
    """kv_registry settings (env prefix LLMMESH_KV_REGISTRY_). Block identity comes from
    `KvBlockSettings` (LLMMESH_KV_*), shared with the engines."""

    model_config = SettingsConfigDict(env_prefix="LLMMESH_KV_REGISTRY_", extra="ignore")

    grpc_port: int = Field(
        default=50053, ge=0, le=65535, description="gRPC port; 0 picks a free one."
    )
    metrics_port: int = Field(
        default=9103, ge=0, le=65535, description="Prometheus port; 0 picks a free one."
    )
    max_entries: int = Field(
        default=16_000_000,
        gt=0,
        description="Bound on indexed (block, replica) pairs; least recently stored are dropped first.",
    )
    max_events_per_request: int = Field(
        default=100_000, gt=0, description="PublishEvents batches larger than this are rejected."
    )
