"""The rendered overlays -> Envoy routes and clusters (llmmesh.envoymesh), and the bootstraps
Envoy 1.40 accepts (`envoy --mode validate`)."""

from __future__ import annotations

import copy
import datetime
import json
import subprocess
from pathlib import Path

import pytest

from llmmesh.envoymesh.ca import LocalCA, spiffe_id
from llmmesh.envoymesh.envoy import envoy_binary
from llmmesh.envoymesh.proxies import (
    INBOUND_ROUTE,
    Pinned,
    Pod,
    bootstrap,
    ingress,
    outbound_pinned,
    sidecar_inbound,
)
from llmmesh.envoymesh.translate import (
    Doc,
    Manifests,
    Unsupported,
    check_destination_rules,
    cluster,
    cluster_name,
    routes,
    traffic_policy,
)
from llmmesh.tools.meshcheck.common import MeshSetupError, target_dir
from llmmesh.tools.meshcheck.render import render

GATEWAY = "llmmesh-gateway.llmmesh.svc.cluster.local"
SHADOW = "llmmesh-gateway-shadow.llmmesh.svc.cluster.local"
TRITON_V1 = "triton-llama3-8b-v1-short.llmmesh.svc.cluster.local"
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


@pytest.fixture(scope="module")
def overlays() -> dict[str, Manifests]:
    try:
        return {t: Manifests(render(target_dir(t))) for t in ("dev", "prod")}
    except MeshSetupError as exc:
        pytest.fail(str(exc), pytrace=False)


def by_name(route_list: list[Doc]) -> dict[str, list[Doc]]:
    out: dict[str, list[Doc]] = {}
    for r in route_list:
        out.setdefault(r["name"], []).append(r)
    return out


def test_dev_canary_weights_mirror_and_header_route(overlays: dict[str, Manifests]) -> None:
    vs = overlays["dev"].virtual_service("llmmesh-gateway")
    rs = routes(vs)
    named = by_name(rs)
    (generate,) = named["grpc-generate"]
    assert generate["match"] == {"path": "/llmmesh.gateway.v1.GatewayService/Generate"}
    action = generate["route"]
    assert action["weighted_clusters"]["clusters"] == [
        {"name": cluster_name(GATEWAY, 50051, "v1"), "weight": 80},
        {"name": cluster_name(GATEWAY, 50051, "v2"), "weight": 20},
    ]
    (mirror,) = action["request_mirror_policies"]
    assert mirror["cluster"] == cluster_name(SHADOW, 50051)
    assert mirror["runtime_fraction"]["default_value"] == {
        "numerator": 1_000_000,
        "denominator": "MILLION",
    }
    assert action["timeout"] == "600s"
    assert action["retry_policy"]["retry_on"] == "connect-failure,refused-stream"
    assert action["retry_policy"]["num_retries"] == 2
    # The header route comes first, goes to v2 only and is not mirrored.
    (canary,) = named["grpc-generate-canary"]
    assert rs.index(canary) < rs.index(generate)
    assert canary["match"]["headers"] == [
        {"name": "x-llmmesh-canary", "string_match": {"exact": "always"}}
    ]
    assert canary["route"]["cluster"] == cluster_name(GATEWAY, 50051, "v2")
    assert "request_mirror_policies" not in canary["route"]
    # Two uri matches: two Envoy routes sharing the action.
    assert [r["match"]["path"] for r in named["openai-stream"]] == [
        "/v1/chat/completions",
        "/v1/completions",
    ]
    (unary,) = named["grpc-unary"]
    assert unary["route"]["retry_policy"]["per_try_timeout"] == "3s"
    assert "unavailable" in unary["route"]["retry_policy"]["retry_on"]
    assert unary["route"]["retry_policy"]["retry_host_predicate"][0]["name"].endswith(
        "previous_hosts"
    )
    assert "request_mirror_policies" not in unary["route"]


def test_prod_weight_zero_is_left_out_and_mirror_percentage(
    overlays: dict[str, Manifests],
) -> None:
    named = by_name(routes(overlays["prod"].virtual_service("llmmesh-gateway")))
    action = named["grpc-generate"][0]["route"]
    assert action["cluster"] == cluster_name(GATEWAY, 50051, "v1")
    assert "weighted_clusters" not in action
    fraction = action["request_mirror_policies"][0]["runtime_fraction"]["default_value"]
    assert fraction == {"numerator": 100_000, "denominator": "MILLION"}


def test_an_edited_canary_is_rehearsed_without_other_edits(
    overlays: dict[str, Manifests],
) -> None:
    docs = copy.deepcopy(list(overlays["dev"].docs))
    edited = Manifests(docs)
    vs = edited.virtual_service("llmmesh-gateway")
    for http in vs["spec"]["http"]:
        if http["name"] == "openai-unary":
            http["route"][0]["weight"], http["route"][1]["weight"] = 35, 65
    action = by_name(routes(vs))["openai-unary"][0]["route"]
    assert [c["weight"] for c in action["weighted_clusters"]["clusters"]] == [35, 65]


def test_gateway_destination_rule_as_circuit_breakers_and_outlier_detection(
    overlays: dict[str, Manifests],
) -> None:
    m = overlays["dev"]
    policy = traffic_policy(m.destination_rule(GATEWAY), "v1")
    c = cluster("c", policy, m.http2(GATEWAY, 50051), [("127.0.0.1", 1)], None)
    assert c["lb_policy"] == "LEAST_REQUEST"
    assert c["connect_timeout"] == "2s"
    assert c["circuit_breakers"]["thresholds"] == [
        {
            "track_remaining": True,
            "max_connections": 4096,
            "max_pending_requests": 1024,
            "max_requests": 8192,
            "max_retries": 64,
        }
    ]
    assert c["upstream_connection_options"]["tcp_keepalive"] == {
        "keepalive_time": 60,
        "keepalive_interval": 20,
    }
    options = next(iter(c["typed_extension_protocol_options"].values()))
    assert options["common_http_protocol_options"] == {"idle_timeout": "900s"}
    assert options["explicit_http_config"] == {"http2_protocol_options": {}}
    od = c["outlier_detection"]
    assert od["consecutive_5xx"] == 0
    assert od["enforcing_consecutive_5xx"] == 0
    assert od["split_external_local_origin_errors"] is True
    assert od["consecutive_local_origin_failure"] == 5
    assert od["enforcing_consecutive_local_origin_failure"] == 100
    assert (od["interval"], od["base_ejection_time"], od["max_ejection_percent"]) == (
        "10s",
        "30s",
        50,
    )
    assert c["common_lb_config"] == {"healthy_panic_threshold": {"value": 0}}
    # The OpenAI port is HTTP/1.1 (Service port name http-openai).
    assert not m.http2(GATEWAY, 8080)
    # A single-endpoint service keeps its one host when ejected (minHealthPercent 50).
    redis = traffic_policy(m.destination_rule("llmmesh-redis.llmmesh.svc.cluster.local"))
    r = cluster("r", redis, False, [("127.0.0.1", 1)], None)
    assert r["common_lb_config"] == {"healthy_panic_threshold": {"value": 50.0}}
    triton = traffic_policy(m.destination_rule(TRITON_V1))
    t = cluster("t", triton, True, [("127.0.0.1", 1)], None)
    assert t["outlier_detection"]["enforcing_consecutive_5xx"] == 100
    assert t["outlier_detection"]["consecutive_5xx"] == 3


def test_a_connection_pool_left_unset_or_zero_is_unlimited_as_in_istio() -> None:
    """Istio sets every threshold a DestinationRule leaves unset (or 0, which it cannot tell
    apart) to 2**32 - 1: without that, Envoy's defaults would refuse a 1,025th concurrent
    request to one destination and a fourth concurrent retry."""
    unlimited = 2**32 - 1
    bare = cluster("c", {}, True, [("127.0.0.1", 1)], None)
    assert bare["circuit_breakers"]["thresholds"] == [
        {
            "track_remaining": True,
            "max_connections": unlimited,
            "max_pending_requests": unlimited,
            "max_requests": unlimited,
            "max_retries": unlimited,
        }
    ]
    policy = {"connectionPool": {"http": {"http2MaxRequests": 0, "maxRetries": 5}}}
    (thresholds,) = cluster("c", policy, True, [("127.0.0.1", 1)], None)["circuit_breakers"][
        "thresholds"
    ]
    assert (thresholds["max_requests"], thresholds["max_retries"]) == (unlimited, 5)


def test_every_connection_pool_field_is_applied_or_refused(tmp_path: Path) -> None:
    """The connection-pool fields Istio applies to a cluster are applied (and Envoy takes the
    result); any other is refused, not silently dropped from the rehearsal."""
    policy = {
        "connectionPool": {
            "tcp": {"maxConnectionDuration": "3600s"},
            "http": {"maxRequestsPerConnection": 100, "maxConcurrentStreams": 64},
        }
    }
    c = cluster("c", policy, True, [("127.0.0.1", 1)], None)
    options = next(iter(c["typed_extension_protocol_options"].values()))
    assert options["common_http_protocol_options"] == {
        "max_connection_duration": "3600s",
        "max_requests_per_connection": 100,
    }
    assert options["explicit_http_config"] == {
        "http2_protocol_options": {"max_concurrent_streams": 64}
    }
    _validate(bootstrap("pool", [], [c]), tmp_path, "pool")
    # UPGRADE makes an HTTP/1.1 port's cluster HTTP/2; the TCP idle timeout stands in for an
    # HTTP one left unset, as pilot has it.
    upgraded = cluster(
        "u",
        {"connectionPool": {"http": {"h2UpgradePolicy": "UPGRADE"}, "tcp": {"idleTimeout": "60s"}}},
        False,
        [("127.0.0.1", 1)],
        None,
    )
    options = next(iter(upgraded["typed_extension_protocol_options"].values()))
    assert options["explicit_http_config"] == {"http2_protocol_options": {}}
    assert options["common_http_protocol_options"] == {"idle_timeout": "60s"}
    with pytest.raises(Unsupported, match="useClientProtocol"):
        cluster("c", {"connectionPool": {"http": {"useClientProtocol": True}}}, True, [], None)


def test_every_destination_rule_of_the_overlays_is_rehearsed(
    overlays: dict[str, Manifests],
) -> None:
    """The check the local Envoy mesh makes before it starts anything passes on what ships;
    a rule with a field it cannot rehearse fails it, naming the field."""
    for m in overlays.values():
        check_destination_rules(m)
    docs = copy.deepcopy(list(overlays["dev"].docs))
    rule = next(d for d in docs if d.get("kind") == "DestinationRule")
    rule["spec"].setdefault("trafficPolicy", {}).setdefault("connectionPool", {})["http"] = {
        "useClientProtocol": True
    }
    with pytest.raises(Unsupported, match="useClientProtocol"):
        check_destination_rules(Manifests(docs))


def test_a_calls_own_deadline_bounds_it_up_to_the_route_timeout(
    overlays: dict[str, Manifests],
) -> None:
    """As pilot's setTimeout: every route honours a gRPC call's grpc-timeout header, capped at
    the route's timeout (0s: uncapped, where the VirtualService sets none), in the deprecated
    `max_grpc_timeout`; no `max_stream_duration`, with which Envoy would drop the route's
    timeout (test_route_timeouts.py). The sidecar's inbound route, as Istio's, has no timeout
    and honours the header uncapped."""
    vs = overlays["dev"].virtual_service_for(TRITON_V1)
    stream, unary = (r["route"] for r in routes(vs, port=8001))
    assert (stream["timeout"], stream["max_grpc_timeout"]) == ("660s", "660s")
    assert (unary["timeout"], unary["max_grpc_timeout"]) == ("5s", "5s")
    bare = {"spec": {"http": [{"name": "r", "route": [{"destination": {"host": "h"}}]}]}}
    (action,) = (r["route"] for r in routes(bare, port=1))
    assert (action["timeout"], action["max_grpc_timeout"]) == ("0s", "0s")
    assert not any("max_stream_duration" in a for a in (stream, unary, action))
    assert INBOUND_ROUTE == {
        "timeout": "0s",
        "max_stream_duration": {"max_stream_duration": "0s", "grpc_timeout_header_max": "0s"},
    }


def test_triton_routes_per_port(overlays: dict[str, Manifests]) -> None:
    vs = overlays["dev"].virtual_service_for(TRITON_V1)
    grpc = routes(vs, port=8001)
    assert [r["name"] for r in grpc] == ["stream-infer", "grpc"]
    assert grpc[0]["match"] == {"path": "/inference.GRPCInferenceService/ModelStreamInfer"}
    assert grpc[0]["route"]["timeout"] == "660s"
    assert "retry_policy" not in grpc[0]["route"]  # attempts: 0
    assert grpc[1]["route"]["cluster"] == cluster_name(TRITON_V1, 8001)
    metrics = routes(vs, port=8002)
    assert [r["name"] for r in metrics] == ["metrics"]
    assert metrics[0]["route"]["cluster"] == cluster_name(TRITON_V1, 8002)


def test_an_untranslated_field_is_an_error(overlays: dict[str, Manifests]) -> None:
    vs = copy.deepcopy(overlays["dev"].virtual_service("llmmesh-gateway"))
    vs["spec"]["http"][0]["fault"] = {"abort": {"httpStatus": 503}}
    with pytest.raises(Unsupported, match="fault"):
        routes(vs)


def _pods() -> list[Pod]:
    return [
        Pod(
            "gateway-v1-0",
            GATEWAY,
            "llmmesh-gateway",
            {"version": "v1"},
            {50051: 1, 8080: 2},
            {50051: 11, 8080: 12},
        ),
        Pod(
            "gateway-v2-0",
            GATEWAY,
            "llmmesh-gateway",
            {"version": "v2"},
            {50051: 3, 8080: 4},
            {50051: 13, 8080: 14},
        ),
        Pod(
            "gateway-shadow",
            SHADOW,
            "llmmesh-gateway",
            {"version": "v2"},
            {50051: 5, 8080: 6},
            {50051: 15, 8080: 16},
        ),
    ]


def _validate(config: Doc, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    proc = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bootstraps_envoy_accepts(overlays: dict[str, Manifests], tmp_path: Path) -> None:
    m = overlays["dev"]
    ca = LocalCA(tmp_path / "certs", NOW)
    pods = _pods()
    cfg = ingress(m, "llmmesh-gateway", 10000, pods, ca)
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    v1 = clusters[cluster_name(GATEWAY, 50051, "v1")]
    endpoints = v1["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints] == [11]
    tls = v1["transport_socket"]["typed_config"]
    assert tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": spiffe_id("llmmesh", "llmmesh-gateway")}}
    ]
    assert tls["common_tls_context"]["alpn_protocols"] == ["h2"]
    shadow = clusters[cluster_name(SHADOW, 8080)]
    assert shadow["circuit_breakers"]["thresholds"][0]["max_requests"] == 256
    _validate(cfg, tmp_path, "ingress")

    listeners, inbound = sidecar_inbound(m, pods[0], ca)
    downstream = listeners[0]["filter_chains"][0]["transport_socket"]["typed_config"]
    assert downstream["require_client_certificate"] is True
    # The server side takes the Service's DestinationRule connection pool, as pilot does.
    (thresholds,) = inbound[0]["circuit_breakers"]["thresholds"]
    assert (thresholds["max_requests"], thresholds["max_connections"]) == (8192, 4096)
    assert "outlier_detection" not in inbound[0]
    _validate(bootstrap("gw", listeners, inbound), tmp_path, "sidecar")

    triton = Pod(
        "replica-0", TRITON_V1, "llmmesh-triton", {}, {8001: 1, 8002: 2}, {8001: 21, 8002: 22}
    )
    me = ca.identity("llmmesh", "llmmesh-gateway")
    out_listeners, out_clusters = outbound_pinned(
        m, [Pinned(triton, 8001, 31), Pinned(triton, 8002, 32)], me, ca.root_cert
    )
    vhost = out_listeners[0]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
        "virtual_hosts"
    ][0]
    assert vhost["domains"] == [TRITON_V1, f"{TRITON_V1}:8001"]
    for c in out_clusters:
        peer = c["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
        assert peer["match_typed_subject_alt_names"][0]["matcher"]["exact"].endswith(
            "/sa/llmmesh-triton"
        )
    _validate(bootstrap("out", out_listeners, out_clusters), tmp_path, "outbound")
