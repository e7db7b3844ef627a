"""Every meshcheck rule passes on both overlays (the manifests agree with each other, with the
services' settings, with protos/ and with docs/conventions.md), the authorization policies allow
exactly the call graph, and the rules notice broken documents."""

from __future__ import annotations

import json

import pytest

from llmmesh.common.components import COMPONENTS
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2 as kv_pb
from llmmesh.tools.meshcheck.common import OVERLAYS, Doc
from llmmesh.tools.meshcheck.index import principal
from llmmesh.tools.meshcheck.project import (
    ComponentSettings,
    component_settings,
    conventions_ports,
    proto_methods,
)
from llmmesh.tools.meshcheck.rules import RULES, ports, routing, security, workloads
from llmmesh.tools.meshcheck.runner import apply_rules
from tests.mesh.helpers import doc, mesh_of


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("rule", sorted(RULES))
def test_rule(rule: str, overlay: str, rendered: dict[str, list[Doc]]) -> None:
    problems = RULES[rule](mesh_of(rendered, overlay))
    assert not problems, f"{overlay}:\n" + "\n".join(problems)


def test_a_rule_that_cannot_evaluate_is_a_finding(
    rendered: dict[str, list[Doc]], settings: dict[str, ComponentSettings]
) -> None:
    mesh = mesh_of(rendered, "prod")
    mesh.docs = [d for d in mesh.docs if d["metadata"]["name"] != "llmmesh-orchestrator"]
    problems = apply_rules("prod", mesh, settings)
    capacity = [p for p in problems if p.check == "capacity"]
    assert capacity, problems
    assert "cannot evaluate this overlay: MissingObject: Deployment llmmesh-orchestrator" in str(
        capacity[0]
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_env_var_is_a_settings_field(
    overlay: str, rendered: dict[str, list[Doc]], settings: dict[str, ComponentSettings]
) -> None:
    missing = [c.settings_class for c in COMPONENTS if settings[c.name].fields is None]
    problems = ports.check_settings_fields(mesh_of(rendered, overlay), settings)
    assert not problems, "\n".join(problems)
    if missing:
        pytest.skip(f"settings classes not importable, env vars unchecked: {missing}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_match_the_services_settings(
    overlay: str, rendered: dict[str, list[Doc]], settings: dict[str, ComponentSettings]
) -> None:
    sources = {c.name: component_settings(c)[1] for c in COMPONENTS}
    print("ports compared with:", sources)  # shown with -rP; tells settings class vs conventions.md
    problems = ports.check_ports(mesh_of(rendered, overlay), settings)
    assert not problems, "\n".join(problems)


def test_conventions_and_protos_are_parsed() -> None:
    methods = proto_methods()
    assert "/llmmesh.orchestrator.v1.OrchestratorService/Admit" in methods
    assert methods["/llmmesh.gateway.v1.GatewayService/Generate"].server_streaming
    assert not methods["/llmmesh.kvregistry.v1.KvRegistryService/Lookup"].server_streaming
    documented = conventions_ports()
    assert documented["gateway"] == {"grpc": 50051, "http": 8080, "metrics": 9101}
    for comp in COMPONENTS:
        facts, _source = component_settings(comp)
        assert {"grpc", "metrics"} <= set(facts.ports), comp
        # The settings' defaults are the documented ports (when the class imports).
        assert facts.ports == documented[comp.name], comp


# --- the call graph of docs/conventions.md is allowed, and nothing around it -----------------

GATEWAY = principal("llmmesh-gateway")
ORCHESTRATOR = principal("llmmesh-orchestrator")
AUTOSCALER = principal("llmmesh-autoscaler")
TRITON = principal("llmmesh-triton")
KV_REGISTRY = principal("llmmesh-kv-registry")
INGRESS = "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
PROMETHEUS = "cluster.local/ns/monitoring/sa/prometheus"
KEDA = "cluster.local/ns/keda/sa/keda-operator"

GW_LABELS = {"app": "llmmesh-gateway", "app.kubernetes.io/component": "gateway", "version": "v1"}
SHADOW_LABELS = {"app": "llmmesh-gateway-shadow", "app.kubernetes.io/component": "gateway"}
ORCH_LABELS = {"app": "llmmesh-orchestrator"}
KV_LABELS = {"app": "llmmesh-kv-registry"}
AS_LABELS = {"app": "llmmesh-autoscaler"}
TRITON_LABELS = {"app": "triton-llama3-8b", "app.kubernetes.io/component": "triton"}
GW = "/llmmesh.gateway.v1.GatewayService/"
ORCH = "/llmmesh.orchestrator.v1.OrchestratorService/"
KV = "/llmmesh.kvregistry.v1.KvRegistryService/"
TRI = "/inference.GRPCInferenceService/"
EXT = "/externalscaler.ExternalScaler/"

ALLOWED = [
    (INGRESS, GW_LABELS, 50051, GW + "Generate", "POST"),
    (INGRESS, GW_LABELS, 50051, GW + "ListModels", "POST"),
    (INGRESS, GW_LABELS, 8080, "/v1/chat/completions", "POST"),
    (INGRESS, SHADOW_LABELS, 50051, GW + "Generate", "POST"),
    (GATEWAY, ORCH_LABELS, 50052, ORCH + "Admit", "POST"),
    (GATEWAY, ORCH_LABELS, 50052, ORCH + "AdmitStream", "POST"),
    (GATEWAY, ORCH_LABELS, 50052, ORCH + "Complete", "POST"),
    (GATEWAY, ORCH_LABELS, 50052, ORCH + "CompleteBatch", "POST"),
    # readiness, and the replica view the gateway's degraded mode routes over
    (GATEWAY, ORCH_LABELS, 50052, ORCH + "ListReplicas", "POST"),
    (GATEWAY, TRITON_LABELS, 8001, TRI + "ModelStreamInfer", "POST"),
    (ORCHESTRATOR, TRITON_LABELS, 8001, TRI + "ModelReady", "POST"),
    (ORCHESTRATOR, TRITON_LABELS, 8002, "/metrics", "GET"),
    (ORCHESTRATOR, KV_LABELS, 50053, KV + "Lookup", "POST"),
    (ORCHESTRATOR, KV_LABELS, 50053, KV + "LookupStream", "POST"),
    (ORCHESTRATOR, KV_LABELS, 50053, KV + "WatchExact", "POST"),
    (ORCHESTRATOR, KV_LABELS, 50053, KV + "UpdateBatch", "POST"),
    (ORCHESTRATOR, KV_LABELS, 50053, KV + "RecordRouting", "POST"),
    (ORCHESTRATOR, KV_LABELS, 50053, KV + "ReportReuse", "POST"),
    (ORCHESTRATOR, KV_LABELS, 50053, KV + "DropReplica", "POST"),
    (TRITON, KV_LABELS, 50053, KV + "PublishEvents", "POST"),
    (AUTOSCALER, ORCH_LABELS, 50052, ORCH + "ListReplicas", "POST"),
    (AUTOSCALER, TRITON_LABELS, 8002, "/metrics", "GET"),
    (AUTOSCALER, ORCH_LABELS, 9102, "/metrics", "GET"),
    (KEDA, AS_LABELS, 50054, EXT + "GetMetrics", "POST"),
    (PROMETHEUS, GW_LABELS, 9101, "/metrics", "GET"),
    (PROMETHEUS, ORCH_LABELS, 9102, "/metrics", "GET"),
    (PROMETHEUS, KV_LABELS, 9103, "/metrics", "GET"),
    (PROMETHEUS, AS_LABELS, 9104, "/metrics", "GET"),
    (PROMETHEUS, TRITON_LABELS, 8002, "/metrics", "GET"),
]
DENIED = [
    (INGRESS, ORCH_LABELS, 50052, ORCH + "Admit", "POST"),  # clients never reach the control plane
    (INGRESS, TRITON_LABELS, 8001, TRI + "ModelStreamInfer", "POST"),
    (GATEWAY, KV_LABELS, 50053, KV + "Lookup", "POST"),
    (GATEWAY, ORCH_LABELS, 50052, ORCH + "DrainReplica", "POST"),
    (GATEWAY, TRITON_LABELS, 8001, TRI + "ModelInfer", "POST"),  # only the streaming entry point
    (TRITON, ORCH_LABELS, 50052, ORCH + "Admit", "POST"),
    (TRITON, KV_LABELS, 50053, KV + "Lookup", "POST"),
    (TRITON, KV_LABELS, 50053, KV + "RecordRouting", "POST"),  # engines only publish events
    (AUTOSCALER, KV_LABELS, 50053, KV + "Lookup", "POST"),
    (AUTOSCALER, ORCH_LABELS, 50052, ORCH + "Admit", "POST"),
    (KV_REGISTRY, ORCH_LABELS, 50052, ORCH + "Admit", "POST"),
    (ORCHESTRATOR, TRITON_LABELS, 8001, TRI + "ModelStreamInfer", "POST"),
    (PROMETHEUS, GW_LABELS, 50051, GW + "Generate", "POST"),
    (PROMETHEUS, GW_LABELS, 9101, "/debug", "GET"),
    (KEDA, ORCH_LABELS, 50052, ORCH + "ListReplicas", "POST"),
    ("cluster.local/ns/other/sa/default", GW_LABELS, 50051, GW + "Generate", "POST"),
]


@pytest.mark.parametrize(("source", "labels", "port", "path", "method"), ALLOWED)
def test_call_graph_edge_is_allowed(
    source: str,
    labels: dict[str, str],
    port: int,
    path: str,
    method: str,
    rendered: dict[str, list[Doc]],
) -> None:
    assert security.authz_allows(mesh_of(rendered, "prod"), source, labels, port, path, method)


@pytest.mark.parametrize(
    "rpc",
    [m.name for m in kv_pb.DESCRIPTOR.services_by_name["KvRegistryService"].methods],
)
def test_the_orchestrator_may_call_every_registry_rpc_but_publishing(
    rpc: str, rendered: dict[str, list[Doc]]
) -> None:
    """From the proto, so a new registry RPC the orchestrator calls cannot be forgotten in the
    policy (it would be denied in production only)."""
    allowed = security.authz_allows(
        mesh_of(rendered, "prod"), ORCHESTRATOR, KV_LABELS, 50053, KV + rpc, "POST"
    )
    assert allowed == (rpc != "PublishEvents")


@pytest.mark.parametrize(("source", "labels", "port", "path", "method"), DENIED)
def test_everything_else_is_denied(
    source: str,
    labels: dict[str, str],
    port: int,
    path: str,
    method: str,
    rendered: dict[str, list[Doc]],
) -> None:
    assert not security.authz_allows(mesh_of(rendered, "prod"), source, labels, port, path, method)


# --- the rules notice broken documents -----------------------------------------------------------


def test_weights_not_summing_to_100_are_caught(rendered: dict[str, list[Doc]]) -> None:
    mesh = mesh_of(rendered, "prod")
    doc(mesh, "VirtualService", "llmmesh-gateway")["spec"]["http"][1]["route"][1]["weight"] = 5
    problems = routing.check_canary(mesh)
    assert any("sum to 105" in p for p in problems), problems
    assert any("disagree on the canary split" in p for p in problems), problems


def test_subset_selecting_no_pod_is_caught(rendered: dict[str, list[Doc]]) -> None:
    mesh = mesh_of(rendered, "prod")
    doc(mesh, "DestinationRule", "llmmesh-gateway")["spec"]["subsets"][1]["labels"] = {
        "version": "v3"
    }
    assert any("subset v2" in p for p in routing.check_subsets(mesh))


def test_host_without_service_is_caught(rendered: dict[str, list[Doc]]) -> None:
    mesh = mesh_of(rendered, "prod")
    doc(mesh, "DestinationRule", "llmmesh-autoscaler")["spec"]["host"] = (
        "autoscaler.llmmesh.svc.cluster.local"
    )
    assert any("names no Service" in p for p in routing.check_hosts(mesh))


def test_unknown_principal_and_method_are_caught(rendered: dict[str, list[Doc]]) -> None:
    mesh = mesh_of(rendered, "prod")
    pol = doc(mesh, "AuthorizationPolicy", "allow-orchestrator")
    pol["spec"]["rules"][0]["from"][0]["source"]["principals"] = [principal("llmmesh-gatewya")]
    pol["spec"]["rules"][0]["to"][0]["operation"]["paths"].append(ORCH + "Admitt")
    problems = security.check_authorization(mesh)
    assert any("names no ServiceAccount" in p for p in problems), problems
    assert any("Admitt is not in protos/" in p for p in problems), problems


def test_missing_outlier_detection_is_caught(rendered: dict[str, list[Doc]]) -> None:
    mesh = mesh_of(rendered, "prod")
    del doc(mesh, "DestinationRule", "llmmesh-kv-registry")["spec"]["trafficPolicy"][
        "outlierDetection"
    ]
    assert any("outlierDetection" in p for p in security.check_destination_rules(mesh))


def test_permissive_mtls_is_caught(rendered: dict[str, list[Doc]]) -> None:
    mesh = mesh_of(rendered, "prod")
    doc(mesh, "PeerAuthentication", "default")["spec"]["mtls"]["mode"] = "PERMISSIVE"
    assert security.check_mtls(mesh)


@pytest.mark.parametrize("mode", ["ISTIO_MUTUAL", None])
def test_the_autoscalers_prometheus_needs_plain_text(
    rendered: dict[str, list[Doc]], mode: str | None
) -> None:
    mesh = mesh_of(rendered, "prod")
    dr = doc(mesh, "DestinationRule", "prometheus-plaintext")
    if mode is None:
        del dr["spec"]["exportTo"]  # leaking the plain-text rule to every namespace
    else:
        dr["spec"]["trafficPolicy"]["tls"]["mode"] = mode
    problems = "\n".join(security.check_destination_rules(mesh))
    assert "prometheus-operated.monitoring.svc.cluster.local (the autoscaler's Prometheus)" in (
        problems
    )


def test_port_drift_is_caught(
    rendered: dict[str, list[Doc]], settings: dict[str, ComponentSettings]
) -> None:
    mesh = mesh_of(rendered, "prod")
    cm = mesh.configmap_by_prefix("llmmesh-orchestrator-env")
    assert cm is not None
    cm["data"]["LLMMESH_ORCHESTRATOR_GRPC_PORT"] = "50099"
    problems = ports.check_ports(mesh, settings)
    assert any("LLMMESH_ORCHESTRATOR_GRPC_PORT=50099" in p for p in problems), problems


def test_retrying_a_stream_on_unavailable_is_caught(rendered: dict[str, list[Doc]]) -> None:
    mesh = mesh_of(rendered, "prod")
    vs = doc(mesh, "VirtualService", "llmmesh-gateway")
    vs["spec"]["http"][1]["retries"]["retryOn"] = "connect-failure,unavailable"
    problems = routing.check_retries_and_timeouts(mesh)
    assert any("only be retried before it started" in p for p in problems), problems


def test_a_session_stream_needs_a_route_without_timeout_and_nothing_else_does(
    rendered: dict[str, list[Doc]],
) -> None:
    mesh = mesh_of(rendered, "prod")
    routes = {
        r["name"]: r for r in doc(mesh, "VirtualService", "llmmesh-kv-registry")["spec"]["http"]
    }
    assert "timeout" not in routes["lookup-stream"]
    assert routing.check_retries_and_timeouts(mesh) == []
    routes["lookup-stream"]["timeout"] = "2s"
    del routes["lookup"]["timeout"]
    problems = routing.check_retries_and_timeouts(mesh)
    assert any("lookup-stream: a route timeout would cut" in p for p in problems), problems
    assert any("lookup: needs an explicit timeout" in p for p in problems), problems
    # A route mixing a session stream with other methods needs a timeout and cannot have one.
    routes["lookup-stream"]["match"].append(routes["lookup"]["match"][0])
    del routes["lookup-stream"]["timeout"]
    problems = routing.check_retries_and_timeouts(mesh)
    assert any("lookup-stream: needs an explicit timeout" in p for p in problems), problems


def test_envoy_limit_below_admission_capacity_is_caught(rendered: dict[str, list[Doc]]) -> None:
    mesh = mesh_of(rendered, "prod")
    dr = doc(mesh, "DestinationRule", "triton-llama3-8b-v1-short")
    dr["spec"]["trafficPolicy"]["connectionPool"]["http"]["http2MaxRequests"] = 100
    assert any("http2MaxRequests 100" in p for p in workloads.check_capacity(mesh))


def test_a_singleton_kv_registry_is_caught(rendered: dict[str, list[Doc]]) -> None:
    mesh = mesh_of(rendered, "prod")
    doc(mesh, "Deployment", "llmmesh-kv-registry")["spec"]["replicas"] = 1
    doc(mesh, "Deployment", "llmmesh-kv-registry")["spec"]["template"]["spec"].pop("affinity")
    doc(mesh, "PodDisruptionBudget", "llmmesh-kv-registry")["spec"] = {
        "maxUnavailable": 1,
        "selector": {"matchLabels": {"app": "llmmesh-kv-registry"}},
    }
    del doc(mesh, "Service", "llmmesh-kv-registry")["spec"]["clusterIP"]
    problems = "\n".join(workloads.check_kv_registry_replicas(mesh))
    for needle in ("replicas >= 2", "anti-affinity", "at least one", "headless"):
        assert needle in problems, problems


def test_an_engine_publishing_to_one_registry_address_is_caught(
    rendered: dict[str, list[Doc]],
) -> None:
    mesh = mesh_of(rendered, "prod")
    dep = doc(mesh, "Deployment", "triton-llama3-8b-v1-short")
    env = mesh.main_container(dep)["env"]
    for e in env:
        if e["name"] == "LLMMESH_EMULATOR_KV_REGISTRY_DNS":
            e["name"] = "LLMMESH_EMULATOR_KV_REGISTRY_ADDRESS"
    problems = "\n".join(workloads.check_kv_registry_replicas(mesh))
    assert "triton-llama3-8b-v1-short: LLMMESH_EMULATOR_KV_REGISTRY_DNS must be" in problems
    assert "KV_REGISTRY_ADDRESS names registries past DNS" in problems


def test_a_singleton_orchestrator_is_caught(rendered: dict[str, list[Doc]]) -> None:
    mesh = mesh_of(rendered, "prod")
    doc(mesh, "Deployment", "llmmesh-orchestrator")["spec"]["replicas"] = 1
    doc(mesh, "Deployment", "llmmesh-orchestrator")["spec"]["template"]["spec"].pop("affinity")
    doc(mesh, "PodDisruptionBudget", "llmmesh-orchestrator")["spec"] = {
        "maxUnavailable": 1,
        "selector": {"matchLabels": {"app": "llmmesh-orchestrator"}},
    }
    del doc(mesh, "Service", "llmmesh-orchestrator")["spec"]["clusterIP"]
    problems = "\n".join(workloads.check_orchestrator_replicas(mesh))
    for needle in ("replicas >= 2", "anti-affinity", "at least one", "headless"):
        assert needle in problems, problems


def test_a_gateway_model_without_its_end_token_is_caught(rendered: dict[str, list[Doc]]) -> None:
    mesh = mesh_of(rendered, "prod")
    for cm in mesh.in_namespace("ConfigMap"):
        data = cm.get("data") or {}
        if "LLMMESH_GATEWAY_MODELS" in data:
            models = json.loads(data["LLMMESH_GATEWAY_MODELS"])
            for model in models:
                model.pop("eos_token", None)
                model.pop("end_id", None)
            data["LLMMESH_GATEWAY_MODELS"] = json.dumps(models)
    problems = "\n".join(workloads.check_gateway_models(mesh))
    assert "llmmesh-gateway-v1 (apps/v1): model 'llama3-8b' must set end_id or eos_token" in (
        problems
    )


def test_a_gateway_that_knows_one_orchestrator_address_is_caught(
    rendered: dict[str, list[Doc]],
) -> None:
    mesh = mesh_of(rendered, "prod")
    dep = doc(mesh, "Deployment", "llmmesh-gateway-v1")
    cm_env = mesh.container_env(dep, mesh.main_container(dep))
    assert "LLMMESH_GATEWAY_ORCHESTRATOR_DNS" in cm_env
    for cm in mesh.in_namespace("ConfigMap"):
        data = cm.get("data") or {}
        if "LLMMESH_GATEWAY_ORCHESTRATOR_DNS" in data:
            del data["LLMMESH_GATEWAY_ORCHESTRATOR_DNS"]
    problems = "\n".join(workloads.check_orchestrator_replicas(mesh))
    assert "llmmesh-gateway-v1 (apps/v1): LLMMESH_GATEWAY_ORCHESTRATOR_DNS must be" in problems


@pytest.mark.parametrize(
    ("field", "value"),
    [("periodSeconds", 7), ("timeoutSeconds", 2), ("failureThreshold", 1), ("timeout", 3)],
)
def test_a_triton_liveness_probe_other_than_the_local_meshs_is_caught(
    rendered: dict[str, list[Doc]], field: str, value: int
) -> None:
    """The pool's livenessProbe and the local mesh's (llmmesh.triton.launcher.TRITON_LIVENESS)
    are one probe: a drift of either is a finding."""
    mesh = mesh_of(rendered, "prod")
    dep = doc(mesh, "Deployment", "triton-llama3-8b-v1-short")
    live = mesh.main_container(dep)["livenessProbe"]
    if field == "timeout":  # the request's own timeout inside the exec probe (its argument)
        live["exec"]["command"][3] = str(value)
    else:
        live[field] = value
    problems = "\n".join(workloads.check_workloads(mesh))
    want = (
        "must run a request through the model" if field == "timeout" else "must be llmmesh.triton"
    )

    assert f"triton-llama3-8b-v1-short (apps/v1): livenessProbe {want}" in problems
