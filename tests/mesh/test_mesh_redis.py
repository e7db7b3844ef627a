"""The gateways' Redis: only the gateways reach it (plain TCP, by port and principal), the rules
that know TCP ports accept it, and meshcheck rule `redis` notices a broken setup (URLs, the
shadow's keyspace, the limiter's fallback share, a Redis that is no bounded cache)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from llmmesh.common.components import GATEWAY
from llmmesh.tools.meshcheck.common import Doc
from llmmesh.tools.meshcheck.index import Mesh, principal
from llmmesh.tools.meshcheck.rules import readme, redis, security
from llmmesh.tools.meshcheck.rules.helpers import component_deployments
from services.gateway.settings import GatewaySettings
from tests.mesh.helpers import doc, mesh_of

REDIS_LABELS = {"app": "llmmesh-redis", "app.kubernetes.io/component": "redis"}
REDIS_HOST = "llmmesh-redis.llmmesh.svc.cluster.local"


@pytest.mark.parametrize(
    ("sa", "port", "allowed"),
    [
        ("llmmesh-gateway", 6379, True),
        ("llmmesh-gateway", 6380, False),
        ("llmmesh-orchestrator", 6379, False),
        ("llmmesh-triton", 6379, False),
        ("llmmesh-autoscaler", 6379, False),
        ("llmmesh-kv-registry", 6379, False),
    ],
)
def test_only_the_gateways_reach_redis(
    sa: str, port: int, allowed: bool, rendered: dict[str, list[Doc]]
) -> None:
    mesh = mesh_of(rendered, "prod")
    assert security.authz_allows(mesh, principal(sa), REDIS_LABELS, port, "", "") is allowed


def test_redis_setup_of_each_overlay(rendered: dict[str, list[Doc]]) -> None:
    """Serving gateways share database 0, the shadow has its own; the fallback share per overlay."""
    for overlay, share in (("base", "50"), ("dev", "8"), ("prod", "76")):
        mesh = mesh_of(rendered, overlay)
        for name, db in (
            ("llmmesh-gateway-v1", 0),
            ("llmmesh-gateway-v2", 0),
            ("llmmesh-gateway-shadow", 1),
        ):
            dep = doc(mesh, "Deployment", name)
            env = mesh.container_env(dep, mesh.main_container(dep))
            for key in (redis.RESUME_URL, redis.LIMITS_URL):
                assert env[key] == f"redis://{REDIS_HOST}:6379/{db}", (overlay, name, key)
            assert env[redis.LIMITS_GATEWAYS] == share, (overlay, name)


def _redis_container(mesh: Mesh) -> dict[str, Any]:
    dep = doc(mesh, "Deployment", "llmmesh-redis")
    container: dict[str, Any] = dep["spec"]["template"]["spec"]["containers"][0]
    return container


def _set_arg(mesh: Mesh, name: str, value: str) -> None:
    args = _redis_container(mesh)["args"]
    args[args.index(name) + 1] = value


def _gateway_env(mesh: Mesh, deployment: str, key: str, value: str) -> None:
    dep = doc(mesh, "Deployment", deployment)
    env = dep["spec"]["template"]["spec"]["containers"][0].setdefault("env", [])
    env[:] = [e for e in env if e["name"] != key] + [{"name": key, "value": value}]


def _unused(mesh: Mesh) -> None:
    for name in ("llmmesh-gateway-v1", "llmmesh-gateway-v2"):
        for key in (redis.RESUME_URL, redis.LIMITS_URL):
            _gateway_env(mesh, name, key, "rediss://redis.example.com:6380/0")
    for key in (redis.RESUME_URL, redis.LIMITS_URL):
        _gateway_env(mesh, "llmmesh-gateway-shadow", key, "rediss://redis.example.com:6380/1")


BROKEN: list[tuple[str, Callable[[Mesh], None], str]] = [
    (
        "url unset",
        lambda m: doc(m, "ConfigMap", _env_cm(m))["data"].pop(redis.LIMITS_URL),
        "LLMMESH_GATEWAY_LIMITS_REDIS_URL unset",
    ),
    (
        "wrong port",
        lambda m: _gateway_env(
            m, "llmmesh-gateway-v1", redis.RESUME_URL, f"redis://{REDIS_HOST}:6380/0"
        ),
        "port 6380 is no TCP port with appProtocol redis",
    ),
    (
        "no such service",
        lambda m: _gateway_env(
            m, "llmmesh-gateway-v1", redis.RESUME_URL, "redis://redis.llmmesh.svc.cluster.local/0"
        ),
        "names no Service",
    ),
    (
        "not a redis url",
        lambda m: _gateway_env(m, "llmmesh-gateway-v1", redis.RESUME_URL, f"http://{REDIS_HOST}"),
        "is no redis:// or rediss:// URL",
    ),
    (
        "v1 and v2 apart",
        lambda m: _gateway_env(
            m, "llmmesh-gateway-v2", redis.LIMITS_URL, f"redis://{REDIS_HOST}:6379/2"
        ),
        "serving gateways must share one LLMMESH_GATEWAY_LIMITS_REDIS_URL",
    ),
    (
        "shadow in the serving keyspace",
        lambda m: _gateway_env(
            m, "llmmesh-gateway-shadow", redis.RESUME_URL, f"redis://{REDIS_HOST}:6379/0"
        ),
        "shadow LLMMESH_GATEWAY_RESUME_REDIS_URL is the serving gateways' database",
    ),
    (
        "fallback share too small",
        lambda m: doc(m, "ConfigMap", _env_cm(m))["data"].update({redis.LIMITS_GATEWAYS: "60"}),
        "LLMMESH_GATEWAY_LIMITS_GATEWAYS=60 < 76",
    ),
    (
        "latest image",
        lambda m: _redis_container(m).update(image="redis:latest"),
        "must be the official redis, a pinned 7.x",
    ),
    (
        "two replicas",
        lambda m: doc(m, "Deployment", "llmmesh-redis")["spec"].update(replicas=2),
        "replicas must be 1",
    ),
    (
        "rolling update",
        lambda m: doc(m, "Deployment", "llmmesh-redis")["spec"].update(
            strategy={"type": "RollingUpdate"}
        ),
        "strategy must be Recreate",
    ),
    ("persistence", lambda m: _set_arg(m, "--appendonly", "yes"), "a cache: needs --save"),
    (
        "no eviction",
        lambda m: _set_arg(m, "--maxmemory-policy", "noeviction"),
        "--maxmemory-policy must evict",
    ),
    (
        "maxmemory above the limit",
        lambda m: _set_arg(m, "--maxmemory", "2gb"),
        "--maxmemory (2gb) must be set and below the memory limit (1Gi)",
    ),
    (
        "no data volume",
        lambda m: _redis_container(m).update(volumeMounts=[]),
        "its --dir /data must be an emptyDir",
    ),
    (
        "no liveness probe",
        lambda m: _redis_container(m).pop("livenessProbe"),
        "needs a livenessProbe",
    ),
    ("unused", _unused, "runs but no gateway uses it"),
]


def _env_cm(mesh: Mesh) -> str:
    cm = mesh.configmap_by_prefix("llmmesh-gateway-env")
    assert cm is not None
    name: str = cm["metadata"]["name"]
    return name


@pytest.mark.parametrize(("case", "mutate", "expected"), BROKEN, ids=[b[0] for b in BROKEN])
def test_redis_rule_notices(
    case: str, mutate: Callable[[Mesh], None], expected: str, rendered: dict[str, list[Doc]]
) -> None:
    mesh = mesh_of(rendered, "prod")
    assert not redis.check_redis(mesh)
    mutate(mesh)
    problems = redis.check_redis(mesh)
    assert any(expected in p for p in problems), (case, problems)


def test_a_managed_redis_needs_no_in_cluster_one(rendered: dict[str, list[Doc]]) -> None:
    """Gateways on an external Redis, the in-cluster one removed: no finding."""
    mesh = mesh_of(rendered, "prod")
    _unused(mesh)
    mesh.docs = [d for d in mesh.docs if "llmmesh-redis" not in d["metadata"]["name"]]
    mesh.docs = [d for d in mesh.docs if d["metadata"]["name"] != "allow-redis"]
    assert not redis.check_redis(mesh)
    assert not security.check_authorization(mesh)
    assert not security.check_destination_rules(mesh)


def test_http_fields_on_a_tcp_port_are_caught(rendered: dict[str, list[Doc]]) -> None:
    """Istio never matches paths or methods on a TCP connection: such an ALLOW denies Redis."""
    mesh = mesh_of(rendered, "prod")
    op = doc(mesh, "AuthorizationPolicy", "allow-redis")["spec"]["rules"][0]["to"][0]["operation"]
    op["paths"] = ["/*"]
    [problem] = security.check_authorization(mesh)
    assert "['paths'] never match TCP port(s) [6379]" in problem
    assert not security.authz_allows(mesh, principal("llmmesh-gateway"), REDIS_LABELS, 6379, "", "")


def test_tcp_service_limits(rendered: dict[str, list[Doc]]) -> None:
    """A plain TCP Service's DestinationRule needs tcp limits; http ones do not apply to it."""
    mesh = mesh_of(rendered, "prod")
    pool = doc(mesh, "DestinationRule", "llmmesh-redis")["spec"]["trafficPolicy"]["connectionPool"]
    assert not security.check_destination_rules(mesh)
    pool["http"] = {"http2MaxRequests": 64}
    assert security.check_destination_rules(mesh) == [
        "DestinationRule llmmesh/llmmesh-redis (networking.istio.io/v1): "
        "connectionPool.http does not apply to a plain TCP Service"
    ]
    del pool["http"], pool["tcp"]
    assert "needs tcp limits" in security.check_destination_rules(mesh)[0]


def test_readme_row_of_a_tcp_service(rendered: dict[str, list[Doc]]) -> None:
    mesh = mesh_of(rendered, "prod")
    assert not readme.check_circuit_breaking_table(mesh)
    pool = doc(mesh, "DestinationRule", "llmmesh-redis")["spec"]["trafficPolicy"]["connectionPool"]
    pool["tcp"]["maxConnections"] = 1024
    [problem] = readme.check_circuit_breaking_table(mesh)
    assert "| `llmmesh-redis` | 1024 | - | - |" in problem


@pytest.mark.parametrize(
    ("value", "redis_size", "k8s_size"),
    [("512mb", 512 * 1024**2, None), ("512m", 512 * 10**6, None), ("1Gi", None, 1024**3)],
)
def test_sizes(value: str, redis_size: int | None, k8s_size: int | None) -> None:
    assert redis.redis_bytes(value) == redis_size
    assert redis.quantity_bytes(value) == k8s_size
    assert redis.redis_options(["--save", "", "--maxmemory", value]) == {
        "save": "",
        "maxmemory": value,
    }


@pytest.mark.parametrize("overlay", ["prod", "dev"])
def test_a_gateways_redis_pools_fit_its_sidecars_connection_limit(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    """Each gateway holds up to three pools of `redis_max_connections` (services/gateway/
    redis_pool.py): past the DestinationRule's maxConnections its sidecar refuses connections,
    which the limiter and the resume store read as Redis down."""
    mesh = mesh_of(rendered, overlay)
    limit = doc(mesh, "DestinationRule", "llmmesh-redis")["spec"]["trafficPolicy"][
        "connectionPool"
    ]["tcp"]["maxConnections"]
    default = GatewaySettings.model_fields["redis_max_connections"].default
    for dep in component_deployments(mesh, GATEWAY):
        env = mesh.container_env(dep, mesh.main_container(dep))
        pools = int(env.get("LLMMESH_GATEWAY_REDIS_MAX_CONNECTIONS", default))
        assert 3 * pools <= limit, (dep["metadata"]["name"], pools, limit)
