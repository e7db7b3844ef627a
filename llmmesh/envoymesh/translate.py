"""Rendered Istio objects -> Envoy v3 static configuration: the routes of a VirtualService, the
cluster of a DestinationRule (subset), mTLS transport sockets.

This is a small rehearsal of what istiod programs into its proxies, not Istio: only the fields
the llmmesh manifests use are translated, and a field it does not know is an error
(`Unsupported`), never silently dropped. Where Istio has a default the manifests rely on
(cluster names, LEAST_REQUEST balancing, retries avoiding the previous host, no panic mode once
outlier detection is set, weight-0 destinations left out), this module uses the same.

Everything here is pure: rendered documents in, plain dicts (Envoy's JSON/YAML) out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmmesh.envoymesh.ca import Identity

Doc = dict[str, Any]

TLS_SOCKET = "envoy.transport_sockets.tls"
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
DOWNSTREAM_TLS = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
)
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HTTP_OPTIONS_TYPE = f"type.googleapis.com/{HTTP_OPTIONS}"
PREVIOUS_HOSTS = {
    "name": "envoy.retry_host_predicates.previous_hosts",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
    },
}
# Istio's retry policy for a route that sets none.
ISTIO_DEFAULT_RETRIES: Doc = {
    "attempts": 2,
    "retryOn": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
}
# Istio's connect timeout when a DestinationRule sets none.
ISTIO_DEFAULT_CONNECT_TIMEOUT = "10s"
# Istio's circuit breaker thresholds on every cluster where a DestinationRule sets none (or 0,
# which it cannot tell from unset): unlimited (2**32 - 1; pilot's
# `getDefaultCircuitBreakerThresholds`), not Envoy's own 1024 connections, pending and active
# requests and 3 retries, which would refuse a local mesh's 1,025th stream to one destination.
ISTIO_DEFAULT_THRESHOLD = 2**32 - 1

_ROUTE_FIELDS = {"name", "match", "route", "timeout", "retries", "mirror", "mirrorPercentage"}
_MATCH_FIELDS = {"uri", "headers", "port"}
_POLICY_FIELDS = {"tls", "connectionPool", "outlierDetection"}
_POOL_TCP_FIELDS = {
    "maxConnections",
    "connectTimeout",
    "tcpKeepalive",
    "maxConnectionDuration",
    "idleTimeout",
}
_POOL_HTTP_FIELDS = {
    "http1MaxPendingRequests",
    "http2MaxRequests",
    "maxRetries",
    "idleTimeout",
    "maxRequestsPerConnection",
    "maxConcurrentStreams",
    "h2UpgradePolicy",
}
_H2_UPGRADE = {"DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"}


class Unsupported(ValueError):
    """A manifest field this translation does not rehearse."""


def _only(doc: Mapping[str, Any], known: set[str], what: str) -> None:
    """Unsupported, naming them, when `doc` has fields outside `known`."""
    extra = set(doc) - known
    if extra:
        raise Unsupported(f"{what} fields {sorted(extra)}")


def cluster_name(host: str, port: int, subset: str = "") -> str:
    """Istio's name for the outbound cluster of `host`:`port` (subset `subset`)."""
    return f"outbound|{port}|{subset}|{host}"


ClusterNamer = Callable[[str, int, str], str]


@dataclass(frozen=True)
class Manifests:
    """The rendered overlay, with look-ups by kind and name."""

    docs: Sequence[Doc]

    def of_kind(self, kind: str) -> list[Doc]:
        return [d for d in self.docs if d.get("kind") == kind]

    def _named(self, kind: str, name: str) -> Doc:
        for d in self.of_kind(kind):
            if d["metadata"]["name"] == name:
                return d
        raise KeyError(f"no {kind} {name} in the rendered overlay")

    def virtual_service(self, name: str) -> Doc:
        return self._named("VirtualService", name)

    def virtual_service_for(self, host: str) -> Doc:
        """The VirtualService whose hosts include `host`."""
        for d in self.of_kind("VirtualService"):
            if host in d["spec"].get("hosts", []):
                return d
        raise KeyError(f"no VirtualService for {host}")

    def destination_rule(self, host: str) -> Doc | None:
        for d in self.of_kind("DestinationRule"):
            if d["spec"]["host"] == host:
                return d
        return None

    def service(self, host: str) -> Doc:
        return self._named("Service", host.split(".")[0])

    def deployment(self, name: str) -> Doc:
        return self._named("Deployment", name)

    def http2(self, host: str, port: int) -> bool:
        """Whether `host`:`port` speaks HTTP/2: Istio's protocol selection by the port's
        appProtocol, else its name (`grpc*` / `http2*`: HTTP/2; `http*`: HTTP/1.1)."""
        for p in self.service(host)["spec"]["ports"]:
            if p["port"] == port:
                name = str(p.get("appProtocol") or p.get("name", ""))
                if name.startswith(("grpc", "http2")):
                    return True
                if name.startswith("http"):
                    return False
                raise Unsupported(f"{host}:{port}: protocol {name!r} is not HTTP")
        raise KeyError(f"{host} has no port {port}")

    def service_account(self, deployment: str) -> str:
        spec = self.deployment(deployment)["spec"]["template"]["spec"]
        return str(spec.get("serviceAccountName", "default"))


def seconds(duration: str) -> float:
    """An Istio duration (`600s`, `1.5s`, `500ms`, `1m`, `1h`) in seconds."""
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if duration.endswith(suffix):
            return float(duration[: -len(suffix)]) * scale
    raise Unsupported(f"duration {duration!r}")


def _duration(duration: str) -> str:
    """An Istio duration as Envoy's (protobuf JSON: seconds with an `s`)."""
    return f"{seconds(duration):g}s"


def _string_match(spec: Mapping[str, str]) -> Doc:
    ((kind, value),) = spec.items()
    if kind in ("exact", "prefix"):
        return {kind: value}
    if kind == "regex":
        return {"safe_regex": {"regex": value}}
    raise Unsupported(f"string match {kind}")


def _route_match(match: Mapping[str, Any]) -> Doc:
    _only(match, _MATCH_FIELDS, "route match")
    out: Doc = {"prefix": "/"}
    uri = match.get("uri")
    if uri is not None:
        out = _string_match(uri)
        if "safe_regex" in out:
            out = {"safe_regex": out["safe_regex"]}
        else:
            out = {"path": out["exact"]} if "exact" in out else {"prefix": out["prefix"]}
    headers = match.get("headers")
    if headers:
        out["headers"] = [
            {"name": name, "string_match": _string_match(spec)} for name, spec in headers.items()
        ]
    return out


def retry_policy(retries: Mapping[str, Any] | None) -> Doc | None:
    """Envoy's retry policy for a VirtualService route's `retries` (None: no retries)."""
    spec = ISTIO_DEFAULT_RETRIES if retries is None else retries
    attempts = int(spec.get("attempts", 0))
    if attempts == 0:
        return None
    out: Doc = {
        "retry_on": spec.get("retryOn", ISTIO_DEFAULT_RETRIES["retryOn"]),
        "num_retries": attempts,
        "retry_host_predicate": [PREVIOUS_HOSTS],
        "host_selection_retry_max_attempts": 5,
    }
    if "retriable-status-codes" in out["retry_on"]:
        out["retriable_status_codes"] = [503]
    if "perTryTimeout" in spec:
        out["per_try_timeout"] = _duration(spec["perTryTimeout"])
    return out


def _destination(dest: Mapping[str, Any], port: int | None) -> tuple[str, int, str]:
    d = dest.get("destination", dest)
    number = d.get("port", {}).get("number", port)
    if number is None:
        raise Unsupported(f"destination {d['host']} without a port, on no port's listener")
    return str(d["host"]), int(number), str(d.get("subset", ""))


def routes(
    vs: Doc,
    port: int | None = None,
    namer: ClusterNamer = cluster_name,
    idle_timeout_s: float | None = None,
) -> list[Doc]:
    """Envoy routes for the `http` routes of VirtualService `vs`, in order (the first match
    wins, as in Istio): one Envoy route per match condition. With `port`, only the matches
    that name no port or this one (Istio builds one route table per port). `idle_timeout_s`
    is the route's stream idle timeout (None: the listener's)."""
    out: list[Doc] = []
    for http in vs["spec"]["http"]:
        _only(http, _ROUTE_FIELDS, f"route {http.get('name')}:")
        dests = http["route"]
        if len(dests) > 1:
            # Istio leaves weight-0 destinations out of the weighted clusters.
            dests = [d for d in dests if int(d.get("weight", 0)) > 0]
        timeout = _duration(http.get("timeout", "0s"))
        # As pilot's setTimeout: a gRPC call's own deadline (its grpc-timeout header) bounds
        # it, capped at the route's timeout (0s: uncapped), in the deprecated field pilot sets:
        # a route with `max_stream_duration` no longer applies its `timeout` at all.
        action: Doc = {"timeout": timeout, "max_grpc_timeout": timeout}
        targets = [_destination(d, port) for d in dests]
        if len(targets) == 1:
            action["cluster"] = namer(*targets[0])
        else:
            action["weighted_clusters"] = {
                "clusters": [
                    {"name": namer(*t), "weight": int(d["weight"])}
                    for t, d in zip(targets, dests, strict=True)
                ]
            }
        policy = retry_policy(http.get("retries"))
        if policy is not None:
            action["retry_policy"] = policy
        if "mirror" in http:
            percent = float(http.get("mirrorPercentage", {}).get("value", 100.0))
            action["request_mirror_policies"] = [
                {
                    "cluster": namer(*_destination(http["mirror"], targets[0][1])),
                    # Istio's precision: parts per million.
                    "runtime_fraction": {
                        "default_value": {
                            "numerator": round(percent * 10_000),
                            "denominator": "MILLION",
                        }
                    },
                }
            ]
        if idle_timeout_s is not None:
            action["idle_timeout"] = f"{idle_timeout_s:g}s"
        for match in http.get("match") or [{}]:
            if port is not None and match.get("port", port) != port:
                continue
            out.append(
                {"name": http.get("name", ""), "match": _route_match(match), "route": action}
            )
    return out


def domains(hosts: Iterable[str], port: int | None = None) -> list[str]:
    """A virtual host's domains for VirtualService hosts: each host, with and without a port."""
    out: list[str] = []
    for host in hosts:
        if host == "*":
            return ["*"]
        out += [host, f"{host}:{port}" if port is not None else f"{host}:*"]
    return out


def upstream_tls(me: Identity, root: Path, peer: str, sni: str, http2: bool) -> Doc:
    """ISTIO_MUTUAL from the client's side: present `me`, trust the mesh root, accept only a
    server whose certificate carries the SPIFFE id `peer`."""
    return {
        "name": TLS_SOCKET,
        "typed_config": {
            "@type": UPSTREAM_TLS,
            "sni": sni,
            "common_tls_context": {
                "alpn_protocols": ["h2"] if http2 else ["http/1.1"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(me.cert)},
                        "private_key": {"filename": str(me.key)},
                    }
                ],
                "validation_context": {
                    "trusted_ca": {"filename": str(root)},
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"exact": peer}}
                    ],
                },
            },
        },
    }


def downstream_mtls(me: Identity, root: Path) -> Doc:
    """STRICT mTLS on an inbound listener: TLS only, and only with a client certificate the
    mesh root signed (a plaintext or certificate-less client fails the handshake)."""
    return {
        "name": TLS_SOCKET,
        "typed_config": {
            "@type": DOWNSTREAM_TLS,
            "require_client_certificate": True,
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(me.cert)},
                        "private_key": {"filename": str(me.key)},
                    }
                ],
                "validation_context": {"trusted_ca": {"filename": str(root)}},
            },
        },
    }


def traffic_policy(dr: Doc | None, subset: str = "") -> Doc:
    """The DestinationRule's traffic policy for `subset` (a subset's own policy overrides the
    rule's, field by field at the top level, as in Istio)."""
    if dr is None:
        return {}
    policy: Doc = dict(dr["spec"].get("trafficPolicy", {}))
    for s in dr["spec"].get("subsets", []):
        if s["name"] == subset:
            policy.update(s.get("trafficPolicy", {}))
    _only(policy, _POLICY_FIELDS, f"{dr['metadata']['name']}: trafficPolicy")
    return policy


def subset_labels(dr: Doc | None, subset: str) -> dict[str, str]:
    if not subset:
        return {}
    if dr is None:
        raise KeyError(f"subset {subset} without a DestinationRule")
    for s in dr["spec"].get("subsets", []):
        if s["name"] == subset:
            return dict(s.get("labels", {}))
    raise KeyError(f"{dr['metadata']['name']} has no subset {subset}")


def outlier_detection(od: Mapping[str, Any]) -> Doc:
    """Envoy's outlier detection for a DestinationRule's `outlierDetection`."""
    out: Doc = {
        # Istio programs no success-rate ejection.
        "enforcing_success_rate": 0,
        "enforcing_local_origin_success_rate": 0,
        "enforcing_consecutive_gateway_failure": 0,
    }
    if "consecutive5xxErrors" in od:
        n = int(od["consecutive5xxErrors"])
        out["consecutive_5xx"] = n
        out["enforcing_consecutive_5xx"] = 100 if n > 0 else 0
    if "consecutiveGatewayErrors" in od:
        n = int(od["consecutiveGatewayErrors"])
        out["consecutive_gateway_failure"] = n
        out["enforcing_consecutive_gateway_failure"] = 100 if n > 0 else 0
    if od.get("splitExternalLocalOriginErrors"):
        out["split_external_local_origin_errors"] = True
        out["consecutive_local_origin_failure"] = int(od.get("consecutiveLocalOriginFailures", 5))
        out["enforcing_consecutive_local_origin_failure"] = 100
    if "interval" in od:
        out["interval"] = _duration(od["interval"])
    if "baseEjectionTime" in od:
        out["base_ejection_time"] = _duration(od["baseEjectionTime"])
    if "maxEjectionPercent" in od:
        out["max_ejection_percent"] = int(od["maxEjectionPercent"])
    return out


def check_destination_rules(manifests: Manifests) -> None:
    """Translate every DestinationRule's policy, for each subset: `Unsupported` names the first
    field the local mesh cannot rehearse (raised before anything starts, not when the proxy of
    a pod that uses it is built)."""
    for dr in manifests.of_kind("DestinationRule"):
        for subset in ["", *(s["name"] for s in dr["spec"].get("subsets", []))]:
            policy = traffic_policy(dr, subset)
            cluster(f"{dr['metadata']['name']}/{subset}", policy, True, [], None)


def cluster(
    name: str,
    policy: Mapping[str, Any],
    http2: bool,
    endpoints: Sequence[tuple[str, int]],
    transport_socket: Doc | None,
) -> Doc:
    """A static cluster of `endpoints` with a DestinationRule traffic policy applied: the
    connection pool as circuit breakers, TCP keepalive, connect and idle timeouts, outlier
    detection; LEAST_REQUEST balancing (Istio's default)."""
    pool = policy.get("connectionPool", {})
    tcp, http = pool.get("tcp", {}), pool.get("http", {})
    _only(tcp, _POOL_TCP_FIELDS, f"{name}: connectionPool.tcp")
    _only(http, _POOL_HTTP_FIELDS, f"{name}: connectionPool.http")
    # Istio tracks what remains of each (the `remaining_*` gauges).
    thresholds: Doc = {"track_remaining": True}
    for src, (field, threshold) in (
        (tcp, ("maxConnections", "max_connections")),
        (http, ("http1MaxPendingRequests", "max_pending_requests")),
        (http, ("http2MaxRequests", "max_requests")),
        (http, ("maxRetries", "max_retries")),
    ):
        value = int(src.get(field, 0))
        thresholds[threshold] = value if value > 0 else ISTIO_DEFAULT_THRESHOLD
    upgrade = http.get("h2UpgradePolicy", "DEFAULT")
    if upgrade not in _H2_UPGRADE:
        raise Unsupported(f"{name}: h2UpgradePolicy {upgrade!r}")
    # UPGRADE: HTTP/2 to an HTTP/1.1 port (the mesh's default, as Istio's, upgrades nothing).
    http2 = http2 or upgrade == "UPGRADE"
    common: Doc = {}
    # As pilot: the HTTP idle timeout, else the TCP one.
    idle = http.get("idleTimeout", tcp.get("idleTimeout"))
    if idle is not None:
        common["idle_timeout"] = _duration(idle)
    if "maxConnectionDuration" in tcp:
        common["max_connection_duration"] = _duration(tcp["maxConnectionDuration"])
    # As pilot: a count applies only when positive (0 cannot be told from unset).
    if int(http.get("maxRequestsPerConnection", 0)) > 0:
        common["max_requests_per_connection"] = int(http["maxRequestsPerConnection"])
    h2: Doc = {}
    if int(http.get("maxConcurrentStreams", 0)) > 0:
        h2["max_concurrent_streams"] = int(http["maxConcurrentStreams"])
    protocol: Doc = {"http2_protocol_options": h2} if http2 else {"http_protocol_options": {}}
    out: Doc = {
        "name": name,
        "type": "STATIC",
        "lb_policy": "LEAST_REQUEST",
        "connect_timeout": _duration(tcp.get("connectTimeout", ISTIO_DEFAULT_CONNECT_TIMEOUT)),
        "circuit_breakers": {"thresholds": [thresholds]},
        "typed_extension_protocol_options": {
            HTTP_OPTIONS: {
                "@type": HTTP_OPTIONS_TYPE,
                "common_http_protocol_options": common,
                "explicit_http_config": protocol,
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": host, "port_value": port}}
                            }
                        }
                        for host, port in endpoints
                    ]
                }
            ],
        },
    }
    keepalive = tcp.get("tcpKeepalive")
    if keepalive:
        ka: Doc = {}
        if "time" in keepalive:
            ka["keepalive_time"] = round(seconds(keepalive["time"]))
        if "interval" in keepalive:
            ka["keepalive_interval"] = round(seconds(keepalive["interval"]))
        if "probes" in keepalive:
            ka["keepalive_probes"] = int(keepalive["probes"])
        out["upstream_connection_options"] = {"tcp_keepalive": ka}
    od = policy.get("outlierDetection")
    if od:
        out["outlier_detection"] = outlier_detection(od)
        # Istio: minHealthPercent (default 0: ejected hosts stay out) is the panic threshold.
        panic = float(od.get("minHealthPercent", 0))
        out["common_lb_config"] = {"healthy_panic_threshold": {"value": panic}}
    if transport_socket is not None:
        out["transport_socket"] = transport_socket
    return out


def mutual_tls(policy: Mapping[str, Any]) -> bool:
    """Whether the client side originates Istio mTLS (ISTIO_MUTUAL, or no tls: auto mTLS)."""
    mode = policy.get("tls", {}).get("mode", "ISTIO_MUTUAL")
    if mode not in ("ISTIO_MUTUAL", "DISABLE"):
        raise Unsupported(f"tls mode {mode}")
    return bool(mode == "ISTIO_MUTUAL")


def referenced_clusters(route_list: Iterable[Doc]) -> list[str]:
    """Every cluster the routes send to or mirror to, in first-seen order."""
    seen: dict[str, None] = {}
    for r in route_list:
        action = r["route"]
        if "cluster" in action:
            seen[action["cluster"]] = None
        for c in action.get("weighted_clusters", {}).get("clusters", []):
            seen[c["name"]] = None
        for m in action.get("request_mirror_policies", []):
            seen[m["cluster"]] = None
    return list(seen)


def parse_cluster_name(name: str) -> tuple[int, str, str]:
    """(port, subset, host) of an Istio outbound cluster name."""
    direction, port, subset, host = name.split("|")
    if direction != "outbound":
        raise ValueError(name)
    return int(port), subset, host
