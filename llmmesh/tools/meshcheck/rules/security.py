"""Security rules: authorization policies (and a model of what they allow), DestinationRule
traffic policy, mTLS."""

from __future__ import annotations

import re
from collections.abc import Mapping

from llmmesh.tools.meshcheck.common import TRUST_DOMAIN, Doc, doc_id
from llmmesh.tools.meshcheck.index import Mesh, labels_match
from llmmesh.tools.meshcheck.project import (
    EXTERNAL_PRINCIPALS,
    grpc_method,
    grpc_service_known,
)
from llmmesh.tools.meshcheck.rules.helpers import is_tcp_port, is_tcp_service, plaintext_hosts

# Operation fields Istio can only match on HTTP: a rule that sets one never matches a plain TCP
# connection, so an ALLOW policy with it denies that traffic.
HTTP_ONLY_FIELDS = ("paths", "notPaths", "methods", "notMethods", "hosts", "notHosts")


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


def _tcp_ports_of(mesh: Mesh, selector: Mapping[str, str] | None) -> set[int]:
    """Workload ports that Services selecting a policy's workloads expose as plain TCP."""
    templates = [
        tpl
        for _dep, tpl in mesh.pod_templates()
        if selector is None or labels_match(selector, tpl["metadata"].get("labels", {}))
    ]
    ports: set[int] = set()
    for svc in mesh.in_namespace("Service"):
        svc_selector = svc["spec"].get("selector")
        pods = [
            t
            for t in templates
            if svc_selector and labels_match(svc_selector, t["metadata"]["labels"])
        ]
        for sport in svc["spec"]["ports"]:
            if not pods or not is_tcp_port(sport):
                continue
            target = sport.get("targetPort", sport["port"])
            if isinstance(target, int) or str(target).isdigit():
                ports.add(int(target))
                continue
            for tpl in pods:
                for c in tpl["spec"]["containers"]:
                    ports.update(
                        int(p["containerPort"])
                        for p in c.get("ports", [])
                        if p.get("name") == target
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
        tcp_ports = _tcp_ports_of(mesh, selector)
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
                on_tcp = {int(p) for p in op.get("ports", [])} & tcp_ports
                if on_tcp:
                    # Plain TCP: the port (and the principal) is all Istio can match.
                    http_fields = [f for f in HTTP_ONLY_FIELDS if f in op]
                    if http_fields:
                        problems.append(
                            f"{where} to[{j}]: {http_fields} never match TCP port(s) "
                            f"{sorted(on_tcp)}: the connection would be denied"
                        )
                    if on_tcp != {int(p) for p in op["ports"]}:
                        problems.append(
                            f"{where} to[{j}]: mixes TCP port(s) {sorted(on_tcp)} with HTTP ports"
                        )
                    continue
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
                # An operation without paths (a TCP port's) matches every path, as in Istio.
                if (
                    str(port) in op.get("ports", [])
                    and ("paths" not in op or path_ok(op["paths"]))
                    and method in op.get("methods", [method])
                ):
                    return True
    return False


def check_destination_rules(mesh: Mesh) -> list[str]:
    problems: list[str] = []
    by_service: dict[str, Doc] = {}
    plaintext = plaintext_hosts(mesh)
    for host in sorted(plaintext):
        if not any(
            dr["spec"]["host"] == host
            and dr["spec"].get("trafficPolicy", {}).get("tls", {}).get("mode") == "DISABLE"
            and dr["spec"].get("exportTo") == ["."]
            for dr in mesh.in_namespace("DestinationRule")
        ):
            problems.append(
                f"{host} (the autoscaler's Prometheus) needs a DestinationRule with tls mode "
                "DISABLE, exportTo [.]: auto mTLS would send TLS to its plain-HTTP port"
            )
    for dr in mesh.in_namespace("DestinationRule"):
        if dr["spec"]["host"] in plaintext:
            continue  # checked above
        svc = mesh.service_for_host(dr["spec"]["host"])
        if svc is not None:
            by_service[svc["metadata"]["name"]] = dr
        policy = dr["spec"].get("trafficPolicy", {})
        pool = policy.get("connectionPool", {})
        if svc is not None and is_tcp_service(svc):
            # Envoy proxies it as TCP: only the tcp limits exist for it.
            if "tcp" not in pool:
                problems.append(f"{doc_id(dr)}: trafficPolicy.connectionPool needs tcp limits")
            if "http" in pool:
                problems.append(
                    f"{doc_id(dr)}: connectionPool.http does not apply to a plain TCP Service"
                )
        elif "tcp" not in pool or "http" not in pool:
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


# Namespaces the overlays may place objects in: llmmesh, and istio-system for the ingress
# gateway's Telemetry.
NAMESPACES = ("llmmesh", "istio-system")


def check_namespaces(mesh: Mesh) -> list[str]:
    """Every namespaced object lives in llmmesh or istio-system (principals and FQDNs embed them)."""
    return [
        f"{doc_id(d)}: namespace {d['metadata'].get('namespace')} is not one of {NAMESPACES}"
        for d in mesh.docs
        if d.get("kind") != "Namespace" and d["metadata"].get("namespace") not in NAMESPACES
    ]
