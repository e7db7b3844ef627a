"""The local actuator's settings: the pools it runs as local Triton processes, and how it starts,
registers and stops them (`local.py` runs them). Apart from the actuator, so that reading the
autoscaler's settings does not load the Triton launcher."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class ManagedPool(BaseModel):
    """One pool whose replicas this actuator starts and stops."""

    model_config = ConfigDict(extra="forbid")

    pool: str = Field(min_length=1, description="Orchestrator pool name of the replicas.")
    model_version: str = Field(min_length=1, description="Model version the replicas serve.")
    model_repository: Path = Field(
        description="Triton model repository (model_repository/emulator, or a real-model one)."
    )
    models: list[str] = Field(
        min_length=1, description="Triton model names that must be ready (and are registered)."
    )
    engine_env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment for this pool's Triton processes."
    )
    initial_replicas: int = Field(
        default=0,
        ge=0,
        description="Replicas started when the actuator is first used, before any `apply`.",
    )


class LocalActuatorSettings(BaseModel):
    """Settings of the local actuator (`LLMMESH_AUTOSCALER_LOCAL_ACTUATOR`, JSON)."""

    model_config = ConfigDict(extra="forbid")

    orchestrator_address: str = Field(
        min_length=3, description="host:port of the orchestrator replicas are registered with."
    )
    orchestrator_addresses: list[str] = Field(
        default_factory=list,
        description=(
            "host:port of every orchestrator (active-active): replicas are registered with, "
            "drained on and deregistered from each. Empty: `orchestrator_address` alone."
        ),
    )
    reregister_interval_s: float = Field(
        default=5.0,
        gt=0,
        description=(
            "How often every ready replica is registered again with every orchestrator (one "
            "that restarted, or was added, learns it within this interval)."
        ),
    )
    kv_registry_address: str | None = Field(
        default=None,
        description="host:port of kv_registry the engines publish KV events to; none when unset.",
    )
    pools: list[ManagedPool] = Field(min_length=1, description="Pools this actuator manages.")
    engine_env: dict[str, str] = Field(
        default_factory=dict, description="Environment for every Triton process (pools add to it)."
    )
    replica_id_prefix: str = Field(
        default="local",
        min_length=1,
        description="Replica ids are <pool>-<model_version>-<prefix>-<n>; unique per actuator.",
    )
    host: str = Field(default="127.0.0.1", description="Address Triton binds and is dialed at.")
    log_dir: Path | None = Field(
        default=None, description="Directory of the Triton logs; a temporary one when unset."
    )
    ready_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="Launch to Triton-ready, and again ready to orchestrator-routable.",
    )
    drain_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="How long a replica's in-flight streams may take to finish before SIGTERM.",
    )
    stop_grace_s: float = Field(
        default=30.0, gt=0, description="SIGTERM to SIGKILL when a Triton process does not exit."
    )
    liveness: bool = Field(
        default=True,
        description=(
            "Probe each ready replica's liveness (one token through the model, "
            "llmmesh.triton.launcher.LOCAL_TRITON_LIVENESS) and kill one that keeps failing; "
            "it is then replaced (a dead backend stub, which Triton still reports ready)."
        ),
    )
    port_attempts: int = Field(
        default=3, ge=1, description="Launches on fresh free ports when a port was taken."
    )
    retry_backoff_s: float = Field(
        default=2.0,
        gt=0,
        description="Wait after a failed start before the next; doubles up to 60 s.",
    )
    rpc_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Deadline of RegisterReplica, DeregisterReplica, ListReplicas.",
    )
