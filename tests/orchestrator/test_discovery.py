from __future__ import annotations

from llmmesh.common.discovery import DiscoveredPod, DnsTarget
from services.orchestrator.discovery import discover, replicas_from_pods
from services.orchestrator.settings import OrchestratorSettings, ReplicaSpec


def test_replicas_from_pods_ids_and_authority() -> None:
    t = DnsTarget(host="triton.svc", pool="short", model_version="v2")
    specs = replicas_from_pods([DiscoveredPod(t, "10.0.0.2")])
    assert [(s.id, s.grpc_address, s.authority, s.pool, s.model_version) for s in specs] == [
        ("short-v2-10.0.0.2", "10.0.0.2:8001", "triton.svc:8001", "short", "v2")
    ]


async def test_discover_resolves_localhost_and_skips_unresolvable() -> None:
    settings = OrchestratorSettings(
        replicas=[ReplicaSpec(id="static", grpc_address="127.0.0.1:1")],
        replica_dns=[
            DnsTarget(host="localhost", port=8001),
            DnsTarget(host="does-not-exist.invalid"),
        ],
    )
    specs = await discover(settings)
    assert specs[0].id == "static"
    assert "127.0.0.1:8001" in {s.grpc_address for s in specs[1:]}
