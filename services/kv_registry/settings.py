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
    max_blocks_per_request: int = Field(
        default=1 << 20,
        gt=0,
        description=(
            "PublishEvents batches whose events carry more block hashes in all (stored and "
            "removed) are refused (INVALID_ARGUMENT): one batch is applied without yielding, "
            "~0.6 us per hash, and lookups wait meanwhile. Engines send far fewer (the emulator "
            "512 events per batch; a snapshot one block per event)."
        ),
    )
    max_prompt_blocks: int = Field(
        default=65_536,
        gt=0,
        description=(
            "Longest prompt a Lookup, RecordRouting or ReportReuse may carry, in blocks (block "
            "hashes, or tokens over the block size); longer ones are refused (INVALID_ARGUMENT) "
            "rather than hold the registry while they are hashed and indexed."
        ),
    )
    exact_silence_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "An exact replica that publishes nothing (no events, no heartbeat) for this long is "
            "dropped: its engine is gone (engines heartbeat every few seconds, the emulator "
            "every LLMMESH_EMULATOR_PUBLISH_HEARTBEAT_S). One that publishes again is asked "
            "for a snapshot."
        ),
    )
    predicted_ttl_s: float = Field(
        default=600.0,
        gt=0,
        description="Lifetime of a predicted entry (approximate mode) when RecordRouting sets no ttl_s.",
    )
    predicted_capacity: int = Field(
        default=32_768,
        ge=0,
        description="Most predicted entries per approximate replica (LRU); ReportReuse corrections adapt the bound below this.",
    )
    predicted_shrink: float = Field(
        default=0.25,
        gt=0,
        le=1,
        description="Correction step: a fully missed prediction shrinks a replica's predicted capacity by this fraction.",
    )
    hash_cache_size: int = Field(
        default=4096,
        ge=0,
        description="Prompts whose block hashes are kept (LRU): Lookup, RecordRouting and ReportReuse of one request hash it once.",
    )
    hash_cache_blocks: int = Field(
        default=1 << 20,
        ge=0,
        description="Block hashes the prompt cache holds in all (LRU; ~40 bytes each): a few long prompts sent as token ids cannot fill memory.",
    )
    maintenance_interval_s: float = Field(
        default=0.05,
        gt=0,
        description="Period of the background step that sweeps cleared replicas, compacts logs and expires predictions.",
    )
    maintenance_batch: int = Field(
        default=4096,
        gt=0,
        description="Index entries handled per background step (bounds how long one step holds the event loop).",
    )
    watch_backlog: int = Field(
        default=1_000_000,
        gt=0,
        description="Changes buffered per WatchExact caller, counted as block hashes plus one per change (~10 bytes each); a caller further behind is ended and watches again from a snapshot.",
    )
