"""Lookups the rules share: named ports, component and Triton Deployments, environments, the
orchestrator policy and the istiod values."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from llmmesh.common.components import Component
from llmmesh.tools.meshcheck.common import Doc, require
from llmmesh.tools.meshcheck.index import Mesh

# The ports tritonserver is started with (--http-port, --grpc-port, --metrics-port).
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


# The component label of the gateways' Redis (base/redis.yaml): a third-party image with no
# drain setting and no metrics port, reached over plain TCP.
REDIS_COMPONENT = "redis"
# Istio protocol selection (Service port appProtocol, else the name's prefix): these are proxied
# as plain TCP (mongo, mysql and redis unless istiod enables their filters), so only the port
# applies to them in AuthorizationPolicies and DestinationRules, never HTTP fields or limits.
ISTIO_TCP_PROTOCOLS = frozenset({"tcp", "tls", "mongo", "mysql", "redis"})


def is_tcp_port(port: Mapping[str, Any]) -> bool:
    """Whether Istio proxies a Service port as plain TCP (appProtocol first, then the name)."""
    protocol = str(port.get("appProtocol") or str(port.get("name", "")).split("-", 1)[0])
    return protocol.lower() in ISTIO_TCP_PROTOCOLS


def is_tcp_service(svc: Doc) -> bool:
    """A Service with plain TCP ports only (HTTP connection-pool limits do not apply)."""
    return all(is_tcp_port(p) for p in svc["spec"]["ports"])


def is_redis(doc: Doc) -> bool:
    """A Redis Service or Deployment (label app.kubernetes.io/component: redis)."""
    return bool(
        doc["metadata"].get("labels", {}).get("app.kubernetes.io/component") == REDIS_COMPONENT
    )


def port_by_name(ports: Iterable[Mapping[str, Any]], name: str) -> Mapping[str, Any] | None:
    return next((p for p in ports if p.get("name") == name), None)


def service_port_numbers(svc: Doc) -> set[int]:
    return {int(p["port"]) for p in svc["spec"]["ports"]}


def component_deployments(mesh: Mesh, comp: Component) -> list[Doc]:
    return [
        d
        for d in mesh.in_namespace("Deployment")
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name")
        == comp.k8s_object
    ]


def triton_deployments(mesh: Mesh) -> list[Doc]:
    return [
        d
        for d in mesh.in_namespace("Deployment")
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
        == "triton"
    ]


def policy_of(mesh: Mesh) -> dict[str, Any]:
    cm = require(
        mesh.configmap_by_prefix("llmmesh-orchestrator-policy"),
        "ConfigMap llmmesh-orchestrator-policy",
    )
    loaded: dict[str, Any] = yaml.safe_load(cm["data"]["policy.yaml"])
    return loaded


def env_of(mesh: Mesh, deployment: str) -> dict[str, str]:
    dep = require(mesh.get("Deployment", deployment), f"Deployment {deployment}")
    return mesh.container_env(dep, mesh.main_container(dep))


def orchestrator_env(mesh: Mesh) -> dict[str, str]:
    return env_of(mesh, "llmmesh-orchestrator")


def gateway_env(mesh: Mesh) -> dict[str, str]:
    return env_of(mesh, "llmmesh-gateway-v1")


def autoscaler_env(mesh: Mesh) -> dict[str, str]:
    return env_of(mesh, "llmmesh-autoscaler")


def istiod_values(root: Path) -> dict[str, Any]:
    """The Helm values istiod is installed with (mesh/istio-system/istiod-values.yaml)."""
    loaded: dict[str, Any] = yaml.safe_load(
        (root / "istio-system" / "istiod-values.yaml").read_text()
    )
    return loaded


def plaintext_hosts(mesh: Mesh) -> set[str]:
    """Hosts outside the mesh namespace dialled in plain text: the autoscaler's Prometheus (a
    sidecar that intercepts no inbound port)."""
    if mesh.get("Deployment", "llmmesh-autoscaler") is None:
        return set()  # a render without the autoscaler dials no Prometheus
    env = autoscaler_env(mesh)
    url = env.get("LLMMESH_AUTOSCALER_PROMETHEUS_URL")
    if env.get("LLMMESH_AUTOSCALER_SOURCE") != "promql" or not url:
        return set()
    return {urlsplit(url).hostname or ""}
