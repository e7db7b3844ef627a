"""Routing rules: hosts, subsets, the canary split and mirroring, retries and timeouts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmmesh.tools.meshcheck.common import Doc, doc_id, go_duration_ms, require
from llmmesh.tools.meshcheck.index import Mesh
from llmmesh.tools.meshcheck.project import (
    SESSION_STREAMS,
    grpc_method,
)
from llmmesh.tools.meshcheck.rules.helpers import (
    gateway_env,
    orchestrator_env,
    plaintext_hosts,
    service_port_numbers,
)

# Streaming HTTP routes of the OpenAI API (server-sent events): never replayed once started.
HTTP_STREAMING_PATHS = ("/v1/chat/completions", "/v1/completions")
# Envoy retry conditions under which the request never reached the application.
NEVER_STARTED = frozenset({"connect-failure", "refused-stream"})
# Also safe for unary, idempotent calls: the server answered UNAVAILABLE without doing the work.
SAFE_UNARY = NEVER_STARTED | {"unavailable"}

# How much longer than the gateway's own request timeout a streaming route's timeout runs.
ROUTE_TIMEOUT_MARGIN_MS = 5_000


def _destinations(vs: Doc) -> list[tuple[str, Mapping[str, Any]]]:
    out: list[tuple[str, Mapping[str, Any]]] = []
    for i, route in enumerate(vs["spec"].get("http", [])):
        name = route.get("name", f"http[{i}]")
        out.extend((name, r["destination"]) for r in route.get("route", []))
        if "mirror" in route:
            out.append((f"{name} (mirror)", route["mirror"]))
        out.extend((f"{name} (mirrors)", m["destination"]) for m in route.get("mirrors", []))
    return out


def check_hosts(mesh: Mesh) -> list[str]:
    problems: list[str] = []
    gateway_hosts: set[str] = set()
    for gw in mesh.in_namespace("Gateway"):
        for server in gw["spec"]["servers"]:
            gateway_hosts.update(server["hosts"])
    external = plaintext_hosts(mesh)
    for dr in mesh.in_namespace("DestinationRule"):
        if dr["spec"]["host"] not in external and mesh.service_for_host(dr["spec"]["host"]) is None:
            problems.append(f"{doc_id(dr)}: host {dr['spec']['host']} names no Service")
    for vs in mesh.in_namespace("VirtualService"):
        gateways = vs["spec"].get("gateways", ["mesh"])
        for host in vs["spec"]["hosts"]:
            if mesh.service_for_host(host) is not None:
                continue
            if "mesh" not in gateways and host in gateway_hosts:
                continue  # an external hostname served by an ingress Gateway of this overlay
            problems.append(f"{doc_id(vs)}: host {host} names no Service (nor a Gateway host)")
        for gw_name in gateways:
            if gw_name != "mesh" and mesh.get("Gateway", gw_name) is None:
                problems.append(f"{doc_id(vs)}: gateway {gw_name} is not defined")
        for route_name, dest in _destinations(vs):
            svc = mesh.service_for_host(dest["host"])
            if svc is None:
                problems.append(
                    f"{doc_id(vs)} {route_name}: destination {dest['host']} names no Service"
                )
                continue
            port = dest.get("port", {}).get("number")
            if port is None and len(svc["spec"]["ports"]) > 1:
                problems.append(
                    f"{doc_id(vs)} {route_name}: multi-port {dest['host']} needs a port"
                )
            elif port is not None and port not in service_port_numbers(svc):
                problems.append(f"{doc_id(vs)} {route_name}: {dest['host']} has no port {port}")
    return problems


def check_subsets(mesh: Mesh) -> list[str]:
    """DestinationRule subsets select pods of their Service; VirtualService subsets exist."""
    problems: list[str] = []
    subsets: dict[str, set[str]] = {}
    for dr in mesh.in_namespace("DestinationRule"):
        svc = mesh.service_for_host(dr["spec"]["host"])
        if svc is None:
            continue
        names = subsets.setdefault(svc["metadata"]["name"], set())
        for subset in dr["spec"].get("subsets", []):
            names.add(subset["name"])
            selector = {**svc["spec"].get("selector", {}), **subset.get("labels", {})}
            if not mesh.deployments_selected(selector):
                problems.append(
                    f"{doc_id(dr)}: subset {subset['name']} labels {subset.get('labels')} select "
                    f"no pod of Service {svc['metadata']['name']}"
                )
    for vs in mesh.in_namespace("VirtualService"):
        for route_name, dest in _destinations(vs):
            subset = dest.get("subset")
            svc = mesh.service_for_host(dest["host"])
            if (
                subset
                and svc is not None
                and subset not in subsets.get(svc["metadata"]["name"], set())
            ):
                problems.append(
                    f"{doc_id(vs)} {route_name}: subset {subset} of {dest['host']} is not defined"
                )
    return problems


@dataclass(frozen=True)
class CanaryState:
    weights: dict[str, int]  # subset -> weight
    mirror_percent: float | None


def canary_states(mesh: Mesh) -> dict[str, CanaryState]:
    """Route name -> split, for the weighted routes of the client-facing VirtualService."""
    vs = require(mesh.get("VirtualService", "llmmesh-gateway"), "VirtualService llmmesh-gateway")
    out: dict[str, CanaryState] = {}
    for route in vs["spec"]["http"]:
        if len(route["route"]) > 1:
            mirror = route.get("mirrorPercentage", {}).get("value") if "mirror" in route else None
            out[route["name"]] = CanaryState(
                {
                    r["destination"].get("subset", "?"): int(r.get("weight", 0))
                    for r in route["route"]
                },
                None if mirror is None else float(mirror),
            )
    return out


def check_canary(mesh: Mesh) -> list[str]:
    problems: list[str] = []
    for vs in mesh.in_namespace("VirtualService"):
        for i, route in enumerate(vs["spec"].get("http", [])):
            dests = route.get("route", [])
            name = route.get("name", f"http[{i}]")
            if len(dests) > 1:
                weights = [int(d.get("weight", 0)) for d in dests]
                if sum(weights) != 100:
                    problems.append(
                        f"{doc_id(vs)} {name}: weights {weights} sum to {sum(weights)}, not 100"
                    )
            pct = route.get("mirrorPercentage", {}).get("value")
            if pct is not None and not 0.0 <= float(pct) <= 100.0:
                problems.append(f"{doc_id(vs)} {name}: mirrorPercentage {pct} outside [0, 100]")
            if "mirror" in route and pct is None:
                problems.append(
                    f"{doc_id(vs)} {name}: mirror without mirrorPercentage mirrors 100 %"
                )
            if "mirror" in route:
                mirror_svc = mesh.service_for_host(route["mirror"]["host"])
                if (
                    mirror_svc is not None
                    and mirror_svc["spec"]["selector"].get("app") == "llmmesh-gateway"
                ):
                    problems.append(
                        f"{doc_id(vs)} {name}: mirror target is a serving gateway, not the shadow"
                    )
    states = canary_states(mesh)
    if not states:
        problems.append("llmmesh-gateway VirtualService has no weighted route")
    if len({tuple(sorted(s.weights.items())) for s in states.values()}) > 1:
        problems.append(
            f"weighted routes disagree on the canary split: { {k: v.weights for k, v in states.items()} }"
        )
    served = {
        d["spec"]["template"]["metadata"]["labels"].get("version")
        for d in mesh.in_namespace("Deployment")
        if d["spec"]["template"]["metadata"]["labels"].get("app") == "llmmesh-gateway"
    }
    for name, state in states.items():
        if len(state.weights) != 2 or not set(state.weights) <= served:
            problems.append(
                f"route {name} splits between {sorted(state.weights)}: expected a stable and a canary "
                f"model version, each with a gateway Deployment ({sorted(v for v in served if v)})"
            )
    mirrors = {s.mirror_percent for s in states.values() if s.mirror_percent is not None}
    if len(mirrors) > 1:
        problems.append(f"mirrored routes disagree on mirrorPercentage: {sorted(mirrors)}")
    gateway_vs = mesh.get("VirtualService", "llmmesh-gateway")
    # Convention: the first destination of a weighted route is the stable version, the second the canary.
    canaries = {list(s.weights)[-1] for s in states.values()}
    if gateway_vs is not None:
        for route in gateway_vs["spec"]["http"]:
            has_header = any(
                "x-llmmesh-canary" in m.get("headers", {}) for m in route.get("match", [])
            )
            subsets = {d["destination"].get("subset") for d in route["route"]}
            if has_header and (len(route["route"]) != 1 or subsets != canaries):
                problems.append(
                    f"header route {route['name']} must send x-llmmesh-canary: always to the canary "
                    f"{sorted(canaries)} only"
                )
        names = [r["name"] for r in gateway_vs["spec"]["http"]]
        for name in states:
            if f"{name}-canary" not in names or names.index(f"{name}-canary") > names.index(name):
                problems.append(f"route {name} has no header route {name}-canary before it")
    return problems


def _route_methods(route: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for m in route.get("match", []):
        uri = m.get("uri", {})
        out.extend(v for k, v in uri.items() if k in ("exact", "prefix"))
    return out


def _is_streaming(paths: list[str]) -> bool:
    for p in paths:
        if p in HTTP_STREAMING_PATHS:
            return True
        meth = grpc_method(p)
        if meth is not None and (meth.server_streaming or meth.client_streaming):
            return True
    return False


def check_retries_and_timeouts(mesh: Mesh) -> list[str]:
    problems: list[str] = []
    headless = {
        s["metadata"]["name"]
        for s in mesh.in_namespace("Service")
        if s["spec"].get("clusterIP") == "None"
    }
    timeouts: dict[str, float] = {}
    for vs in mesh.in_namespace("VirtualService"):
        hosts_headless = any(
            (svc := mesh.service_for_host(h)) is not None and svc["metadata"]["name"] in headless
            for h in vs["spec"]["hosts"]
        )
        bound_to_mesh = "mesh" in vs["spec"].get("gateways", ["mesh"])
        for i, route in enumerate(vs["spec"].get("http", [])):
            where = f"{doc_id(vs)} {route.get('name', f'http[{i}]')}"
            timeout = go_duration_ms(str(route.get("timeout", "")))
            paths = _route_methods(route)
            sessions = [p for p in paths if p in SESSION_STREAMS]
            if timeout is None and (not sessions or len(sessions) < len(paths)):
                problems.append(f"{where}: needs an explicit timeout")
            elif timeout is not None and sessions:
                problems.append(f"{where}: a route timeout would cut {', '.join(sessions)}")
            for p in paths:
                if timeout is not None:
                    timeouts[p] = max(timeouts.get(p, 0.0), timeout)
            retries = route.get("retries")
            if retries is None:
                problems.append(
                    f"{where}: needs explicit retries (Istio's default retries streams)"
                )
                continue
            attempts = int(retries.get("attempts", 0))
            conditions = {c for c in str(retries.get("retryOn", "")).split(",") if c}
            if hosts_headless and attempts != 0:
                problems.append(f"{where}: Envoy must not retry to a picked replica (attempts 0)")
            if attempts and not conditions:
                problems.append(f"{where}: retries without retryOn use Envoy's defaults")
            if not conditions <= SAFE_UNARY:
                problems.append(
                    f"{where}: retryOn {sorted(conditions - SAFE_UNARY)} may replay work"
                )
            streaming = _is_streaming(paths)
            grants_lease = any(p.endswith("/Admit") for p in paths)
            if attempts and (streaming or grants_lease) and not conditions <= NEVER_STARTED:
                problems.append(
                    f"{where}: a stream (or a lease grant) may only be retried before it started"
                )
            if bound_to_mesh:
                ports = {
                    d["destination"].get("port", {}).get("number") for d in route.get("route", [])
                }
                for m in route.get("match", []) or [{}]:
                    if m.get("port") not in ports:
                        problems.append(
                            f"{where}: match must pin the destination port {sorted(ports)}"
                        )
    admit = timeouts.get("/llmmesh.orchestrator.v1.OrchestratorService/Admit")
    max_wait = float(orchestrator_env(mesh)["LLMMESH_ORCHESTRATOR_DEFAULT_QUEUE_TIMEOUT_S"]) * 1000
    if admit is None or admit <= max_wait:
        problems.append(
            f"Admit route timeout {admit} ms must exceed DEFAULT_QUEUE_TIMEOUT_S ({max_wait} ms)"
        )
    generate = timeouts.get("/llmmesh.gateway.v1.GatewayService/Generate")
    env = gateway_env(mesh)
    # The longest deadline a request gets: the default, or what a client asks for (the HTTP
    # x-request-timeout; unset, the gateway's bound is a day).
    request_timeout = 1000 * max(
        float(env.get("LLMMESH_GATEWAY_REQUEST_TIMEOUT_S", "inf")),
        float(env.get("LLMMESH_GATEWAY_MAX_REQUEST_TIMEOUT_S", "inf")),
    )
    if generate is None or generate < request_timeout + ROUTE_TIMEOUT_MARGIN_MS:
        problems.append(
            f"Generate route timeout {generate} ms must exceed the longest request timeout of "
            f"the gateway {request_timeout} ms (REQUEST_TIMEOUT_S, MAX_REQUEST_TIMEOUT_S) by "
            f"{ROUTE_TIMEOUT_MARGIN_MS} ms (the gateway, not Envoy, ends a stream that ran out "
            "of time)"
        )
    stream = timeouts.get("/inference.GRPCInferenceService/ModelStreamInfer")
    if generate is None or stream is None or stream < generate:
        problems.append(f"ModelStreamInfer timeout {stream} ms must cover Generate's {generate} ms")
    return problems
