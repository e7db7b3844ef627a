from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import SettingsConfigDict

from llmmesh.common import kv_registries
from llmmesh.common.discovery import DnsTarget
from llmmesh.common.settings import ServiceSettings
from llmmesh.common.topology import DEFAULT_MODEL_VERSION, DEFAULT_POOL, TRITON_MODEL


class ReplicaSpec(BaseModel):
    """One Triton replica: from the static list, DNS discovery, or RegisterReplica."""

    id: str = Field(
        min_length=1, description="Stable replica id; engines publish KV events under it."
    )
    grpc_address: str = Field(min_length=3, description="host:port of Triton's gRPC endpoint.")
    pool: str = Field(
        default=DEFAULT_POOL, min_length=1, description="Replica pool (e.g. short, long)."
    )
    model_version: str = Field(
        default=DEFAULT_MODEL_VERSION,
        min_length=1,
        description="Model version this replica serves.",
    )
    models: list[str] = Field(
        default_factory=lambda: [TRITON_MODEL],
        min_length=1,
        description="Triton model names served.",
    )
    authority: str = Field(
        default="",
        description="HTTP/2 :authority for dialing the replica (headless Service host:port).",
    )
    metrics_url: str = Field(
        default="", description="Triton /metrics URL (engine load and KV use); none when empty."
    )
    metrics_host: str = Field(
        default="", description="Host header for the metrics scrape (headless Service)."
    )

    @field_validator("grpc_address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be host:port")
        return value

    @field_validator("models")
    @classmethod
    def _named_models(cls, value: list[str]) -> list[str]:
        if any(not m for m in value):
            raise ValueError("model names must be non-empty")
        return value


class OrchestratorSettings(ServiceSettings):
    """Orchestrator settings (env prefix LLMMESH_ORCHESTRATOR_)."""

    model_config = SettingsConfigDict(env_prefix="LLMMESH_ORCHESTRATOR_", extra="ignore")

    grpc_port: int = Field(
        default=50052, ge=0, le=65535, description="gRPC port; 0 picks a free one."
    )
    metrics_port: int = Field(
        default=9102, ge=0, le=65535, description="Prometheus port; 0 picks a free one."
    )
    replicas: list[ReplicaSpec] = Field(
        default_factory=list, description="Static replica list (JSON in the environment)."
    )
    replica_dns: list[DnsTarget] = Field(
        default_factory=list,
        description="Headless Services resolved periodically into replicas (JSON); added to `replicas`.",
    )
    kv_registry_address: str | None = Field(
        default=None,
        description="host:port of kv_registry for prefix lookups; prefix-blind routing when unset.",
    )
    kv_lookup_timeout_s: float = Field(
        default=0.05,
        gt=0,
        description="Budget of one prefix lookup; on timeout the request routes by load.",
    )
    kv_lookup_stream: bool = Field(
        default=True,
        description="Prefix lookups over one long-lived LookupStream per kv_registry replica "
        "(a unary Lookup per request when false, or for a registry without it).",
    )
    kv_mirror: bool = Field(
        default=True,
        description="Keep a copy of kv_registry's exact index (WatchExact) and answer a lookup "
        "from it when every replica it may route to publishes KV events: no lookup round trip.",
    )
    kv_mirror_max_blocks: int = Field(
        default=4_000_000,
        gt=0,
        description="Block hashes the copy may hold (about 150 bytes each); beyond, the "
        "orchestrator drops it and looks up in kv_registry (a new copy is tried later, twice "
        "as late each time it outgrows the bound again).",
    )
    policy_file: Path | None = Field(
        default=None,
        description="Scheduling policy YAML (pools, routing weights, ejection); defaults in code.",
    )
    profile: str = Field(
        default="default",
        description="Scheduling profile (built-in: default, round-robin, least-loaded, prefix-only, or the policy file's).",
    )
    metrics_interval_s: float = Field(
        default=1.0, gt=0, description="Seconds between replica metrics scrapes."
    )
    metrics_max_age_s: float = Field(
        default=5.0,
        gt=0,
        description="Engine metrics older than this are ignored (treated as unknown).",
    )
    engine_gauge_period_s: float = Field(
        default=2.0,
        ge=0,
        description=(
            "How old an engine's gauges may be when scraped: the period at which its backend "
            "refreshes them (tritonserver --metrics-interval-ms, 2000 by default and in "
            "mesh/base/triton). The engine's requests beyond this orchestrator's leases are "
            "counted against the most leases it held over that span, so a lease that ended "
            "after the gauges counted it is not taken for another orchestrator's request."
        ),
    )
    dns_interval_s: float = Field(default=5.0, gt=0, description="Seconds between DNS resolutions.")
    max_queue: int = Field(
        default=1024,
        gt=0,
        description=(
            "Admission queue bound across all models: the most waiters when an interactive "
            "request arrives (services/orchestrator/OVERLOAD.md)."
        ),
    )
    queue_share_standard: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description=(
            "A standard request enters the queue only while it holds fewer than this share of "
            "`max_queue` waiters (else it takes a batch waiter's place, or is refused)."
        ),
    )
    queue_share_batch: float = Field(
        default=0.25,
        gt=0,
        le=1,
        description=(
            "A batch request enters the queue only while it holds fewer than this share of "
            "`max_queue` waiters (at most the standard share): batch is shed first."
        ),
    )
    shed_sojourn_s: float = Field(
        default=0.02,
        ge=0,
        description=(
            "Target wait of an Admit between its sending and its handler's start (from the "
            "caller's x-llmmesh-sent-at, less that caller's baseline). While every Admit of a "
            "shed_window_s waits longer, Admits are refused at once (RESOURCE_EXHAUSTED, reason "
            "BUSY), batch first, then standard, then interactive "
            "(services/orchestrator/shedding.py). 0: never shed."
        ),
    )
    shed_window_s: float = Field(
        default=0.05,
        gt=0,
        description="Window whose smallest Admit wait is compared with shed_sojourn_s.",
    )
    shed_after_s: float = Field(
        default=1.0,
        ge=0,
        description=(
            "How long Admits must have waited beyond shed_sojourn_s without a break before the "
            "first is shed: a burst this process works through sooner is queued, not refused "
            "(gRPC itself cancels calls held unstarted for ~2 s)."
        ),
    )
    shed_retry_after_s: float = Field(
        default=1.0,
        gt=0,
        description="The retry-after of an Admit shed because this process is behind (BUSY).",
    )
    engine_time_scale: float = Field(
        default=1.0,
        gt=0,
        description=(
            "Wall seconds per modelled second of the engines' cost profile: 1 for real engines; "
            "a slowed emulator's LLMMESH_EMULATOR_TIME_SCALE (the local mesh sets it). The work "
            "model (load ledger, estimated-wait scorer) and the scorer's TTFT SLO are stretched "
            "by it, so the engines' work is modelled as they run it. Hops, probes and "
            "start_soon_s stay wall seconds (they are not slowed with the engines)."
        ),
    )
    start_soon_s: float = Field(
        default=0.25,
        ge=0,
        description=(
            "A replica is leased beyond its batch slots only as many as its leases expected to "
            "end within this many seconds (granted at least the mean service time less this "
            "ago; 0: those past the mean service time), at most the policy's overcommit. "
            "services/orchestrator/OVERLOAD.md compares values."
        ),
    )
    max_in_flight_per_replica: int = Field(
        default=64,
        gt=0,
        description="Leases one replica may hold at once (its in-flight batch cap).",
    )
    default_queue_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="How long Admit waits in the queue when the call has no deadline.",
    )
    health_interval_s: float = Field(
        default=1.0, gt=0, description="Seconds between replica readiness probes."
    )
    health_passive_rounds: int = Field(
        default=4,
        ge=0,
        description=(
            "Health rounds in a row a ready replica goes unprobed while requests succeed on it "
            "(they show it serving; a failed one has it probed at once); 0: probed every round."
        ),
    )
    health_timeout_s: float = Field(
        default=1.0, gt=0, description="Timeout of one readiness probe."
    )
    lease_timeout_s: float = Field(
        default=3600.0, gt=0, description="A lease never completed after this long is reclaimed."
    )
    orphan_lease_grace_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "Leases granted over a caller's AdmitStream are released this long after its last "
            "stream ended, unless it opened another meanwhile (the gateway process is gone: "
            "its Complete reports will never come). A live gateway holding leases opens a "
            "stream again within a second or so of losing one."
        ),
    )
    drain_max_wait_s: float = Field(
        default=300.0,
        gt=0,
        description="How long DrainReplica waits for in-flight leases when the call has no deadline.",
    )
    # kv_registry replicas (llmmesh.common.kv_registries): lookups read from any healthy one,
    # approximate-mode updates go to all; `kv_registry_address` above is one of them.
    kv_registry_addresses: list[str] = Field(
        default_factory=list,
        description="More kv_registry replicas (host:port each; JSON list in the environment).",
    )
    kv_registry_dns: str | None = Field(
        default=None,
        description=(
            "host:port of a headless Service whose A records are kv_registry pods, resolved "
            "every `kv_registry_dns_interval_s` (added to the addresses)."
        ),
    )
    kv_registry_dns_interval_s: float = Field(
        default=kv_registries.DNS_INTERVAL_S,
        gt=0,
        description="Seconds between resolutions of `kv_registry_dns`.",
    )
    kv_registry_retry_s: float = Field(
        default=kv_registries.RETRY_S,
        gt=0,
        description="A kv_registry replica that failed a call is skipped this long, then tried again.",
    )
    kv_update_linger_s: float = Field(
        default=0.02,
        ge=0,
        le=1.0,
        description=(
            "Each batch of kv_registry updates (routing records, reuse reports) waits this long "
            "before it is sent: an idle orchestrator's routing update leaves after the Admit "
            "answer and shares a call with the previous request's reuse report, and a busy one "
            "makes at most one UpdateBatch call per linger (0: at once, a call per answer). "
            "The orchestrator's own matches already include its live leases' prompts, so the "
            "delay only postpones what other orchestrators learn."
        ),
    )
    kv_update_queue: int = Field(
        default=4096,
        gt=0,
        description=(
            "Approximate-mode updates (RecordRouting, ReportReuse) waiting to be sent to "
            "kv_registry; beyond this the oldest is dropped (prediction quality only)."
        ),
    )

    @field_validator("kv_registry_addresses")
    @classmethod
    def _registry_host_ports(cls, value: list[str]) -> list[str]:
        return [kv_registries.check_host_port(v) for v in value]

    @field_validator("kv_registry_dns")
    @classmethod
    def _registry_dns(cls, value: str | None) -> str | None:
        return None if value is None else kv_registries.check_host_port(value)
