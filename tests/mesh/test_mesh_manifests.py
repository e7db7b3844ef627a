"""Every rendered document of mesh/ validates against the real schemas (Kubernetes 1.32 JSON
schemas and Istio 1.30.3 CRDs from ../shared/schemas), and the validator reports a bad field with
its document and JSON path."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from llmmesh.tools.meshcheck import render as render_module
from llmmesh.tools.meshcheck.common import (
    OVERLAYS,
    TARGETS,
    Doc,
    Finding,
    MeshSetupError,
    RenderError,
)
from llmmesh.tools.meshcheck.render import render, shared_dir
from llmmesh.tools.meshcheck.rules.security import check_namespaces
from llmmesh.tools.meshcheck.schemas import SchemaValidator, validate_all
from tests.mesh.helpers import doc, mesh_of

SHARED_SCHEMA_KINDS = {
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "ConfigMap",
    "ServiceAccount",
    "PodDisruptionBudget",
}
ISTIO_KINDS = {
    "PeerAuthentication",
    "AuthorizationPolicy",
    "DestinationRule",
    "VirtualService",
    "Gateway",
    "Telemetry",
}


def _find(docs: list[Doc], kind: str, name: str) -> Doc:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return copy.deepcopy(d)
    raise AssertionError(f"{kind}/{name} not rendered")


@pytest.mark.parametrize("target", TARGETS)
def test_every_document_validates(
    target: str, rendered: dict[str, list[Doc]], validator: SchemaValidator
) -> None:
    docs = rendered[target]
    assert docs, f"{target} rendered no documents"
    findings = validate_all(validator, docs)
    assert not findings, "schema violations:\n" + "\n".join(map(str, findings))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kinds_use_the_shared_schemas(
    overlay: str, rendered: dict[str, list[Doc]], validator: SchemaValidator
) -> None:
    kinds = {d["kind"] for d in rendered[overlay]}
    assert kinds >= SHARED_SCHEMA_KINDS | ISTIO_KINDS
    for d in rendered[overlay]:
        source = validator.source_for(d)
        assert source is not None
        if d["kind"] in SHARED_SCHEMA_KINDS:
            assert source.startswith("shared/schemas/kubernetes/"), (d["kind"], source)
        if d["kind"] in ISTIO_KINDS:
            assert source.startswith("crd-all.gen.istio-1.30.3.yaml"), (d["kind"], source)
            assert d["apiVersion"].endswith("/v1"), f"{d['kind']}: use the v1 API"


def test_object_outside_the_namespaces_is_caught(rendered: dict[str, list[Doc]]) -> None:
    mesh = mesh_of(rendered, "prod")
    doc(mesh, "ConfigMap", "llmmesh-grafana-dashboards")["metadata"]["namespace"] = "default"
    [problem] = check_namespaces(mesh)
    assert problem.startswith(
        "ConfigMap default/llmmesh-grafana-dashboards (v1): namespace default"
    )


# --- the validator reports the document and the path -------------------------------------------


def _only(findings: list[Finding], path: str) -> Finding:
    hits = [f for f in findings if f.path == path]
    assert hits, f"no finding at {path}; got {[str(f) for f in findings]}"
    return hits[0]


def test_unknown_destination_rule_field_is_reported(
    rendered: dict[str, list[Doc]], validator: SchemaValidator
) -> None:
    dr = _find(rendered["prod"], "DestinationRule", "llmmesh-orchestrator")
    dr["spec"]["trafficPolicy"]["connectionPool"]["tcp"]["maxConnection"] = 10  # typo
    finding = _only(validator.validate(dr), "$.spec.trafficPolicy.connectionPool.tcp.maxConnection")
    assert (
        finding.document == "DestinationRule llmmesh/llmmesh-orchestrator (networking.istio.io/v1)"
    )
    assert "unknown field 'maxConnection'" in finding.message


def test_wrong_type_in_destination_rule_is_reported(
    rendered: dict[str, list[Doc]], validator: SchemaValidator
) -> None:
    dr = _find(rendered["prod"], "DestinationRule", "llmmesh-gateway")
    dr["spec"]["trafficPolicy"]["connectionPool"]["http"]["http2MaxRequests"] = "many"
    finding = _only(
        validator.validate(dr), "$.spec.trafficPolicy.connectionPool.http.http2MaxRequests"
    )
    assert "is not of type 'integer'" in finding.message


def test_bad_port_type_in_deployment_is_reported(
    rendered: dict[str, list[Doc]], validator: SchemaValidator
) -> None:
    dep = _find(rendered["prod"], "Deployment", "triton-llama3-8b-v1-short")
    dep["spec"]["template"]["spec"]["containers"][0]["ports"][1]["containerPort"] = "8001"
    finding = _only(
        validator.validate(dep), "$.spec.template.spec.containers[0].ports[1].containerPort"
    )
    assert finding.document == "Deployment llmmesh/triton-llama3-8b-v1-short (apps/v1)"
    assert "'8001' is not of type 'integer'" in finding.message


def test_unknown_deployment_field_is_reported(
    rendered: dict[str, list[Doc]], validator: SchemaValidator
) -> None:
    dep = _find(rendered["prod"], "Deployment", "llmmesh-gateway-v1")
    dep["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFs"] = True
    _only(
        validator.validate(dep),
        "$.spec.template.spec.containers[0].securityContext.readOnlyRootFs",
    )


def test_istio_cel_duration_rule_is_evaluated(
    rendered: dict[str, list[Doc]], validator: SchemaValidator
) -> None:
    vs = _find(rendered["prod"], "VirtualService", "llmmesh-gateway")
    vs["spec"]["http"][1]["timeout"] = "0s"  # "disable" is not a valid Istio duration (>= 1ms)
    finding = _only(validator.validate(vs), "$.spec.http[1].timeout")
    assert "duration" in finding.message


def test_istio_oneof_violation_points_at_the_field(
    rendered: dict[str, list[Doc]], validator: SchemaValidator
) -> None:
    vs = _find(rendered["prod"], "VirtualService", "llmmesh-gateway")
    vs["spec"]["http"][1]["match"][0]["uri"] = {"exact": "/a", "prefix": "/b"}
    _only(validator.validate(vs), "$.spec.http[1].match[0].uri")


def test_kinds_without_shared_schema_are_still_checked(
    rendered: dict[str, list[Doc]], validator: SchemaValidator
) -> None:
    so = _find(rendered["prod"], "ScaledObject", "triton-llama3-8b-v1-short")
    so["spec"]["maxReplicas"] = 3  # KEDA calls it maxReplicaCount
    so["spec"]["triggers"][0]["metadata"]["pool"] = 1
    findings = validator.validate(so)
    _only(findings, "$.spec.maxReplicas")
    _only(findings, "$.spec.triggers[0].metadata.pool")
    rule = _find(rendered["prod"], "PrometheusRule", "llmmesh")
    del rule["spec"]["groups"][1]["rules"][0]["expr"]
    _only(validator.validate(rule), "$.spec.groups[1].rules[0]")


def test_unknown_kind_is_reported(validator: SchemaValidator) -> None:
    doc = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    [finding] = validator.validate(doc)
    assert finding.path == "$"
    assert "no schema" in finding.message


def test_render_failure_names_the_problem(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    with pytest.raises(RenderError, match=r"(?s)kubectl kustomize .*missing\.yaml"):
        render(tmp_path)


def test_missing_kubectl_fails_clearly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LLMMESH_KUBECTL", raising=False)
    monkeypatch.setattr("shutil.which", lambda _name: None)
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))
    with pytest.raises(MeshSetupError, match="kubectl not found"):
        render_module.kubectl()


def test_missing_shared_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(MeshSetupError, match="schemas not found"):
        shared_dir(tmp_path)


@pytest.mark.parametrize("target", ["base", "prod"])
def test_every_long_pool_survives_a_node_drain(rendered: dict[str, list[Doc]], target: str) -> None:
    """A long pool's PDB lets a drain evict one replica and no other pool of its version takes
    the long prompts: KEDA keeps two at least, also while the scaler fails (its fallback). The
    dev overlay runs one GPU per pool on purpose."""
    mesh = mesh_of(rendered, target)
    long_pools = []
    for so in mesh.in_namespace("ScaledObject"):
        dep = doc(mesh, "Deployment", so["spec"]["scaleTargetRef"]["name"])
        if dep["spec"]["template"]["metadata"]["labels"].get("llmmesh.io/pool") != "long":
            continue
        long_pools.append(so["metadata"]["name"])
        assert so["spec"]["minReplicaCount"] >= 2, so["metadata"]["name"]
        assert so["spec"]["fallback"]["replicas"] >= 2, so["metadata"]["name"]
    assert len(long_pools) >= 2  # v1 and v2
