from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from llmmesh.common.settings import ServiceSettings
from llmmesh.common.topology import TRITON_MODEL

# The largest request a client may send to the public fronts (an HTTP body, a gRPC message):
# room for a prompt of max_prompt_chars, far below the internal ports' MAX_MESSAGE_BYTES.
MAX_REQUEST_BYTES = 8 * 1024 * 1024


class ModelSettings(BaseModel):
    """One served model."""

    name: str = Field(min_length=1, description="Served model name clients ask for.")
    tokenizer_path: Path = Field(description="HF `tokenizer.json` of the model.")
    triton_model: str = Field(
        default=TRITON_MODEL, description="Triton model name on the replicas."
    )
    context_length: int = Field(default=8192, gt=1, description="Max prompt + completion tokens.")
    max_completion_tokens: int = Field(
        default=4096, gt=0, description="Upper bound for max_tokens."
    )
    default_max_tokens: int = Field(
        default=256, gt=0, description="max_tokens when the request has none."
    )
    end_id: int | None = Field(
        default=None,
        ge=0,
        description="End-of-sequence token id; the tokenizer's EOS token when unset.",
    )
    eos_token: str = Field(
        default="<|im_end|>", description="EOS token text used when end_id is unset."
    )
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list,
        description=(
            "More token ids that end a generation (finish `stop`, the token not emitted), as the "
            "list in a model's `generation_config.json` `eos_token_id`: Llama 3 Instruct ends a "
            "turn with <|eot_id|> (128009) and raw text with <|end_of_text|> (128001), one of "
            "them the engines' end_id. The gateway ends the stream at the first of them and "
            "closes the engine's."
        ),
    )
    chat_template_path: Path | None = Field(
        default=None,
        description=(
            "Chat template (Jinja) for /v1/chat/completions: a `.jinja` file, or a "
            "`tokenizer_config.json` with a `chat_template` key. When unset: `chat_template.jinja`, "
            "then `tokenizer_config.json`, next to the tokenizer; no chat endpoint for the model "
            "when neither has one."
        ),
    )


class GatewaySettings(ServiceSettings):
    """Gateway settings (env prefix LLMMESH_GATEWAY_)."""

    model_config = SettingsConfigDict(env_prefix="LLMMESH_GATEWAY_", extra="ignore")

    grpc_port: int = Field(
        default=50051, ge=0, le=65535, description="gRPC port; 0 picks a free one."
    )
    http_port: int = Field(
        default=8080,
        ge=0,
        le=65535,
        description="OpenAI-compatible HTTP port (/v1/chat/completions, ...); 0 picks a free one.",
    )
    http_max_body_bytes: int = Field(
        default=MAX_REQUEST_BYTES,
        gt=0,
        description="Largest accepted HTTP request body; larger bodies get 413 before being read.",
    )
    grpc_max_request_bytes: int = Field(
        default=MAX_REQUEST_BYTES,
        gt=0,
        description=(
            "Largest accepted gRPC request message on the public port; larger ones get "
            "RESOURCE_EXHAUSTED before being parsed."
        ),
    )
    metrics_port: int = Field(
        default=9101, ge=0, le=65535, description="Prometheus port; 0 picks a free one."
    )
    orchestrator_address: str = Field(
        default="127.0.0.1:50052", description="host:port of the orchestrator."
    )
    model_version: str = Field(
        default="",
        description="Model version this gateway admits for (canary subsets); any when empty.",
    )
    shadow: bool = Field(
        default=False,
        description="Shadow gateway for mirrored traffic: every request admitted as batch.",
    )
    models: list[ModelSettings] = Field(
        default_factory=list, description="Served models (JSON in the environment)."
    )
    request_timeout_s: float = Field(
        default=600.0, gt=0, description="Deadline applied when the client sets none."
    )
    max_request_timeout_s: float = Field(
        default=86_400.0,
        gt=0,
        le=10_000_000,
        description="Longest deadline a client may set (x-request-timeout, the gRPC deadline); "
        "a longer one is cut to it. gRPC deadlines far beyond it overflow and expire at once.",
    )
    readiness_timeout_s: float = Field(
        default=1.0,
        gt=0,
        description=(
            "How long the readiness route (GET /ready) waits for the orchestrator's replica view "
            "before answering not ready."
        ),
    )
    retries_before_first_token: int = Field(
        default=1,
        ge=0,
        description=(
            "When a replica fails before the first token, admit again this many times, on "
            "another replica."
        ),
    )
    max_migrations: int = Field(
        default=2,
        ge=0,
        description=(
            "When a replica fails after the first token (a replica fault, or no token within "
            "stall_timeout_s), continue the request on another replica this many times: the "
            "prompt plus the tokens generated so far, the remaining max_tokens, the same client "
            "stream. 0: such a failure ends the stream with UNAVAILABLE."
        ),
    )
    stall_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description=(
            "Once a request has its first token: longest wait for the replica's next token (a "
            "continuation's first one included) before the stream is cancelled as a replica "
            "fault and migrated. 0: off."
        ),
    )
    max_prompt_chars: int = Field(
        default=1_000_000,
        gt=0,
        description="Prompts longer than this are rejected before tokenizing.",
    )
    max_chat_messages: int = Field(
        default=4096, gt=0, description="Most chat messages per request."
    )
    max_stop_strings: int = Field(default=8, ge=0, description="Most stop strings per request.")
    max_stop_chars: int = Field(
        default=256,
        gt=0,
        description=(
            "Longest stop string: the stream holds back one character less than the longest, "
            "so a longer one would keep that much text from streaming."
        ),
    )
    max_request_id_chars: int = Field(default=256, gt=0, description="Longest accepted request id.")
    tenants_file: Path | None = Field(
        default=None,
        description=(
            "Tenants, API key digests and limits (YAML/JSON, schema in services/gateway/auth.py). "
            "Unset: authentication and per-tenant limits are off."
        ),
    )
    http_request_id_is_key: bool = Field(
        default=True,
        description=(
            "Whether an HTTP client's x-request-id is an idempotency key (as `Idempotency-Key` "
            "always is). Turn off behind Envoy/Istio, which sets x-request-id on every request."
        ),
    )
    resume_retention_s: float = Field(
        default=60.0,
        ge=0,
        description=(
            "How long a finished generation with a client request id stays resumable "
            "(same id and body: replayed, not generated again)."
        ),
    )
    resume_grace_s: float = Field(
        default=10.0,
        ge=0,
        description=(
            "How long a generation with a client request id keeps running after its last "
            "client disconnected, waiting for a retry to re-attach; then it is cancelled."
        ),
    )
    resume_max_entries: int = Field(
        default=10_000,
        gt=0,
        description="Most generations (running and finished) held for request-id retries.",
    )
    resume_max_tokens: int = Field(
        default=1_000_000,
        gt=0,
        description=(
            "Most completion tokens held for request-id retries (about 210 bytes each when the "
            "engine streams one token per response; a running generation reserves its "
            "max_tokens); when full, finished ones are evicted oldest first, then new keyed "
            "requests get RESOURCE_EXHAUSTED."
        ),
    )
    resume_redis_url: str | None = Field(
        default=None,
        description=(
            "Redis shared by every gateway for request-id retries (`redis://host:6379/0`, "
            "`rediss://` for TLS; services/gateway/resume_redis.py): a retry or resume that "
            "lands on another gateway attaches to the same generation, and one whose gateway "
            "died continues it. Unset: the in-process store (one gateway). While Redis is "
            "unreachable, keyed requests get UNAVAILABLE with a retry-after."
        ),
    )
    resume_redis_lease_s: float = Field(
        default=2.0,
        gt=0,
        description=(
            "Claim on a running keyed generation in Redis, renewed by its gateway; a gateway "
            "silent this long is taken for dead and the next retry continues the generation."
        ),
    )
    resume_redis_flush_interval_s: float = Field(
        default=0.05,
        gt=0,
        description=(
            "Longest wait before a running keyed generation's new tokens are written to Redis "
            "(one write per batch, off the per-token path): what a gateway killed mid-stream "
            "may not have written, and its successor generates again."
        ),
    )
    resume_redis_flush_tokens: int = Field(
        default=64,
        gt=0,
        description="Write a keyed generation's tokens to Redis as soon as this many wait.",
    )
    resume_redis_timeout_s: float = Field(
        default=1.0,
        gt=0,
        description="Connect and reply timeout of each Redis call.",
    )
    redis_max_connections: int = Field(
        default=128,
        gt=0,
        description=(
            "Most connections each of the gateway's three Redis clients holds (the shared rate "
            "limiter's; the resume store's calls; its blocking reads, one per client following "
            "another gateway's generation); a call beyond waits for a free one up to its "
            "timeout (a blocking read: up to a lease) (services/gateway/redis_pool.py). Three times it stays within the Redis "
            "DestinationRule's maxConnections per gateway sidecar (512)."
        ),
    )
    max_concurrent_streams: int = Field(
        default=2048,
        gt=0,
        description=(
            "Most generations (streaming or not, both fronts) this gateway process runs at once; "
            "beyond it requests get RESOURCE_EXHAUSTED / 429 with a retry-after "
            "(services/gateway/limits.py). Bounds the process's memory whatever the offered load."
        ),
    )
    admission_max_wait_s: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Longest a request may wait for admission (the orchestrator's queue): the Admit "
            "deadline is the sooner of this and the request's own, so the orchestrator refuses "
            "at once what it expects to wait longer; a request that still waits this long gets "
            "RESOURCE_EXHAUSTED with this as its retry-after. Set it to the TTFT objective to "
            "admit only work that can meet it. Unset: the request's deadline."
        ),
    )
    overload_retry_after_min_s: float = Field(
        default=0.2,
        gt=0,
        description="Smallest retry-after sent when a concurrency limit (process or tenant) refuses.",
    )
    overload_retry_after_max_s: float = Field(
        default=10.0,
        gt=0,
        description="Largest retry-after sent when a concurrency limit (process or tenant) refuses.",
    )
    limits_redis_url: str | None = Field(
        default=None,
        description=(
            "Redis holding every tenant's request- and token-rate buckets for all gateways "
            "(services/gateway/limits_redis.py): a tenant's limits hold cluster-wide. May be the "
            "resume store's Redis. Unset: each gateway enforces the limits on its own."
        ),
    )
    limits_gateways: int = Field(
        default=1,
        gt=0,
        description=(
            "With limits_redis_url: while Redis is unreachable each gateway enforces "
            "1/limits_gateways of every tenant rate limit on its own (fail safe: set it to the "
            "most gateway pods that run, and the tenant never gets more than its limit)."
        ),
    )
    limits_redis_timeout_s: float = Field(
        default=0.1,
        gt=0,
        description="Connect and reply timeout of a rate-limit call to Redis (on the request path).",
    )
    limits_redis_retry_s: float = Field(
        default=1.0,
        gt=0,
        description=(
            "After a failed rate-limit call, requests use the local fallback share this long "
            "before Redis is tried again."
        ),
    )
    limits_redis_flush_s: float = Field(
        default=0.1,
        gt=0,
        description="Completion tokens are charged to the shared buckets in one write this often.",
    )
    usage_log_path: Path | None = Field(
        default=None,
        description=(
            "Append-only JSON-lines usage log, one record per finished request "
            "(services/gateway/usage.py). Unset: no log (the metrics are kept either way)."
        ),
    )
    usage_queue_size: int = Field(
        default=10_000,
        gt=0,
        description=(
            "Usage records waiting for the log writer; beyond it records are left out of the "
            "log and counted as dropped (never blocking a request)."
        ),
    )
    orchestrator_addresses: list[str] = Field(
        default_factory=list,
        description=(
            "host:port of every orchestrator (JSON list), run active-active: Admit is spread "
            "over them and retried on the next one when one is not reached; Complete goes to the "
            "orchestrator that granted the lease. Empty: `orchestrator_address` alone."
        ),
    )
    orchestrator_dns: str | None = Field(
        default=None,
        description=(
            "host:port of a headless Service whose A records are the orchestrator pods "
            "(Kubernetes), resolved every `orchestrator_refresh_interval_s`; each pod is dialled "
            "at its IP with this host:port as :authority. Takes precedence over the addresses."
        ),
    )
    orchestrator_refresh_interval_s: float = Field(
        default=2.0,
        gt=0,
        description=(
            "How often the orchestrator pods are resolved (orchestrator_dns) and the replica "
            "view kept for degraded mode is refreshed (ListReplicas)."
        ),
    )
    orchestrator_admit_stream: bool = Field(
        default=True,
        description=(
            "Send Admits on one AdmitStream call per orchestrator (a message each instead of a "
            "call each); an orchestrator that refuses the method gets Admit calls. Off: Admit "
            "calls only."
        ),
    )
    orchestrator_retry_after_s: float = Field(
        default=1.0,
        ge=0,
        description=(
            "An orchestrator not reached is tried after the others for this long (it is still "
            "tried when none of them answers)."
        ),
    )
    degraded_mode: bool = Field(
        default=True,
        description=(
            "When no orchestrator answers, keep serving: lease replicas from the last replica "
            "view an orchestrator gave (routable then, least outstanding of this gateway's own "
            "leases); metric llmmesh_gateway_degraded. Off: such requests get UNAVAILABLE."
        ),
    )
    degraded_view_max_age_s: float = Field(
        default=300.0,
        gt=0,
        description=(
            "Oldest last-known replica view degraded mode routes over; older, requests get "
            "UNAVAILABLE until an orchestrator answers again."
        ),
    )
