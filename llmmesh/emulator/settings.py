"""Settings of the engine emulator (the `tensorrt_llm` Python-backend model in
`model_repository/emulator`). Read from `LLMMESH_EMULATOR_*` in the Triton process environment.
Block identity (block size, hash seed) is *not* here: it comes from
`llmmesh.common.settings.KvBlockSettings` (`LLMMESH_KV_*`), shared with the KV registry."""

from __future__ import annotations

import socket

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from llmmesh.accelerators import DEFAULT_PROFILE, PROFILES
from llmmesh.common import kv_registries


class EmulatorSettings(BaseSettings):
    """Engine emulator knobs; defaults describe one Llama-3.1-8B BF16 replica on one H100 SXM."""

    model_config = SettingsConfigDict(env_prefix="LLMMESH_EMULATOR_", extra="ignore")

    replica_id: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        description="Name of this replica in KV events (the pod name in Kubernetes); default: hostname.",
    )
    kv_registry_address: str | None = Field(
        default=None,
        description=(
            "host:port of a kv_registry replica. Events go to every registry named here, in "
            "`kv_registry_addresses` and behind `kv_registry_dns`; publishing is off when none is."
        ),
    )
    kv_registry_addresses: list[str] = Field(
        default_factory=list,
        description="More kv_registry replicas (host:port each; JSON list in the environment).",
    )
    kv_registry_dns: str | None = Field(
        default=None,
        description=(
            "host:port of a headless Service whose A records are kv_registry pods (resolved "
            "every `kv_registry_dns_interval_s`; each pod gets its own stream)."
        ),
    )
    kv_registry_dns_interval_s: float = Field(
        default=kv_registries.DNS_INTERVAL_S,
        gt=0,
        description="Seconds between resolutions of `kv_registry_dns`.",
    )
    max_batch_size: int = Field(
        default=64,
        gt=0,
        description="Most sequences in flight at once (TensorRT-LLM `max_batch_size`).",
    )
    num_kv_blocks: int = Field(
        default=12800,
        gt=0,
        description=(
            "KV-cache capacity in blocks. Default: (80e9 B HBM - 16.06e9 B weights - ~4e9 B "
            "activations/runtime) * 0.9 (`kv_cache_free_gpu_mem_fraction`) / (131072 B/token * 32 "
            "tokens/block) ~= 12.8k blocks."
        ),
    )
    max_queue_size: int = Field(
        default=128,
        gt=0,
        description=(
            "Most requests waiting for a batch slot (TensorRT-LLM `max_queue_size`, which "
            "model_repository/production sets to the same value); a request arriving when it is "
            "full gets an error response at once (RESOURCE_EXHAUSTED in its message). The "
            "emulator's config.pbtxt leaves Triton's own queue unbounded: Triton 2.51 leaks a "
            "decoupled stream whose request its scheduler refused."
        ),
    )
    max_num_tokens: int = Field(
        default=8192,
        gt=0,
        description=(
            "Most tokens one iteration may process (prefill tokens + one per decoding sequence), "
            "TensorRT-LLM `max_num_tokens`. Without chunked context a longer prompt is rejected."
        ),
    )
    cost_profile: str = Field(
        default=DEFAULT_PROFILE,
        description=f"Named step-time model, one of: {', '.join(sorted(PROFILES))}.",
    )
    time_scale: float = Field(
        default=1.0,
        ge=0,
        description="Multiplier on modelled step time before sleeping (0.01 = 100x faster, 0 = no waiting).",
    )
    vocab_min: int = Field(
        default=100,
        ge=0,
        description="Smallest generated token id (SmolLM2's special tokens are ids 0..16).",
    )
    vocab_max: int = Field(
        default=49152,
        gt=0,
        description="One past the largest generated token id (SmolLM2 vocabulary size 49152).",
    )
    cancellation_check_period_ms: float = Field(
        default=100.0,
        gt=0,
        description=(
            "How often the engine asks Triton whether in-flight requests were cancelled "
            "(production's `cancellation_check_period_ms`). Each poll is one round trip to "
            "tritonserver per request in flight (running or waiting)."
        ),
    )
    metrics_interval_ms: float = Field(
        default=100.0,
        gt=0,
        description="How often the model copies engine statistics into the nv_trt_llm_* gauges.",
    )
    publish_max_batch: int = Field(
        default=512,
        gt=0,
        description="Most KV events per PublishEvents call.",
    )
    publish_interval_ms: float = Field(
        default=20.0,
        gt=0,
        description="How long the publisher waits to fill a batch before sending what it has.",
    )
    publish_queue_size: int = Field(
        default=65536,
        gt=0,
        description="Bound of the publisher queue; on overflow events are dropped and a snapshot is sent.",
    )
    publish_timeout_s: float = Field(
        default=2.0, gt=0, description="Deadline of one PublishEvents call."
    )
    publish_heartbeat_s: float = Field(
        default=5.0,
        gt=0,
        le=10.0,
        description=(
            "A stream with nothing to send for this long sends a heartbeat (its next sequence): "
            "a restarted or lagging registry then asks for a snapshot without waiting for an "
            "event, does not drop the replica as gone (kv_registry's exact_silence_s, 60 s), and "
            "keeps refusing an engine lifetime that started before this one (while it heard "
            "from this one within a quarter of exact_silence_s: at most 10 s leaves room for one "
            "late heartbeat)."
        ),
    )

    @field_validator("kv_registry_address", "kv_registry_dns")
    @classmethod
    def _optional_host_port(cls, value: str | None) -> str | None:
        return None if value is None else kv_registries.check_host_port(value)

    @field_validator("kv_registry_addresses")
    @classmethod
    def _host_ports(cls, value: list[str]) -> list[str]:
        return [kv_registries.check_host_port(v) for v in value]

    @property
    def publishes_kv_events(self) -> bool:
        """Whether any kv_registry is configured."""
        return bool(self.kv_registry_address or self.kv_registry_addresses or self.kv_registry_dns)

    def kv_registry_description(self) -> str:
        """The configured registries, for a log line."""
        named = [e.address for e in self.kv_registry_endpoints()]
        if self.kv_registry_dns:
            named.append(f"dns:{self.kv_registry_dns}")
        return ",".join(named) or "off"

    def kv_registry_endpoints(self) -> list[kv_registries.RegistryEndpoint]:
        """The statically named registries (those behind `kv_registry_dns` come at run time)."""
        return kv_registries.static_endpoints(self.kv_registry_address, self.kv_registry_addresses)

    @model_validator(mode="after")
    def _check(self) -> EmulatorSettings:
        if self.vocab_min >= self.vocab_max:
            raise ValueError(f"vocab_min ({self.vocab_min}) must be < vocab_max ({self.vocab_max})")
        if self.cost_profile not in PROFILES:
            raise ValueError(
                f"unknown cost_profile {self.cost_profile!r}; known: {', '.join(sorted(PROFILES))}"
            )
        return self
