"""Every Prometheus metric name llmmesh exposes or reads, in one place.

Producers declare their metrics with these names; consumers (the autoscaler's signal sources,
the orchestrator's engine sampler, dashboards and alert checks, tests) import them instead of
re-typing strings. Counters carry their exposed `_total` name (prometheus_client accepts it);
histograms their base name (series add `_bucket`, `_count`, `_sum`).
"""

from __future__ import annotations

from typing import Final

# -- gateway --------------------------------------------------------------------------------
GATEWAY_TTFT: Final = "llmmesh_gateway_time_to_first_token_seconds"
GATEWAY_ITL: Final = "llmmesh_gateway_inter_token_latency_seconds"
GATEWAY_DURATION: Final = "llmmesh_gateway_request_duration_seconds"
GATEWAY_REQUESTS: Final = "llmmesh_gateway_requests_total"
GATEWAY_TOKENS: Final = "llmmesh_gateway_tokens_total"
GATEWAY_IN_FLIGHT: Final = "llmmesh_gateway_in_flight_requests"
GATEWAY_TENANT_TOKENS: Final = "llmmesh_gateway_tenant_tokens_total"
GATEWAY_RATE_LIMITED: Final = "llmmesh_gateway_rate_limited_total"
# Shared rate limiter (services/gateway/limits_redis.py): failed Redis calls, and the calls the
# local fallback share answered instead (Redis failing or within its retry window).
GATEWAY_RATE_LIMIT_REDIS_ERRORS: Final = "llmmesh_gateway_rate_limit_redis_errors_total"
GATEWAY_RATE_LIMIT_FALLBACK: Final = "llmmesh_gateway_rate_limit_fallback_total"
GATEWAY_RESUME_REQUESTS: Final = "llmmesh_gateway_resume_requests_total"
GATEWAY_RESUME_EVICTIONS: Final = "llmmesh_gateway_resume_evictions_total"
GATEWAY_RESUME_ENTRIES: Final = "llmmesh_gateway_resume_entries"
GATEWAY_RESUME_TOKENS: Final = "llmmesh_gateway_resume_tokens"
GATEWAY_RESUME_REDIS_WRITES: Final = "llmmesh_gateway_resume_redis_writes_total"
GATEWAY_RESUME_REDIS_ERRORS: Final = "llmmesh_gateway_resume_redis_errors_total"
GATEWAY_USAGE_RECORDS: Final = "llmmesh_gateway_usage_log_records_total"
GATEWAY_MIGRATIONS: Final = "llmmesh_gateway_migrations_total"
# Several orchestrators (services/gateway/orchestrators.py): 1 while none answers and the gateway
# admits on its own over its last-known replica view; admissions granted that way; Admit calls
# retried on another orchestrator because one was not reached.
GATEWAY_DEGRADED: Final = "llmmesh_gateway_degraded"
GATEWAY_DEGRADED_ADMISSIONS: Final = "llmmesh_gateway_degraded_admissions_total"
GATEWAY_ADMIT_FAILOVERS: Final = "llmmesh_gateway_admit_failovers_total"

# -- orchestrator ---------------------------------------------------------------------------
ORCH_QUEUE_DEPTH: Final = "llmmesh_orchestrator_queue_depth"
ORCH_QUEUE_WAIT: Final = "llmmesh_orchestrator_queue_wait_seconds"
ORCH_DECISIONS: Final = "llmmesh_orchestrator_decisions_total"
ORCH_REJECTIONS: Final = "llmmesh_orchestrator_rejections_total"
ORCH_REPLICA_IN_FLIGHT: Final = "llmmesh_orchestrator_replica_in_flight"
ORCH_REPLICA_HEALTHY: Final = "llmmesh_orchestrator_replica_healthy"
ORCH_PREFIX_HIT_BLOCKS: Final = "llmmesh_orchestrator_prefix_hit_blocks_total"
ORCH_PROMPT_BLOCKS: Final = "llmmesh_orchestrator_prompt_blocks_total"
ORCH_POOL_QUEUE_DEPTH: Final = "llmmesh_orchestrator_pool_queue_depth"
ORCH_POOL_READY: Final = "llmmesh_orchestrator_pool_ready_replicas"
ORCH_EJECTIONS: Final = "llmmesh_orchestrator_ejections_total"
ORCH_PLUGIN_DURATION: Final = "llmmesh_orchestrator_plugin_duration_seconds"
ORCH_KV_UPDATES_DROPPED: Final = "llmmesh_orchestrator_kv_updates_dropped_total"
ORCH_KV_LOOKUPS: Final = "llmmesh_orchestrator_kv_lookups_total"
ORCH_KV_MIRROR_SYNCED: Final = "llmmesh_orchestrator_kv_mirror_synced"
ORCH_KV_MIRROR_BLOCKS: Final = "llmmesh_orchestrator_kv_mirror_blocks"
ORCH_SOJOURN: Final = "llmmesh_orchestrator_call_sojourn_seconds"
ORCH_SHED_LEVEL: Final = "llmmesh_orchestrator_shed_level"

# -- kv_registry ----------------------------------------------------------------------------
KV_EVENTS: Final = "llmmesh_kv_registry_events_total"
KV_BLOCKS: Final = "llmmesh_kv_registry_blocks"
KV_UNIQUE_BLOCKS: Final = "llmmesh_kv_registry_unique_blocks"
KV_ENTRIES: Final = "llmmesh_kv_registry_entries"
KV_GARBAGE_ENTRIES: Final = "llmmesh_kv_registry_garbage_entries"
KV_EVICTIONS: Final = "llmmesh_kv_registry_evictions_total"
KV_LOOKUPS: Final = "llmmesh_kv_registry_lookups_total"
KV_LOOKUP_SECONDS: Final = "llmmesh_kv_registry_lookup_seconds"
KV_RESYNCS: Final = "llmmesh_kv_registry_resyncs_total"
KV_ROUTINGS: Final = "llmmesh_kv_registry_routings_total"
KV_PREDICTED_BLOCKS: Final = "llmmesh_kv_registry_predicted_blocks_total"
KV_CONFIRMED_BLOCKS: Final = "llmmesh_kv_registry_confirmed_blocks_total"
KV_REPORTED_PROMPT_BLOCKS: Final = "llmmesh_kv_registry_reported_prompt_blocks_total"
KV_REPORTED_REUSED_BLOCKS: Final = "llmmesh_kv_registry_reported_reused_blocks_total"
KV_PREDICTED_CAPACITY: Final = "llmmesh_kv_registry_predicted_capacity"
KV_REPLICA_EXACT: Final = "llmmesh_kv_registry_replica_exact"

# -- autoscaler -----------------------------------------------------------------------------
AS_DESIRED_REPLICAS: Final = "llmmesh_autoscaler_desired_replicas"
AS_CURRENT_REPLICAS: Final = "llmmesh_autoscaler_current_replicas"
AS_READY_REPLICAS: Final = "llmmesh_autoscaler_ready_replicas"
AS_STARTING_REPLICAS: Final = "llmmesh_autoscaler_starting_replicas"
AS_DRAINING_REPLICAS: Final = "llmmesh_autoscaler_draining_replicas"
AS_DECISIONS: Final = "llmmesh_autoscaler_decisions_total"
AS_ERRORS: Final = "llmmesh_autoscaler_errors_total"
AS_PANIC: Final = "llmmesh_autoscaler_panic"

# -- TensorRT-LLM backend (Triton's /metrics; produced by the engines, read by llmmesh) -----
TRTLLM_REQUEST_METRICS: Final = "nv_trt_llm_request_metrics"
TRTLLM_KV_CACHE_BLOCK_METRICS: Final = "nv_trt_llm_kv_cache_block_metrics"
