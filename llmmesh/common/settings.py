"""Settings shared across services. Each service defines its own `BaseSettings` subclass with its
own env prefix; these are the pieces they have in common. Built once in `main`, then injected."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from llmmesh.kvblocks import BlockConfig


class KvBlockSettings(BaseSettings):
    """KV block identity. One setting for engines and registry: a mismatch routes wrong."""

    model_config = SettingsConfigDict(env_prefix="LLMMESH_KV_", extra="ignore")

    block_size: int = Field(
        default=32,
        gt=0,
        description="Tokens per KV block (TensorRT-LLM `tokens_per_block`).",
    )
    hash_seed: int = Field(default=0, ge=0, lt=2**64, description="Seed of the chained block hash.")

    def block_config(self) -> BlockConfig:
        return BlockConfig(block_size=self.block_size, hash_seed=self.hash_seed)


class ServiceSettings(BaseSettings):
    """Fields every gRPC service has. Subclasses set `env_prefix` and declare their own
    `grpc_port` and `metrics_port` (the defaults differ per service, see docs/conventions.md)."""

    model_config = SettingsConfigDict(extra="ignore")

    host: str = Field(
        default="127.0.0.1", description="Interface the gRPC and metrics servers bind."
    )
    drain_seconds: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long in-flight RPCs may take to finish."
    )
    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/gRPC endpoint for traces (e.g. http://jaeger:4317); tracing export is off when unset.",
    )
    trace_sample_ratio: float = Field(
        default=1.0, ge=0, le=1, description="Head sampling ratio for new root traces."
    )
    log_level: str = Field(default="INFO", description="Python logging level.")
    log_json: bool = Field(default=True, description="Emit one JSON object per log line.")
    ready_file: Path | None = Field(
        default=None,
        description="If set, the bound ports are written here as JSON once serving (for port 0).",
    )
