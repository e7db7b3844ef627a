"""Settings objects to a child's environment and back (llmmesh.common.settings)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from llmmesh.common.discovery import DnsTarget
from llmmesh.common.settings import KvBlockSettings, env_prefix, split_env, to_env, with_env
from llmmesh.emulator.settings import EmulatorSettings
from services.autoscaler.actuators.local_settings import LocalActuatorSettings, ManagedPool
from services.autoscaler.policy import CostConfig, PolicyConfig
from services.autoscaler.settings import AutoscalerSettings, PoolConfig, ScrapeTarget
from services.gateway.settings import GatewaySettings, ModelSettings
from services.kv_registry.settings import KvRegistrySettings
from services.orchestrator.settings import OrchestratorSettings, ReplicaSpec

EXAMPLES: list[BaseSettings] = [
    KvBlockSettings(block_size=16, hash_seed=2**63),
    KvRegistrySettings(grpc_port=0, max_entries=7, predicted_shrink=0.5, log_json=False),
    OrchestratorSettings(
        grpc_port=1234,
        kv_registry_address="127.0.0.1:9",
        replicas=[
            ReplicaSpec(id="r0", grpc_address="127.0.0.1:8001"),
            ReplicaSpec(id="r1", grpc_address="h:1", pool="long", models=["a", "b"]),
        ],
        replica_dns=[DnsTarget(host="triton.svc", pool="short", metrics_port=9)],
        policy_file=Path("/tmp/policy.yaml"),
        profile="prefix-only",
        health_interval_s=0.25,
        otlp_endpoint="http://jaeger:4317",
    ),
    GatewaySettings(
        http_port=0,
        models=[ModelSettings(name="m", tokenizer_path=Path("/t.json"), context_length=64)],
        shadow=True,
        resume_grace_s=1e-3,
        ready_file=Path("/tmp/ready.json"),
    ),
    AutoscalerSettings(
        source="promql",
        prometheus_url="http://prometheus:9090",
        pools=[
            PoolConfig(
                pool="auto",
                model_version="v2",
                policy=PolicyConfig(min_replicas=0, cost=CostConfig(time_scale=0.5)),
            )
        ],
        targets=[ScrapeTarget(replica_id="r", metrics_url="http://h:1/metrics", pool="p")],
        default_policy=PolicyConfig(forecast=True),
        local_actuator=LocalActuatorSettings(
            orchestrator_address="127.0.0.1:1",
            engine_env={"A": "1"},
            pools=[
                ManagedPool(
                    pool="auto", model_version="v2", model_repository=Path("/r"), models=["m"]
                )
            ],
        ),
    ),
    EmulatorSettings(replica_id="replica-0", time_scale=0.0, cost_profile="llama-3.1-8b-h100-bf16"),
]


def rebuilt(settings: BaseSettings, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> object:
    """`type(settings)()` in an environment holding `env` and no other variable of its prefix."""
    prefix = env_prefix(type(settings))
    for key in list(os.environ):
        if key.upper().startswith(prefix):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return type(settings)()


@pytest.mark.parametrize("settings", EXAMPLES, ids=lambda s: type(s).__name__)
def test_to_env_round_trips(settings: BaseSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    env = to_env(settings)
    assert all(k.startswith(env_prefix(type(settings))) for k in env)
    assert rebuilt(settings, env, monkeypatch) == settings


def test_to_env_writes_set_fields_and_json_for_structures() -> None:
    s = OrchestratorSettings(
        grpc_port=50052, replicas=[ReplicaSpec(id="r", grpc_address="h:1")], log_json=False
    )
    env = to_env(s)
    # Set explicitly, even to the default: the child's inherited environment must not win.
    assert env["LLMMESH_ORCHESTRATOR_GRPC_PORT"] == "50052"
    assert env["LLMMESH_ORCHESTRATOR_LOG_JSON"] == "false"
    assert env["LLMMESH_ORCHESTRATOR_REPLICAS"].startswith('[{"id":"r",')
    assert "LLMMESH_ORCHESTRATOR_MAX_QUEUE" not in env  # neither set nor changed


def test_split_env_picks_the_longest_prefix_and_refuses_unknown_fields() -> None:
    env = {
        "LLMMESH_KV_BLOCK_SIZE": "16",
        "LLMMESH_KV_REGISTRY_MAX_ENTRIES": "5",
        "PATH": "/bin",
    }
    owned, rest = split_env(env, [KvBlockSettings, KvRegistrySettings])
    assert owned == {
        KvBlockSettings: {"LLMMESH_KV_BLOCK_SIZE": "16"},
        KvRegistrySettings: {"LLMMESH_KV_REGISTRY_MAX_ENTRIES": "5"},
    }
    assert rest == {"PATH": "/bin"}
    with pytest.raises(ValueError, match="LLMMESH_GATEWAY_RESUME_GRACE: GatewaySettings"):
        split_env({"LLMMESH_GATEWAY_RESUME_GRACE": "1"}, [GatewaySettings])


def test_with_env_decodes_and_validates_what_it_sets() -> None:
    base = GatewaySettings(grpc_port=1)
    got = with_env(
        base,
        {
            "LLMMESH_GATEWAY_RESUME_GRACE_S": "600",
            "LLMMESH_GATEWAY_SHADOW": "true",
            "LLMMESH_GATEWAY_MODELS": '[{"name": "m", "tokenizer_path": "/t"}]',
            "LLMMESH_ORCHESTRATOR_PROFILE": "ignored: another class's",
        },
    )
    assert (got.grpc_port, got.resume_grace_s, got.shadow) == (1, 600.0, True)
    assert got.models == [ModelSettings(name="m", tokenizer_path=Path("/t"))]
    assert with_env(base, {}) is base
    with pytest.raises(ValueError, match="greater than 0"):
        with_env(base, {"LLMMESH_GATEWAY_REQUEST_TIMEOUT_S": "-1"})
