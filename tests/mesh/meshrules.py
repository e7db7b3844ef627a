"""Consistency rules over one rendered overlay. Each rule returns a list of problems (empty: ok),
so the tests can also feed them broken documents and check that the rule notices."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from tests.mesh.meshcheck import (
    COMPONENTS,
    EXTERNAL_PRINCIPALS,
    MESH,
    TRUST_DOMAIN,
    Component,
    ComponentSettings,
    Doc,
    Mesh,
    doc_id,
    go_duration_ms,
    grpc_method,
    grpc_service_known,
    labels_match,
    service_host,
)

TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
# Streaming HTTP routes of the OpenAI API (server-sent events): never replayed once started.
HTTP_STREAMING_PATHS = ("/v1/chat/completions", "/v1/completions")
# Envoy retry conditions under which the request never reached the application.
NEVER_STARTED = frozenset({"connect-failure", "refused-stream"})
# Also safe for unary, idempotent calls: the server answered UNAVAILABLE without doing the work.
SAFE_UNARY = NEVER_STARTED | {"unavailable"}


def _port_by_name(ports: Iterable[Mapping[str, Any]], name: str) -> Mapping[str, Any] | None:
    return next((p for p in ports if p.get("name") == name), None)


def _service_port_numbers(svc: Doc) -> set[int]:
    return {int(p["port"]) for p in svc["spec"]["ports"]}


# --------------------------------------------------------------------------------------------
# Hosts, subsets, canary weights, mirroring
# --------------------------------------------------------------------------------------------


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
    for dr in mesh.in_namespace("DestinationRule"):
        if mesh.service_for_host(dr["spec"]["host"]) is None:
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
            elif port is not None and port not in _service_port_numbers(svc):
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
    vs = mesh.get("VirtualService", "llmmesh-gateway")
    assert vs is not None, "VirtualService llmmesh-gateway is missing"
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


# --------------------------------------------------------------------------------------------
# Ports and settings
# --------------------------------------------------------------------------------------------


def _component_deployments(mesh: Mesh, comp: Component) -> list[Doc]:
    return [
        d
        for d in mesh.in_namespace("Deployment")
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name")
        == comp.k8s_name
    ]


def check_ports(mesh: Mesh, settings: Mapping[str, ComponentSettings]) -> list[str]:
    """Ports agree between the services' settings, their env (ConfigMaps), container ports,
    probes, Services, AuthorizationPolicies and the addresses other components dial."""
    problems: list[str] = []
    named = {"grpc": "grpc", "metrics": "http-metrics", "http": "http-openai"}
    for comp in COMPONENTS:
        facts = settings[comp.key]
        deps = _component_deployments(mesh, comp)
        if not deps:
            problems.append(f"{comp.k8s_name}: no Deployment")
        for dep in deps:
            container = mesh.main_container(dep)
            env = mesh.container_env(dep, container)
            if env.get(f"{comp.env_prefix}HOST") != "0.0.0.0":
                problems.append(
                    f"{doc_id(dep)}: {comp.env_prefix}HOST must be 0.0.0.0 (default binds loopback)"
                )
            for key, expected in facts.ports.items():
                env_key = f"{comp.env_prefix}{key.upper()}_PORT"
                if env.get(env_key) not in (None, str(expected)):
                    problems.append(
                        f"{doc_id(dep)}: {env_key}={env.get(env_key)} but the setting says {expected}"
                    )
                actual = int(env.get(env_key, expected))
                cport = _port_by_name(container.get("ports", []), named[key])
                if cport is None or int(cport["containerPort"]) != actual:
                    problems.append(
                        f"{doc_id(dep)}: container port {named[key]} should be {actual}, is {cport}"
                    )
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                grpc = container.get(probe, {}).get("grpc")
                if grpc is None or int(grpc["port"]) != facts.ports["grpc"]:
                    problems.append(
                        f"{doc_id(dep)}: {probe} must be a gRPC health probe on {facts.ports['grpc']}"
                    )
        for svc in mesh.in_namespace("Service"):
            if svc["spec"].get("selector", {}).get("app", "").startswith(comp.k8s_name):
                for key, expected in facts.ports.items():
                    sport = _port_by_name(svc["spec"]["ports"], named[key])
                    if sport is None or int(sport["port"]) != expected:
                        problems.append(
                            f"{doc_id(svc)}: port {named[key]} should be {expected}, is {sport}"
                        )
                    elif sport.get("targetPort") != named[key]:
                        problems.append(
                            f"{doc_id(svc)}: port {named[key]} should target the named container port"
                        )
                    expected_proto = "grpc" if key == "grpc" else "http"
                    if sport is not None and sport.get("appProtocol") != expected_proto:
                        problems.append(
                            f"{doc_id(svc)}: port {named[key]} appProtocol should be {expected_proto}"
                        )
    problems += _check_addresses(mesh)
    problems += _check_triton_ports(mesh)
    return problems


def check_settings_fields(mesh: Mesh, settings: Mapping[str, ComponentSettings]) -> list[str]:
    """Every LLMMESH_<SERVICE>_* variable a Deployment sets is a field of the service's settings
    class (pydantic-settings ignores unknown ones silently). Skipped for a class not importable."""
    unknown: dict[str, set[str]] = {}
    for comp in COMPONENTS:
        facts = settings[comp.key]
        if facts.fields is None:
            continue
        for dep in _component_deployments(mesh, comp):
            for key in mesh.container_env(dep, mesh.main_container(dep)):
                if key.startswith(facts.env_prefix):
                    field = key[len(facts.env_prefix) :].lower()
                    if field not in facts.fields:
                        unknown.setdefault(
                            f"{key} is no field of {comp.settings_class}", set()
                        ).add(dep["metadata"]["name"])
    return [f"{msg} (set on {', '.join(sorted(deps))})" for msg, deps in sorted(unknown.items())]


def _check_addresses(mesh: Mesh) -> list[str]:
    """Every *_ADDRESS setting names a Service's gRPC port."""
    problems: list[str] = []
    for dep, _tpl in mesh.pod_templates():
        env = mesh.container_env(dep, mesh.main_container(dep))
        for key, value in env.items():
            if not key.endswith("_ADDRESS"):
                continue
            host, _, port = value.rpartition(":")
            svc = mesh.service_for_host(host)
            if svc is None:
                problems.append(f"{doc_id(dep)}: {key}={value} names no Service")
                continue
            grpc = _port_by_name(svc["spec"]["ports"], "grpc")
            if grpc is None or str(grpc["port"]) != port:
                problems.append(
                    f"{doc_id(dep)}: {key}={value} is not the gRPC port of {svc['metadata']['name']}"
                )
    return problems


def _triton_deployments(mesh: Mesh) -> list[Doc]:
    return [
        d
        for d in mesh.in_namespace("Deployment")
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
        == "triton"
    ]


def _check_triton_ports(mesh: Mesh) -> list[str]:
    problems: list[str] = []
    for dep in _triton_deployments(mesh):
        c = mesh.main_container(dep)
        args = c.get("args", [])
        for key, flag in (
            ("http", "--http-port"),
            ("grpc", "--grpc-port"),
            ("metrics", "--metrics-port"),
        ):
            if f"{flag}={TRITON_PORTS[key]}" not in args:
                problems.append(f"{doc_id(dep)}: tritonserver needs {flag}={TRITON_PORTS[key]}")
            name = "http-metrics" if key == "metrics" else key
            cport = _port_by_name(c.get("ports", []), name)
            if cport is None or int(cport["containerPort"]) != TRITON_PORTS[key]:
                problems.append(
                    f"{doc_id(dep)}: container port {name} should be {TRITON_PORTS[key]}"
                )
    return problems


# --------------------------------------------------------------------------------------------
# Authorization
# --------------------------------------------------------------------------------------------


def _grpc_ports_of(mesh: Mesh, selector: Mapping[str, str] | None) -> set[int]:
    """Container ports named grpc of the workloads a policy selects (all when no selector)."""
    ports: set[int] = set()
    for _dep, tpl in mesh.pod_templates():
        if selector is None or labels_match(selector, tpl["metadata"].get("labels", {})):
            for c in tpl["spec"]["containers"]:
                ports.update(
                    int(p["containerPort"]) for p in c.get("ports", []) if p.get("name") == "grpc"
                )
    return ports


def check_authorization(mesh: Mesh) -> list[str]:
    problems: list[str] = []
    policies = mesh.in_namespace("AuthorizationPolicy")
    deny_all = [
        p
        for p in policies
        if not p.get("spec")
        or (
            not p["spec"].get("rules")
            and not p["spec"].get("selector")
            and p["spec"].get("action", "ALLOW") == "ALLOW"
        )
    ]
    if not deny_all:
        problems.append(
            "no namespace-wide deny-by-default AuthorizationPolicy (ALLOW with no rules)"
        )
    service_accounts = {sa["metadata"]["name"] for sa in mesh.in_namespace("ServiceAccount")}
    for pol in policies:
        spec = pol.get("spec") or {}
        if spec.get("action", "ALLOW") != "ALLOW":
            problems.append(f"{doc_id(pol)}: only ALLOW policies are expected")
        selector = spec.get("selector", {}).get("matchLabels")
        if selector is not None and not mesh.deployments_selected(selector):
            problems.append(f"{doc_id(pol)}: selector {selector} selects no workload")
        grpc_ports = _grpc_ports_of(mesh, selector)
        for i, rule in enumerate(spec.get("rules", [])):
            where = f"{doc_id(pol)} rules[{i}]"
            sources = rule.get("from", [])
            principals = [p for s in sources for p in s.get("source", {}).get("principals", [])]
            if (
                not sources
                or not principals
                or any(set(s.get("source", {})) - {"principals"} for s in sources)
            ):
                problems.append(f"{where}: must allow by source principals only")
            for p in principals:
                m = re.fullmatch(rf"{re.escape(TRUST_DOMAIN)}/ns/([^/]+)/sa/([^/]+)", p)
                if m is None:
                    problems.append(f"{where}: principal {p} is not {TRUST_DOMAIN}/ns/<ns>/sa/<sa>")
                elif m.group(1) == mesh.namespace:
                    if m.group(2) not in service_accounts:
                        problems.append(f"{where}: principal {p} names no ServiceAccount")
                elif p not in EXTERNAL_PRINCIPALS:
                    problems.append(
                        f"{where}: principal {p} is neither local nor a listed external principal"
                    )
            for j, to in enumerate(rule.get("to", [])):
                op = to.get("operation", {})
                if not op.get("ports") or not op.get("paths"):
                    problems.append(f"{where} to[{j}]: must restrict ports and paths")
                    continue
                ports = {int(p) for p in op["ports"]}
                if ports & grpc_ports:
                    for path in op["paths"]:
                        wildcard = re.fullmatch(r"/([\w.]+)/\*", path)
                        if wildcard:
                            if not grpc_service_known(wildcard.group(1)):
                                problems.append(
                                    f"{where}: gRPC service of {path} is not in protos/"
                                )
                        elif grpc_method(path) is None:
                            problems.append(f"{where}: gRPC method {path} is not in protos/")
            if not rule.get("to"):
                problems.append(f"{where}: allows every port and path")
    return problems


def authz_allows(
    mesh: Mesh,
    source: str,
    workload_labels: Mapping[str, str],
    port: int,
    path: str,
    method: str = "POST",
) -> bool:
    """Whether the namespace's ALLOW policies admit a request (our subset of Istio's semantics:
    principals, ports, exact/prefix/suffix paths, methods)."""

    def path_ok(patterns: list[str]) -> bool:
        for pat in patterns:
            if pat == "*" or pat == path:
                return True
            if pat.endswith("*") and path.startswith(pat[:-1]):
                return True
            if pat.startswith("*") and path.endswith(pat[1:]):
                return True
        return False

    for pol in mesh.in_namespace("AuthorizationPolicy"):
        spec = pol.get("spec") or {}
        selector = spec.get("selector", {}).get("matchLabels")
        if selector is not None and not labels_match(selector, workload_labels):
            continue
        for rule in spec.get("rules", []):
            principals = [
                p for s in rule.get("from", []) for p in s.get("source", {}).get("principals", [])
            ]
            if source not in principals:
                continue
            for to in rule.get("to", []):
                op = to.get("operation", {})
                if (
                    str(port) in op.get("ports", [])
                    and path_ok(op.get("paths", []))
                    and method in op.get("methods", [method])
                ):
                    return True
    return False


# --------------------------------------------------------------------------------------------
# Traffic policy, mTLS, retries and timeouts
# --------------------------------------------------------------------------------------------


def check_destination_rules(mesh: Mesh) -> list[str]:
    problems: list[str] = []
    by_service: dict[str, Doc] = {}
    for dr in mesh.in_namespace("DestinationRule"):
        svc = mesh.service_for_host(dr["spec"]["host"])
        if svc is not None:
            by_service[svc["metadata"]["name"]] = dr
        policy = dr["spec"].get("trafficPolicy", {})
        pool = policy.get("connectionPool", {})
        if "tcp" not in pool or "http" not in pool:
            problems.append(f"{doc_id(dr)}: trafficPolicy.connectionPool needs tcp and http limits")
        outlier = policy.get("outlierDetection", {})
        if not outlier or not any(
            int(outlier.get(k, 0)) > 0
            for k in (
                "consecutive5xxErrors",
                "consecutiveGatewayErrors",
                "consecutiveLocalOriginFailures",
            )
        ):
            problems.append(
                f"{doc_id(dr)}: trafficPolicy.outlierDetection must eject on some error count"
            )
        if policy.get("tls", {}).get("mode") != "ISTIO_MUTUAL":
            problems.append(f"{doc_id(dr)}: trafficPolicy.tls.mode must be ISTIO_MUTUAL")
        for subset in dr["spec"].get("subsets", []):
            sub_tls = subset.get("trafficPolicy", {}).get("tls", {}).get("mode")
            if sub_tls not in (None, "ISTIO_MUTUAL"):
                problems.append(f"{doc_id(dr)}: subset {subset['name']} weakens tls to {sub_tls}")
    for svc in mesh.in_namespace("Service"):
        if svc["metadata"]["name"] not in by_service:
            problems.append(
                f"{doc_id(svc)}: no DestinationRule (connection pool, outlier detection)"
            )
    return problems


def check_mtls(mesh: Mesh) -> list[str]:
    problems: list[str] = []
    ns = mesh.get("Namespace", mesh.namespace)
    if ns is None or ns["metadata"].get("labels", {}).get("istio-injection") != "enabled":
        problems.append(f"Namespace {mesh.namespace} must be labelled istio-injection=enabled")
    pas = mesh.in_namespace("PeerAuthentication")
    wide = [p for p in pas if not p["spec"].get("selector")]
    if len(wide) != 1 or wide[0]["spec"].get("mtls", {}).get("mode") != "STRICT":
        problems.append(
            "exactly one namespace-wide PeerAuthentication with mtls.mode STRICT is required"
        )
    for pa in pas:
        mode = pa["spec"].get("mtls", {}).get("mode", "UNSET")
        if mode not in ("STRICT", "UNSET"):
            problems.append(f"{doc_id(pa)}: mode {mode} weakens STRICT")
        for port, setting in pa["spec"].get("portLevelMtls", {}).items():
            if setting.get("mode") != "STRICT":
                problems.append(f"{doc_id(pa)}: port {port} weakens STRICT")
    for dep, tpl in mesh.pod_templates():
        meta = tpl["metadata"]
        if (
            meta.get("annotations", {}).get("sidecar.istio.io/inject") == "false"
            or meta.get("labels", {}).get("sidecar.istio.io/inject") == "false"
        ):
            problems.append(f"{doc_id(dep)}: sidecar injection disabled: outside mTLS")
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
            if timeout is None:
                problems.append(f"{where}: needs an explicit timeout")
            paths = _route_methods(route)
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
    max_wait = float(_orchestrator_env(mesh)["LLMMESH_ORCHESTRATOR_DEFAULT_QUEUE_TIMEOUT_S"]) * 1000
    if admit is None or admit <= max_wait:
        problems.append(
            f"Admit route timeout {admit} ms must exceed DEFAULT_QUEUE_TIMEOUT_S ({max_wait} ms)"
        )
    generate = timeouts.get("/llmmesh.gateway.v1.GatewayService/Generate")
    request_timeout = (
        float(_gateway_env(mesh).get("LLMMESH_GATEWAY_REQUEST_TIMEOUT_S", "inf")) * 1000
    )
    if generate is None or generate < request_timeout:
        problems.append(
            f"Generate route timeout {generate} ms is below the gateway's request timeout {request_timeout} ms"
        )
    stream = timeouts.get("/inference.GRPCInferenceService/ModelStreamInfer")
    if generate is None or stream is None or stream < generate:
        problems.append(f"ModelStreamInfer timeout {stream} ms must cover Generate's {generate} ms")
    return problems


# --------------------------------------------------------------------------------------------
# Replicas, KEDA, capacity, lifecycle
# --------------------------------------------------------------------------------------------


def policy_of(mesh: Mesh) -> dict[str, Any]:
    cm = mesh.configmap_by_prefix("llmmesh-orchestrator-policy")
    assert cm is not None, "ConfigMap llmmesh-orchestrator-policy is missing"
    loaded: dict[str, Any] = yaml.safe_load(cm["data"]["policy.yaml"])
    return loaded


def _env_of(mesh: Mesh, deployment: str) -> dict[str, str]:
    dep = mesh.get("Deployment", deployment)
    assert dep is not None, f"Deployment {deployment} is missing"
    return mesh.container_env(dep, mesh.main_container(dep))


def _orchestrator_env(mesh: Mesh) -> dict[str, str]:
    return _env_of(mesh, "llmmesh-orchestrator")


def _gateway_env(mesh: Mesh) -> dict[str, str]:
    return _env_of(mesh, "llmmesh-gateway-v1")


def check_replica_discovery(mesh: Mesh) -> list[str]:
    """LLMMESH_ORCHESTRATOR_REPLICA_DNS lists exactly the Triton headless Services."""
    problems: list[str] = []
    env = _orchestrator_env(mesh)
    entries: list[dict[str, Any]] = json.loads(env["LLMMESH_ORCHESTRATOR_REPLICA_DNS"])
    listed: set[str] = set()
    policy_pools = set(policy_of(mesh)["pools"])
    for e in entries:
        svc = mesh.service_for_host(e["host"])
        if svc is None:
            problems.append(f"REPLICA_DNS host {e['host']} names no Service")
            continue
        listed.add(svc["metadata"]["name"])
        sel = svc["spec"]["selector"]
        if svc["spec"].get("clusterIP") != "None":
            problems.append(
                f"{doc_id(svc)}: replica discovery needs a headless Service (clusterIP None)"
            )
        if (sel.get("llmmesh.io/pool"), sel.get("version")) != (e["pool"], e["model_version"]):
            problems.append(
                f"REPLICA_DNS {e['host']}: pool/model_version {e['pool']}/{e['model_version']} vs selector {sel}"
            )
        if e["pool"] not in policy_pools:
            problems.append(
                f"REPLICA_DNS {e['host']}: pool {e['pool']} is not in policy.yaml pools"
            )
        for key, name in (("port", "grpc"), ("metrics_port", "http-metrics")):
            sport = _port_by_name(svc["spec"]["ports"], name)
            if sport is None or int(sport["port"]) != int(e[key]):
                problems.append(
                    f"REPLICA_DNS {e['host']}: {key} {e[key]} is not the Service's {name} port"
                )
    autoscaler = json.loads(
        _env_of(mesh, "llmmesh-autoscaler").get("LLMMESH_AUTOSCALER_REPLICA_DNS", "null")
    )
    if autoscaler != entries:
        problems.append(
            "LLMMESH_AUTOSCALER_REPLICA_DNS must equal LLMMESH_ORCHESTRATOR_REPLICA_DNS"
        )
    for dep in _triton_deployments(mesh):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        replica_id = mesh.container_env(dep, mesh.main_container(dep)).get(
            "LLMMESH_EMULATOR_REPLICA_ID"
        )
        expected_id = f"{labels.get('llmmesh.io/pool')}-{labels.get('version')}-$(POD_IP)"
        if replica_id != expected_id:
            problems.append(
                f"{doc_id(dep)}: LLMMESH_EMULATOR_REPLICA_ID {replica_id} != orchestrator id {expected_id}"
            )
        svcs = [
            s
            for s in mesh.in_namespace("Service")
            if s["spec"].get("selector") and labels_match(s["spec"]["selector"], labels)
        ]
        if len(svcs) != 1 or svcs[0]["metadata"]["name"] not in listed:
            problems.append(
                f"{doc_id(dep)}: needs exactly one headless Service listed in REPLICA_DNS"
            )
    return problems


def check_autoscaling(mesh: Mesh) -> list[str]:
    problems: list[str] = []
    autoscaler = mesh.get("Service", "llmmesh-autoscaler")
    assert autoscaler is not None
    grpc = _port_by_name(autoscaler["spec"]["ports"], "grpc")
    assert grpc is not None
    address = f"{service_host('llmmesh-autoscaler', mesh.namespace)}:{grpc['port']}"
    scaled: dict[str, str] = {}
    for so in mesh.in_namespace("ScaledObject"):
        target = so["spec"]["scaleTargetRef"]["name"]
        scaled[target] = doc_id(so)
        dep = mesh.get("Deployment", target)
        if dep is None:
            problems.append(f"{doc_id(so)}: target Deployment {target} does not exist")
            continue
        labels = dep["spec"]["template"]["metadata"]["labels"]
        for trig in so["spec"]["triggers"]:
            md = trig["metadata"]
            if trig["type"] != "external" or md.get("scalerAddress") != address:
                problems.append(f"{doc_id(so)}: trigger must be external at {address}")
            if (md.get("pool"), md.get("model_version")) != (
                labels.get("llmmesh.io/pool"),
                labels.get("version"),
            ):
                problems.append(
                    f"{doc_id(so)}: metadata pool/model_version disagree with {target}'s labels"
                )
        spec = so["spec"]
        if not 0 < int(spec.get("minReplicaCount", 0)) <= int(spec["maxReplicaCount"]):
            problems.append(f"{doc_id(so)}: needs 0 < minReplicaCount <= maxReplicaCount")
    for hpa in mesh.in_namespace("HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]["name"]
        if mesh.get("Deployment", target) is None:
            problems.append(f"{doc_id(hpa)}: target {target} does not exist")
        scaled[target] = doc_id(hpa)
        kinds = {m["type"] for m in hpa["spec"].get("metrics", [])}
        resources = {
            m.get("resource", m.get("containerResource", {})).get("name")
            for m in hpa["spec"]["metrics"]
        }
        if not kinds <= {"Resource", "ContainerResource"} or resources != {"cpu"}:
            problems.append(f"{doc_id(hpa)}: expected a CPU HPA")
    for dep in _triton_deployments(mesh):
        if dep["metadata"]["name"] not in scaled:
            problems.append(f"{doc_id(dep)}: no ScaledObject")
    for dep in _component_deployments(mesh, COMPONENTS[0]):
        if dep["metadata"]["name"] not in scaled:
            problems.append(f"{doc_id(dep)}: gateway Deployment without HPA")
    for dep in mesh.in_namespace("Deployment"):
        if dep["metadata"]["name"] in scaled and "replicas" in dep["spec"]:
            problems.append(
                f"{doc_id(dep)}: sets spec.replicas but {scaled[dep['metadata']['name']]} owns it"
            )
    return problems


def check_capacity(mesh: Mesh) -> list[str]:
    """Envoy's limits sit behind the orchestrator's admission control, never in front of it, and
    the Triton outlier detection mirrors the orchestrator's ejection policy."""
    problems: list[str] = []
    policy = policy_of(mesh)
    env = _orchestrator_env(mesh)
    for e in json.loads(env["LLMMESH_ORCHESTRATOR_REPLICA_DNS"]):
        svc = mesh.service_for_host(e["host"])
        if svc is None:
            continue
        name = svc["metadata"]["name"]
        dr = next(
            (
                d
                for d in mesh.in_namespace("DestinationRule")
                if mesh.service_for_host(d["spec"]["host"]) is svc
            ),
            None,
        )
        so = next(
            (
                s
                for s in mesh.in_namespace("ScaledObject")
                if s["spec"]["scaleTargetRef"]["name"] == name
            ),
            None,
        )
        if dr is None or so is None:
            continue
        per_replica = int(
            policy["pools"][e["pool"]].get(
                "max_in_flight_per_replica", env["LLMMESH_ORCHESTRATOR_MAX_IN_FLIGHT_PER_REPLICA"]
            )
        )
        need = per_replica * int(so["spec"]["maxReplicaCount"])
        have = int(dr["spec"]["trafficPolicy"]["connectionPool"]["http"]["http2MaxRequests"])
        if have < need:
            problems.append(
                f"{doc_id(dr)}: http2MaxRequests {have} < max_in_flight_per_replica x maxReplicaCount = {need}"
            )
        od = dr["spec"]["trafficPolicy"]["outlierDetection"]
        health = policy["health"]
        pairs = (
            (
                "consecutiveLocalOriginFailures",
                od.get("consecutiveLocalOriginFailures"),
                health["consecutive_errors"],
            ),
            (
                "baseEjectionTime",
                (go_duration_ms(str(od.get("baseEjectionTime"))) or 0) / 1000,
                health["base_ejection_seconds"],
            ),
            ("maxEjectionPercent", od.get("maxEjectionPercent"), health["max_ejection_percent"]),
        )
        for field, mesh_value, policy_value in pairs:
            if mesh_value is None or float(mesh_value) != float(policy_value):
                problems.append(
                    f"{doc_id(dr)}: outlierDetection.{field} {mesh_value} != policy health {policy_value}"
                )
    orch = next(
        (
            d
            for d in mesh.in_namespace("DestinationRule")
            if d["spec"]["host"].startswith("llmmesh-orchestrator.")
        ),
        None,
    )
    if orch is None:
        problems.append("no DestinationRule for llmmesh-orchestrator")
    elif int(orch["spec"]["trafficPolicy"]["connectionPool"]["http"]["http2MaxRequests"]) < int(
        env["LLMMESH_ORCHESTRATOR_MAX_QUEUE"]
    ):
        problems.append("orchestrator http2MaxRequests must be >= LLMMESH_ORCHESTRATOR_MAX_QUEUE")
    return problems


def _prestop_seconds(container: Mapping[str, Any]) -> int:
    sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {})
    return int(sleep.get("seconds", 0))


def check_workloads(mesh: Mesh) -> list[str]:
    """Security context, resources, probes, PDBs and shutdown timing of every Deployment."""
    problems: list[str] = []
    refresh = float(_orchestrator_env(mesh)["LLMMESH_ORCHESTRATOR_DNS_INTERVAL_S"])
    pdbs = mesh.in_namespace("PodDisruptionBudget")
    service_accounts = {sa["metadata"]["name"] for sa in mesh.in_namespace("ServiceAccount")}
    for dep, tpl in mesh.pod_templates():
        where = doc_id(dep)
        spec = tpl["spec"]
        labels = tpl["metadata"]["labels"]
        if spec.get("serviceAccountName") not in service_accounts:
            problems.append(
                f"{where}: serviceAccountName must be one of this namespace's ServiceAccounts"
            )
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: automountServiceAccountToken must be false")
        psc = spec.get("securityContext", {})
        if (
            psc.get("runAsNonRoot") is not True
            or psc.get("seccompProfile", {}).get("type") != "RuntimeDefault"
        ):
            problems.append(
                f"{where}: pod must run as non-root with the RuntimeDefault seccomp profile"
            )
        for c in spec["containers"]:
            sc = c.get("securityContext", {})
            if (
                sc.get("allowPrivilegeEscalation") is not False
                or sc.get("readOnlyRootFilesystem") is not True
                or sc.get("capabilities", {}).get("drop") != ["ALL"]
            ):
                problems.append(
                    f"{where} {c['name']}: needs no privilege escalation, read-only root, drop ALL"
                )
            res = c.get("resources", {})
            if "cpu" not in res.get("requests", {}) or "memory" not in res.get("limits", {}):
                problems.append(f"{where} {c['name']}: needs a CPU request and a memory limit")
        if not any(labels_match(p["spec"]["selector"]["matchLabels"], labels) for p in pdbs):
            problems.append(f"{where}: no PodDisruptionBudget selects its pods")
        c = spec["containers"][0]
        grace = int(spec.get("terminationGracePeriodSeconds", 30))
        prestop = _prestop_seconds(c)
        if labels.get("app.kubernetes.io/component") == "triton":
            gpu = c["resources"].get("limits", {}).get("nvidia.com/gpu")
            if gpu is None or c["resources"].get("requests", {}).get("nvidia.com/gpu") != gpu:
                problems.append(f"{where}: needs nvidia.com/gpu in requests and limits")
            for probe in ("startupProbe", "readinessProbe"):
                get = c.get(probe, {}).get("httpGet", {})
                if (
                    get.get("path") != "/v2/health/ready"
                    or int(get.get("port", 0)) != TRITON_PORTS["http"]
                ):
                    problems.append(
                        f"{where}: {probe} must GET /v2/health/ready on {TRITON_PORTS['http']}"
                    )
            startup = c.get("startupProbe", {})
            if (
                int(startup.get("periodSeconds", 10)) * int(startup.get("failureThreshold", 3))
                < 600
            ):
                problems.append(f"{where}: startupProbe must allow >= 10 minutes of engine loading")
            if "/models" not in {m["mountPath"] for m in c.get("volumeMounts", [])} or not any(
                "persistentVolumeClaim" in v for v in spec.get("volumes", [])
            ):
                problems.append(f"{where}: needs the model repository PVC mounted at /models")
            claims = {
                v["persistentVolumeClaim"]["claimName"]
                for v in spec.get("volumes", [])
                if "persistentVolumeClaim" in v
            }
            for claim in claims:
                if mesh.get("PersistentVolumeClaim", claim) is None:
                    problems.append(f"{where}: PersistentVolumeClaim {claim} is not defined")
            exit_timeout = next(
                (
                    int(a.split("=", 1)[1])
                    for a in c.get("args", [])
                    if a.startswith("--exit-timeout-secs=")
                ),
                30,
            )
            if grace < prestop + exit_timeout:
                problems.append(
                    f"{where}: terminationGracePeriodSeconds {grace} < preStop {prestop} + exit timeout {exit_timeout}"
                )
            if prestop < refresh + 10:
                problems.append(
                    f"{where}: preStop {prestop}s must outlast the orchestrator's DNS refresh ({refresh}s) + 10 s"
                )
        else:
            env = mesh.container_env(dep, c)
            drain = next((float(v) for k, v in env.items() if k.endswith("_DRAIN_SECONDS")), None)
            if drain is None or grace < prestop + drain + 5:
                problems.append(
                    f"{where}: terminationGracePeriodSeconds {grace} < preStop {prestop} + drain {drain} + 5"
                )
    return problems


# --------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------


def istiod_values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(
        (MESH / "istio-system" / "istiod-values.yaml").read_text()
    )
    return loaded


def check_tracing(mesh: Mesh) -> list[str]:
    problems: list[str] = []
    providers = {
        p["name"]: p
        for p in istiod_values()["meshConfig"]["extensionProviders"]
        if "opentelemetry" in p
    }
    telemetries = mesh.of("Telemetry")
    if not any(
        t["metadata"].get("namespace") == mesh.namespace and not t["spec"].get("selector")
        for t in telemetries
    ):
        problems.append("no namespace-wide Telemetry for llmmesh")
    if not any(t["metadata"].get("namespace") == "istio-system" for t in telemetries):
        problems.append("no Telemetry for the ingress gateway (where sampling is decided)")
    rates: set[float] = set()
    for t in telemetries:
        for tracing in t["spec"].get("tracing", []):
            rates.add(round(float(tracing.get("randomSamplingPercentage", -1)), 6))
            for p in tracing.get("providers", []):
                if p["name"] not in providers:
                    problems.append(
                        f"{doc_id(t)}: provider {p['name']} is not an OpenTelemetry provider in istiod-values.yaml"
                    )
    for comp in COMPONENTS:
        for dep in _component_deployments(mesh, comp):
            env = mesh.container_env(dep, mesh.main_container(dep))
            ratio = env.get(f"{comp.env_prefix}TRACE_SAMPLE_RATIO")
            rates.add(round(float(ratio) * 100, 6) if ratio is not None else -1)
            endpoint = env.get(f"{comp.env_prefix}OTLP_ENDPOINT", "")
            if not any(
                endpoint == f"http://{p['opentelemetry']['service']}:{p['opentelemetry']['port']}"
                for p in providers.values()
            ):
                problems.append(
                    f"{doc_id(dep)}: OTLP endpoint {endpoint!r} is not the mesh's Jaeger provider"
                )
    if len(rates) != 1:
        problems.append(
            f"sampling rates disagree (Telemetry percent vs services' ratio x 100): {sorted(rates)}"
        )
    return problems


def check_gateway_models(mesh: Mesh) -> list[str]:
    """Each gateway serves its model version: Admit asks for LLMMESH_GATEWAY_MODEL_VERSION, the
    tokenizer comes from that version's model repository, and the Triton model exists."""
    problems: list[str] = []
    versions = {
        d["spec"]["template"]["metadata"]["labels"]["version"] for d in _triton_deployments(mesh)
    }
    for dep in _component_deployments(mesh, COMPONENTS[0]):
        tpl = dep["spec"]["template"]
        c = mesh.main_container(dep)
        env = mesh.container_env(dep, c)
        version = tpl["metadata"]["labels"].get("version")
        if env.get("LLMMESH_GATEWAY_MODEL_VERSION") != version:
            problems.append(
                f"{doc_id(dep)}: LLMMESH_GATEWAY_MODEL_VERSION must equal its subset label {version}"
            )
        if version not in versions:
            problems.append(f"{doc_id(dep)}: no Triton pool serves model version {version}")
        shadow = tpl["metadata"]["labels"].get("llmmesh.io/role") == "shadow"
        if env.get("LLMMESH_GATEWAY_SHADOW") != ("true" if shadow else "false"):
            problems.append(f"{doc_id(dep)}: LLMMESH_GATEWAY_SHADOW must be {str(shadow).lower()}")
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in tpl["spec"].get("volumes", [])
            if "persistentVolumeClaim" in v
        }
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        for model in json.loads(env.get("LLMMESH_GATEWAY_MODELS", "[]")):
            path = str(model["tokenizer_path"])
            mount = max(
                (m for m in mounts if path.startswith(m.rstrip("/") + "/")), key=len, default=None
            )
            claim = claims.get(mounts[mount]) if mount else None
            if claim is None or not claim.endswith(f"-{version}"):
                problems.append(
                    f"{doc_id(dep)}: tokenizer {path} must come from the {version} model repository"
                )
            triton_model = model.get("triton_model", "tensorrt_llm")
            if not (
                MESH.parent / "model_repository" / "production" / triton_model / "config.pbtxt"
            ).is_file():
                problems.append(
                    f"{doc_id(dep)}: Triton model {triton_model} is not in model_repository/production"
                )
        if not json.loads(env.get("LLMMESH_GATEWAY_MODELS", "[]")):
            problems.append(f"{doc_id(dep)}: LLMMESH_GATEWAY_MODELS is empty")
    return problems
