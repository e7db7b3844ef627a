"""Envoy bootstraps for the three kinds of proxy the rehearsal runs, built from the rendered
overlay with `llmmesh.envoymesh.translate`:

- the **ingress** (Istio's ingress gateway): the client-facing listener with the routes of the
  gateway VirtualService, and one cluster per destination (subset) it routes or mirrors to, with
  that DestinationRule's pool, outlier detection and ISTIO_MUTUAL towards the pods' sidecars;
- a pod's **sidecar, inbound**: one STRICT mTLS listener per Service port, forwarding in
  plaintext to the pod's process on its local port (Istio's inbound path, no timeout);
- a **client's outbound to picked pods** (a headless Service's ORIGINAL_DST cluster in Istio):
  one local listener per (pod, port) stands for `pod IP:port`, carries the routes of the
  Service's VirtualService for that port (matched on the headless-service authority) and sends
  to exactly that pod's sidecar over mTLS with the client's identity.

Everything binds 127.0.0.1. A pod here is a process plus its sidecar's ports (`Pod`): there is
no network namespace per pod, so an outbound listener stands in for the iptables redirect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from llmmesh.envoymesh.ca import Identity, LocalCA, spiffe_id
from llmmesh.envoymesh.translate import (
    Doc,
    Manifests,
    cluster,
    cluster_name,
    domains,
    downstream_mtls,
    mutual_tls,
    parse_cluster_name,
    referenced_clusters,
    routes,
    subset_labels,
    traffic_policy,
    upstream_tls,
)

HCM = "envoy.filters.network.http_connection_manager"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
LOCALHOST = "127.0.0.1"
#: Istio's ingress gateway identity (the principal the AuthorizationPolicies name).
INGRESS_NAMESPACE = "istio-system"
INGRESS_SERVICE_ACCOUNT = "istio-ingressgateway-service-account"
#: Envoy's stream idle timeout, which Istio leaves as it is.
ENVOY_STREAM_IDLE_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Pod:
    """One workload instance: the Service it backs (FQDN), its labels (subset selection), its
    service account (mTLS identity), its process's port and its sidecar's inbound port for each
    Service port."""

    name: str
    host: str
    service_account: str
    labels: Mapping[str, str] = field(default_factory=dict)
    app_ports: Mapping[int, int] = field(default_factory=dict)
    inbound_ports: Mapping[int, int] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.host.split(".")[1]

    @property
    def spiffe(self) -> str:
        return spiffe_id(self.namespace, self.service_account)


@dataclass(frozen=True)
class Pinned:
    """A client's calls to one picked pod of a headless Service on `port`: `listen_port` is the
    local listener standing for `pod IP:port`."""

    pod: Pod
    port: int
    listen_port: int


# Istio's inbound route action, less its cluster.
INBOUND_ROUTE: Final[Doc] = {
    "timeout": "0s",
    "max_stream_duration": {"max_stream_duration": "0s", "grpc_timeout_header_max": "0s"},
}


def listener(
    name: str,
    port: int,
    virtual_hosts: Sequence[Doc],
    transport_socket: Doc | None,
    stream_idle_timeout_s: float = ENVOY_STREAM_IDLE_TIMEOUT_S,
) -> Doc:
    """An HTTP listener on 127.0.0.1:`port` (HTTP/1.1 or HTTP/2, by ALPN or the h2 preface)."""
    chain: Doc = {
        "filters": [
            {
                "name": HCM,
                "typed_config": {
                    "@type": HCM_TYPE,
                    "stat_prefix": name,
                    "codec_type": "AUTO",
                    "stream_idle_timeout": f"{stream_idle_timeout_s:g}s",
                    "route_config": {"name": name, "virtual_hosts": list(virtual_hosts)},
                    "http_filters": [ROUTER],
                },
            }
        ]
    }
    if transport_socket is not None:
        chain["transport_socket"] = transport_socket
    return {
        "name": name,
        "address": {"socket_address": {"address": LOCALHOST, "port_value": port}},
        # Envoy binds with SO_REUSEPORT by default: a port clash with another reuseport
        # listener would start both and split connections between them silently. Without
        # it, the second bind fails and that Envoy exits, which its start reports.
        "enable_reuse_port": False,
        "filter_chains": [chain],
    }


def bootstrap(node: str, listeners: Sequence[Doc], clusters: Sequence[Doc]) -> Doc:
    """A static bootstrap; the admin interface on a free port (Envoy writes it to the file
    `--admin-address-path` names)."""
    return {
        "node": {"id": node, "cluster": node},
        "admin": {"address": {"socket_address": {"address": LOCALHOST, "port_value": 0}}},
        "static_resources": {"listeners": list(listeners), "clusters": list(clusters)},
    }


def _sni(host: str, port: int, subset: str) -> str:
    return f"outbound_.{port}_.{subset}_.{host}"


def _upstream_cluster(
    manifests: Manifests,
    name: str,
    pods: Sequence[Pod],
    me: Identity,
    root: Path,
) -> Doc:
    """Cluster `name` (an Istio outbound cluster name) over the sidecars of `pods` matching its
    subset, with its DestinationRule's policy."""
    port, subset, host = parse_cluster_name(name.split("|pod|")[0])
    dr = manifests.destination_rule(host)
    policy = traffic_policy(dr, subset)
    labels = subset_labels(dr, subset)
    members = [
        p for p in pods if p.host == host and all(p.labels.get(k) == v for k, v in labels.items())
    ]
    if not members:
        raise KeyError(f"{name}: no pod runs {host} with labels {labels}")
    peers = {p.spiffe for p in members}
    if len(peers) != 1:
        raise ValueError(f"{name}: pods of several identities {sorted(peers)}")
    http2 = manifests.http2(host, port)
    tls = (
        upstream_tls(me, root, peers.pop(), _sni(host, port, subset), http2)
        if mutual_tls(policy)
        else None
    )
    endpoints = [(LOCALHOST, p.inbound_ports[port]) for p in members]
    return cluster(name, policy, http2, endpoints, tls)


def ingress(
    manifests: Manifests,
    virtual_service: str,
    listen_port: int,
    pods: Sequence[Pod],
    ca: LocalCA,
    route_idle_timeout_s: float | None = None,
) -> Doc:
    """The ingress gateway: VirtualService `virtual_service`'s routes on a plaintext listener
    (the dev overlay's HTTP server; TLS termination at the ingress is not rehearsed), every
    destination and mirror a cluster over the matching `pods`' sidecars."""
    vs = manifests.virtual_service(virtual_service)
    route_list = routes(vs, idle_timeout_s=route_idle_timeout_s)
    vhost = {"name": virtual_service, "domains": domains(vs["spec"]["hosts"]), "routes": route_list}
    me = ca.identity(INGRESS_NAMESPACE, INGRESS_SERVICE_ACCOUNT)
    clusters = [
        _upstream_cluster(manifests, name, pods, me, ca.root_cert)
        for name in referenced_clusters(route_list)
    ]
    return bootstrap("ingress", [listener("ingress", listen_port, [vhost], None)], clusters)


def sidecar_inbound(
    manifests: Manifests,
    pod: Pod,
    ca: LocalCA,
    stream_idle_timeout_s: float = ENVOY_STREAM_IDLE_TIMEOUT_S,
) -> tuple[list[Doc], list[Doc]]:
    """The listeners and clusters of `pod`'s sidecar for inbound traffic (PeerAuthentication
    STRICT: mTLS required on every Service port). As pilot does, the inbound clusters take the
    connection pool of the DestinationRule for the pod's Service (its top-level policy: the
    server side needs the capacity its callers are allowed), and nothing else of it."""
    me = ca.identity(pod.namespace, pod.service_account)
    pool = traffic_policy(manifests.destination_rule(pod.host)).get("connectionPool")
    inbound_policy: Doc = {} if pool is None else {"connectionPool": pool}
    listeners, clusters = [], []
    for port, inbound in sorted(pod.inbound_ports.items()):
        name = f"inbound|{port}||"
        http2 = manifests.http2(pod.host, port)
        endpoints = [(LOCALHOST, pod.app_ports[port])]
        clusters.append(cluster(name, inbound_policy, http2, endpoints, None))
        vhost = {
            "name": f"inbound|{port}",
            "domains": ["*"],
            # Istio's inbound route: no timeout (the caller's sidecar holds the route's), a
            # gRPC call's own deadline honoured uncapped.
            "routes": [{"match": {"prefix": "/"}, "route": INBOUND_ROUTE | {"cluster": name}}],
        }
        listeners.append(
            listener(
                f"inbound_{port}",
                inbound,
                [vhost],
                downstream_mtls(me, ca.root_cert),
                stream_idle_timeout_s,
            )
        )
    return listeners, clusters


def outbound_pinned(
    manifests: Manifests,
    pinned: Sequence[Pinned],
    me: Identity,
    root: Path,
    stream_idle_timeout_s: float = ENVOY_STREAM_IDLE_TIMEOUT_S,
) -> tuple[list[Doc], list[Doc]]:
    """A client sidecar's outbound listeners and clusters for calls to picked pods of headless
    Services: each listener matches the Service's host (the authority the client sends) and
    routes by the Service's VirtualService for that port; its clusters reach only that pod."""
    listeners: list[Doc] = []
    clusters: list[Doc] = []
    for p in pinned:
        host = p.pod.host
        vs = manifests.virtual_service_for(host)

        def namer(h: str, port: int, subset: str, pod: str = p.pod.name) -> str:
            return f"{cluster_name(h, port, subset)}|pod|{pod}"

        route_list = routes(vs, port=p.port, namer=namer)
        vhost = {
            "name": f"{host}:{p.port}",
            "domains": domains([host], p.port),
            "routes": route_list,
        }
        name = f"outbound_{p.pod.name}_{p.port}"
        listeners.append(listener(name, p.listen_port, [vhost], None, stream_idle_timeout_s))
        clusters += [
            _upstream_cluster(manifests, c, [p.pod], me, root)
            for c in referenced_clusters(route_list)
            if c not in {x["name"] for x in clusters}
        ]
    return listeners, clusters
