"""Grafana dashboards, Prometheus scrape jobs and alert rules (meshcheck's observability rules,
run on the real overlays by test_mesh_consistency.test_rule): the panels the README promises exist,
and the rules notice broken dashboards, unknown metrics, unexported Envoy stats, scrape drift and
incomplete alerts."""

from __future__ import annotations

import json
import re

import pytest

from llmmesh.common import metric_names
from llmmesh.common.errors import ServiceError, Unauthenticated
from llmmesh.tools.meshcheck.common import Doc
from llmmesh.tools.meshcheck.index import Mesh
from llmmesh.tools.meshcheck.rules import observability as obs
from services.gateway.errors import RateLimited
from services.gateway.metrics import CALLER_OUTCOMES, outcome_label
from services.orchestrator.errors import QueueFull
from tests.mesh.helpers import doc, mesh_of


def _edit_dashboard(mesh: Mesh, name: str) -> tuple[Doc, dict[str, object]]:
    """The dashboards ConfigMap and one parsed dashboard; write it back with _store."""
    cm = doc(mesh, "ConfigMap", obs.DASHBOARDS_CONFIGMAP)
    return cm, json.loads(cm["data"][name])


def _store(cm: Doc, name: str, dashboard: dict[str, object]) -> None:
    cm["data"][name] = json.dumps(dashboard)


@pytest.mark.parametrize("title", obs.OVERVIEW_PANELS)
def test_overview_has_panel(title: str, rendered: dict[str, list[Doc]]) -> None:
    dash = obs.dashboards(Mesh(rendered["prod"]))[obs.OVERVIEW]
    assert title in {p["title"] for p in obs.panels(dash)}


def test_known_metrics_are_the_metric_names_module(rendered: dict[str, list[Doc]]) -> None:
    mesh = mesh_of(rendered, "prod")
    alert = doc(mesh, "PrometheusRule", "llmmesh")["spec"]["groups"][1]["rules"][0]
    alert["expr"] = (
        f"{metric_names.KV_ENTRIES} > 0 and {metric_names.ORCH_PLUGIN_DURATION}_bucket > 0"
    )
    assert not obs.check_metrics(mesh)


def test_missing_panel_and_broken_dashboard_are_caught(rendered: dict[str, list[Doc]]) -> None:
    mesh = mesh_of(rendered, "prod")
    cm, dash = _edit_dashboard(mesh, obs.OVERVIEW)
    panels = dash["panels"]
    assert isinstance(panels, list)
    first = next(p for p in panels if p["type"] != "row" and p["title"] == "Queue depth")
    first["title"] = "Queue length"
    first["gridPos"]["x"] = 20
    first["gridPos"]["w"] = 8
    first["targets"][0]["expr"] += " * $undefined_var"
    _store(cm, obs.OVERVIEW, dash)
    problems = obs.check_dashboards(mesh)
    assert f"{obs.OVERVIEW}: no panel 'Queue depth'" in problems
    assert f"{obs.OVERVIEW}: Queue length overflows the grid" in problems
    assert f"{obs.OVERVIEW}: undefined variables ['undefined_var']" in problems


def test_replica_panel_not_filtered_by_replica_is_caught(rendered: dict[str, list[Doc]]) -> None:
    mesh = mesh_of(rendered, "prod")
    cm, dash = _edit_dashboard(mesh, obs.REPLICA)
    panels = dash["panels"]
    assert isinstance(panels, list)
    panel = next(p for p in panels if p["type"] != "row")
    panel["targets"][0]["expr"] = "sum(nv_gpu_utilization)"
    _store(cm, obs.REPLICA, dash)
    assert f"{obs.REPLICA}: {panel['title']}: not filtered by replica" in obs.check_dashboards(mesh)


def test_unknown_metric_and_unexported_envoy_stat_are_caught(
    rendered: dict[str, list[Doc]],
) -> None:
    mesh = mesh_of(rendered, "prod")
    rule = doc(mesh, "PrometheusRule", "llmmesh")
    alert = rule["spec"]["groups"][1]["rules"][0]
    alert["expr"] = "llmmesh_gateway_request_total > 0 or envoy_cluster_upstream_rq_timeout > 0"
    problems = obs.check_metrics(mesh)
    assert any("llmmesh_gateway_request_total is neither" in p for p in problems), problems
    assert any("envoy_cluster_upstream_rq_timeout: Istio drops" in p for p in problems), problems


def test_scrape_drift_is_caught(rendered: dict[str, list[Doc]]) -> None:
    mesh = mesh_of(rendered, "prod")
    policy = doc(mesh, "AuthorizationPolicy", "allow-prometheus-scrape")
    policy["spec"]["rules"][0]["to"][0]["operation"]["ports"].append("9999")
    problems = obs.check_scrape(mesh)
    assert any("allows ports" in p and "'9999'" in p for p in problems), problems


def test_incomplete_alert_is_caught(rendered: dict[str, list[Doc]]) -> None:
    mesh = mesh_of(rendered, "prod")
    rule = doc(mesh, "PrometheusRule", "llmmesh")
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    stuck = next(r for r in alerts if r["alert"] == "LlmmeshAutoscalerStuck")
    stuck["alert"] = "LlmmeshAutoscalerWedged"
    del stuck["for"]
    stuck["labels"]["severity"] = "critical"
    stuck["expr"] = 'up{job="llmmesh-typo"} == 0'
    problems = obs.check_alerts(mesh)
    assert "no alert LlmmeshAutoscalerStuck" in problems
    assert "alert LlmmeshAutoscalerWedged: needs a `for` duration" in problems
    assert any("LlmmeshAutoscalerWedged: severity" in p for p in problems), problems
    assert any("job llmmesh-typo is not a scrape job" in p for p in problems), problems


def test_the_slo_error_ratio_excludes_exactly_the_callers_outcomes(
    rendered: dict[str, list[Doc]],
) -> None:
    mesh = mesh_of(rendered, "prod")
    texts = [json.dumps(doc(mesh, "PrometheusRule", "llmmesh")["spec"])]
    texts += [json.dumps(d) for d in obs.dashboards(mesh).values()]
    found = [m for t in texts for m in re.findall(r'outcome!~\\*"([^"\\]+)', t)]
    assert found, "no SLO error ratio"
    assert set(found) == {"|".join(CALLER_OUTCOMES)}


@pytest.mark.parametrize(
    ("err", "label"),
    [
        (RateLimited("over", limit="requests"), "rate_limited"),
        (QueueFull("full", retry_after_s=1.0), "rejected"),
        (Unauthenticated("no key"), "unauthenticated"),
    ],
)
def test_a_tenant_over_its_limits_is_no_service_error(err: ServiceError, label: str) -> None:
    assert outcome_label(err) == label
    assert (label in CALLER_OUTCOMES) == (label != "rejected")
