"""The gateways' Redis: every gateway shares its state through one (the resume store and the
tenants' rate-limit buckets), the shadow never shares the serving gateways' keyspace, the rate
limiter's fallback share covers the serving pods, and an in-cluster Redis is a bounded cache
(base/redis.yaml; mesh/README.md, "Request ids and retries")."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from llmmesh.common.components import GATEWAY
from llmmesh.tools.meshcheck.common import CLUSTER_DOMAIN, Doc, doc_id
from llmmesh.tools.meshcheck.index import Mesh, labels_match
from llmmesh.tools.meshcheck.rules.helpers import component_deployments, is_redis, is_tcp_port

# Settings that name the gateways' Redis (services.gateway.settings.GatewaySettings).
RESUME_URL = "LLMMESH_GATEWAY_RESUME_REDIS_URL"
LIMITS_URL = "LLMMESH_GATEWAY_LIMITS_REDIS_URL"
LIMITS_GATEWAYS = "LLMMESH_GATEWAY_LIMITS_GATEWAYS"
# The official image, a pinned 7.x release (optionally a variant such as -bookworm, -alpine).
IMAGE = re.compile(r"^(docker\.io/(library/)?)?redis:7\.\d+\.\d+(-[a-z0-9.]+)?$")

_REDIS_UNITS = {
    "": 1,
    "k": 1000,
    "kb": 1024,
    "m": 1000**2,
    "mb": 1024**2,
    "g": 1000**3,
    "gb": 1024**3,
}
_K8S_UNITS = {
    "": 1,
    "k": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
}

Target = tuple[str, int, int]  # host, port, database


def redis_bytes(value: str) -> int | None:
    """A Redis memory size (`512mb`: 1024-based, `512m`: 1000-based) in bytes."""
    m = re.fullmatch(r"(\d+)([a-z]*)", value.strip().lower())
    if m is None or m.group(2) not in _REDIS_UNITS:
        return None
    return int(m.group(1)) * _REDIS_UNITS[m.group(2)]


def quantity_bytes(value: Any) -> int | None:
    """A Kubernetes memory quantity (`1Gi`, `1G`, `1073741824`) in bytes."""
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", str(value).strip())
    if m is None or m.group(2) not in _K8S_UNITS:
        return None
    return int(m.group(1)) * _K8S_UNITS[m.group(2)]


def redis_options(args: Sequence[Any]) -> dict[str, str]:
    """`--name value` pairs of a redis-server command line (a flag without a value maps to "")."""
    opts: dict[str, str] = {}
    key: str | None = None
    for raw in args:
        arg = str(raw)
        if arg.startswith("--"):
            key = arg[2:]
            opts[key] = ""
        elif key is not None:
            opts[key] = f"{opts[key]} {arg}".strip() if opts[key] else arg
    return opts


def _target(url: str) -> Target | None:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        return None
    try:
        db = int(parts.path.lstrip("/") or 0)
        port = parts.port or 6379
    except ValueError:
        return None
    return parts.hostname, port, db


def _surge(dep: Doc, replicas: int) -> int:
    surge = dep["spec"].get("strategy", {}).get("rollingUpdate", {}).get("maxSurge", "25%")
    if isinstance(surge, str) and surge.endswith("%"):
        return math.ceil(replicas * int(surge[:-1]) / 100)
    return int(surge)


def _most_pods(mesh: Mesh, dep: Doc) -> int:
    """The most pods a Deployment runs: its HPA's maxReplicas (or replicas) + rollout surge."""
    name = dep["metadata"]["name"]
    hpa = next(
        (
            h
            for h in mesh.in_namespace("HorizontalPodAutoscaler")
            if h["spec"]["scaleTargetRef"]["name"] == name
        ),
        None,
    )
    replicas = int(hpa["spec"]["maxReplicas"]) if hpa else int(dep["spec"].get("replicas", 1))
    return replicas + _surge(dep, replicas)


def _check_service(mesh: Mesh, where: str, key: str, target: Target) -> tuple[Doc | None, str]:
    """The in-namespace Service a URL names (None: an external Redis), or a finding."""
    host, port, _db = target
    svc = mesh.service_for_host(host)
    if svc is None:
        in_cluster = host.endswith(f".{CLUSTER_DOMAIN}") or "." not in host
        return None, f"{where}: {key} host {host} names no Service" if in_cluster else ""
    sport = next((p for p in svc["spec"]["ports"] if int(p["port"]) == port), None)
    if sport is None or not is_tcp_port(sport) or sport.get("appProtocol") != "redis":
        return (
            svc,
            f"{where}: {key} port {port} is no TCP port with appProtocol redis of {doc_id(svc)}",
        )
    selected = mesh.deployments_selected(svc["spec"].get("selector") or {"-": "-"})
    if not selected or not all(is_redis(d) for d in selected):
        return svc, f"{where}: {key} names {doc_id(svc)}, which selects no Redis Deployment"
    return svc, ""


def _check_gateways(mesh: Mesh) -> tuple[list[str], set[str]]:
    """Findings on the gateways' URLs and fallback share; names of the Services they use."""
    problems: list[str] = []
    used: set[str] = set()
    serving: dict[str, dict[str, Target]] = {RESUME_URL: {}, LIMITS_URL: {}}
    shadow: dict[str, dict[str, Target]] = {RESUME_URL: {}, LIMITS_URL: {}}
    deps = component_deployments(mesh, GATEWAY)
    for dep in deps:
        where = doc_id(dep)
        env = mesh.container_env(dep, mesh.main_container(dep))
        role = dep["spec"]["template"]["metadata"]["labels"].get("llmmesh.io/role")
        for key in (RESUME_URL, LIMITS_URL):
            url = env.get(key)
            if not url:
                problems.append(
                    f"{where}: {key} unset: gateways scale out, their state must be shared in Redis"
                )
                continue
            target = _target(url)
            if target is None:
                problems.append(f"{where}: {key}={url} is no redis:// or rediss:// URL")
                continue
            (shadow if role == "shadow" else serving)[key][dep["metadata"]["name"]] = target
            svc, problem = _check_service(mesh, where, key, target)
            if problem:
                problems.append(problem)
            if svc is not None:
                used.add(svc["metadata"]["name"])
    for key in (RESUME_URL, LIMITS_URL):
        if len(set(serving[key].values())) > 1:
            problems.append(
                f"serving gateways must share one {key} (a retry or a tenant lands on any "
                f"version's pods): {sorted(serving[key].items())}"
            )
        for name, target in shadow[key].items():
            if target in serving[key].values():
                problems.append(
                    f"Deployment {name}: shadow {key} is the serving gateways' database: a "
                    "mirrored copy would attach to (or be charged as) the client's request"
                )
    # The limiter's fallback share: while Redis is unreachable each gateway enforces
    # 1/LIMITS_GATEWAYS of a tenant's limit, safe only with at least that many pods sharing it.
    sharing: dict[Target, list[Doc]] = {}
    for dep in deps:
        target = serving[LIMITS_URL].get(dep["metadata"]["name"])
        if target is not None:
            sharing.setdefault(target, []).append(dep)
    for group in sharing.values():
        most = sum(_most_pods(mesh, d) for d in group)
        for dep in group:
            env = mesh.container_env(dep, mesh.main_container(dep))
            have = int(env.get(LIMITS_GATEWAYS, "1"))
            if have < most:
                problems.append(
                    f"{doc_id(dep)}: {LIMITS_GATEWAYS}={have} < {most}, the most serving gateway "
                    "pods sharing its limiter (HPA maxReplicas + rollout surge): a tenant would "
                    "get more than its limit while Redis is unreachable"
                )
    return problems, used


def _check_deployment(mesh: Mesh, dep: Doc) -> list[str]:
    where = doc_id(dep)
    problems: list[str] = []
    tpl = dep["spec"]["template"]
    c: Mapping[str, Any] = mesh.main_container(dep)
    if not IMAGE.match(str(c.get("image", ""))):
        problems.append(f"{where}: image {c.get('image')} must be the official redis, a pinned 7.x")
    if int(dep["spec"].get("replicas", 1)) != 1:
        problems.append(
            f"{where}: replicas must be 1 (a Service over independent Redis pods splits the store)"
        )
    if dep["spec"].get("strategy", {}).get("type") != "Recreate":
        problems.append(
            f"{where}: strategy must be Recreate (a surge pod is a second, empty store)"
        )
    opts = redis_options(list(c.get("command", []))[1:] + list(c.get("args", [])))
    if opts.get("save", None) != "" or opts.get("appendonly") != "no":
        problems.append(f'{where}: a cache: needs --save "" and --appendonly no')
    policy = opts.get("maxmemory-policy", "noeviction")
    if policy == "noeviction":
        problems.append(
            f"{where}: --maxmemory-policy must evict (every key the gateways write has a TTL)"
        )
    maxmemory = redis_bytes(opts.get("maxmemory", "0")) or 0
    limit = quantity_bytes(c.get("resources", {}).get("limits", {}).get("memory", ""))
    if not maxmemory or limit is None or maxmemory >= limit:
        problems.append(
            f"{where}: --maxmemory ({opts.get('maxmemory')}) must be set and below the memory "
            f"limit ({c.get('resources', {}).get('limits', {}).get('memory')})"
        )
    data = opts.get("dir", "/data")
    mount = next((m for m in c.get("volumeMounts", []) if m["mountPath"] == data), None)
    volume = next(
        (v for v in tpl["spec"].get("volumes", []) if mount and v["name"] == mount["name"]), None
    )
    if volume is None or "emptyDir" not in volume:
        problems.append(
            f"{where}: its --dir {data} must be an emptyDir (read-only root filesystem)"
        )
    for probe in ("readinessProbe", "livenessProbe"):
        if not {"exec", "tcpSocket"} & set(c.get(probe, {})):
            problems.append(f"{where}: needs a {probe} (exec redis-cli ping, or tcpSocket)")
    return problems


def check_redis(mesh: Mesh) -> list[str]:
    problems, used = _check_gateways(mesh)
    for dep in mesh.in_namespace("Deployment"):
        if not is_redis(dep):
            continue
        problems += _check_deployment(mesh, dep)
        labels = dep["spec"]["template"]["metadata"]["labels"]
        services = {
            s["metadata"]["name"]
            for s in mesh.in_namespace("Service")
            if s["spec"].get("selector") and labels_match(s["spec"]["selector"], labels)
        }
        if not services & used:
            problems.append(
                f"{doc_id(dep)}: runs but no gateway uses it (a managed Redis: remove it, "
                "mesh/README.md)"
            )
    return problems
