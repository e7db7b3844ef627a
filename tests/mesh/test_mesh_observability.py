"""Grafana dashboards, Prometheus scrape jobs and alert rules: they parse, cover what the issue
asks for, and only use metrics that exist (docs/conventions.md, Triton, Istio/Envoy, KEDA,
kube-state-metrics) and labels that the scrape job produces."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from tests.mesh.meshcheck import MESH, Doc, Mesh, conventions_metrics

# Metrics from outside llmmesh that the dashboards and rules may use.
EXTERNAL_METRICS = {
    "istio_requests_total",
    "envoy_cluster_outlier_detection_ejections_active",
    "envoy_cluster_upstream_rq_pending_overflow",
    "envoy_cluster_upstream_cx_overflow",
    "envoy_cluster_upstream_rq_retry",
    "kube_deployment_status_replicas_ready",
    "kube_deployment_spec_replicas",
    "keda_scaler_errors_total",
    # Triton core GPU metrics (--allow-gpu-metrics) and the TRT-LLM backend's batcher metrics.
    "nv_gpu_utilization",
    "nv_gpu_memory_used_bytes",
    "nv_gpu_memory_total_bytes",
    "nv_trt_llm_inflight_batcher_metrics",
}
METRIC = re.compile(r"\b((?:llmmesh|nv|istio|envoy|kube|keda)_[a-z0-9_]+|llmmesh:[a-z0-9_:]+)")
SCRAPE = MESH / "observability" / "prometheus" / "scrape-configs.yaml"


def _dashboards(rendered: dict[str, list[Doc]]) -> dict[str, dict[str, Any]]:
    cm = Mesh(rendered["prod"]).get("ConfigMap", "llmmesh-grafana-dashboards")
    assert cm is not None, "ConfigMap llmmesh-grafana-dashboards is not rendered"
    assert cm["metadata"]["labels"].get("grafana_dashboard") == "1"
    return {name: json.loads(text) for name, text in cm["data"].items()}


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _exprs(rendered: dict[str, list[Doc]]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for name, dash in _dashboards(rendered).items():
        out.extend(
            (f"{name}: {p['title']}", t["expr"]) for p in _panels(dash) for t in p["targets"]
        )
    for group in _rules(rendered)["spec"]["groups"]:
        out.extend((f"rule {r.get('alert', r.get('record'))}", r["expr"]) for r in group["rules"])
    return out


def _rules(rendered: dict[str, list[Doc]]) -> Doc:
    rule = Mesh(rendered["prod"]).get("PrometheusRule", "llmmesh")
    assert rule is not None
    return rule


def _scrape() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(SCRAPE.read_text())
    return loaded


def _job(name: str) -> dict[str, Any]:
    jobs = {j["job_name"]: j for j in _scrape()["scrape_configs"]}
    assert name in jobs, f"no scrape job {name}"
    job: dict[str, Any] = jobs[name]
    return job


def test_dashboards_are_valid(rendered: dict[str, list[Doc]]) -> None:
    dashboards = _dashboards(rendered)
    assert set(dashboards) == {"llmmesh-overview.json", "llmmesh-replica.json"}
    uids = [d["uid"] for d in dashboards.values()]
    assert len(set(uids)) == len(uids)
    for name, dash in dashboards.items():
        ids = [p["id"] for p in dash["panels"]]
        assert len(set(ids)) == len(ids), f"{name}: duplicate panel ids"
        for panel in _panels(dash):
            assert panel["targets"], f"{name}: {panel['title']} has no query"
            assert panel["datasource"]["uid"] == "${datasource}"
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, f"{name}: {panel['title']} overflows the grid"
        variables = {v["name"] for v in dash["templating"]["list"]}
        used = set(re.findall(r"\$(\w+)", json.dumps(dash["panels"]))) - {"__rate_interval"}
        assert used <= variables, f"{name}: undefined variables {used - variables}"


@pytest.mark.parametrize(
    "title",
    [
        "Time to first token",
        "Inter-token latency",
        "Tokens/s",
        "Requests by outcome",
        "Queue depth",
        "KV cache use per pool",
        "Prefix hit rate",
        "Desired vs ready replicas",
        "Traffic share by model version (ingress)",
        "Error ratio by model version (SLO 0.5 %)",
        "Circuit breaker overflows",
        "Outlier ejections (active)",
        "Mirrored (shadow) requests by outcome",
    ],
)
def test_overview_has_panel(title: str, rendered: dict[str, list[Doc]]) -> None:
    titles = {p["title"] for p in _panels(_dashboards(rendered)["llmmesh-overview.json"])}
    assert title in titles


def test_replica_dashboard_drills_down_on_one_replica(rendered: dict[str, list[Doc]]) -> None:
    dash = _dashboards(rendered)["llmmesh-replica.json"]
    replica = next(v for v in dash["templating"]["list"] if v["name"] == "replica")
    assert replica["multi"] is False
    for panel in _panels(dash):
        for target in panel["targets"]:
            assert '"$replica"' in target["expr"], f"{panel['title']}: not filtered by replica"
    overview = _dashboards(rendered)["llmmesh-overview.json"]
    assert any("/d/llmmesh-replica/" in link["url"] for link in overview["links"])


def test_queries_use_existing_metrics(rendered: dict[str, list[Doc]]) -> None:
    known = set(conventions_metrics()) | EXTERNAL_METRICS
    records = {
        r["record"] for g in _rules(rendered)["spec"]["groups"] for r in g["rules"] if "record" in r
    }
    unknown: list[str] = []
    for where, expr in _exprs(rendered):
        for name in METRIC.findall(expr):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            if name not in known and base not in known and name not in records:
                unknown.append(f"{where}: {name}")
    assert not unknown, "metrics not in docs/conventions.md nor known externals:\n" + "\n".join(
        unknown
    )


def test_envoy_stats_used_are_exported_by_the_sidecars(rendered: dict[str, list[Doc]]) -> None:
    """Istio drops most Envoy cluster stats unless proxyStatsMatcher includes them."""
    mesh = Mesh(rendered["prod"])
    dep = mesh.get("Deployment", "llmmesh-gateway-v1")
    assert dep is not None
    proxy = yaml.safe_load(
        dep["spec"]["template"]["metadata"]["annotations"]["proxy.istio.io/config"]
    )
    patterns = [re.compile(p) for p in proxy["proxyStatsMatcher"]["inclusionRegexps"]]
    for _where, expr in _exprs(rendered):
        for name in METRIC.findall(expr):
            if name.startswith("envoy_cluster_"):
                stat = name.removeprefix("envoy_cluster_")
                assert any(p.fullmatch(stat) or p.search(stat) for p in patterns), name


def test_labels_used_are_produced_by_the_scrape_job(rendered: dict[str, list[Doc]]) -> None:
    targets = {r["target_label"] for r in _job("llmmesh")["relabel_configs"] if "target_label" in r}
    for label in ("model_version", "role", "pool", "replica", "pod", "pod_ip", "app", "service"):
        assert label in targets, label
    used: set[str] = set()
    for _where, expr in _exprs(rendered):
        used.update(re.findall(r"\b(model_version|role)\s*(?:=|!=|=~)", expr))
    assert used == {"model_version", "role"}


def test_scrape_jobs(rendered: dict[str, list[Doc]]) -> None:
    mesh = Mesh(rendered["prod"])
    job = _job("llmmesh")
    assert job["scheme"] == "https", (
        "STRICT mTLS: scrape over TLS with Prometheus' Istio certificate"
    )
    assert {"ca_file", "cert_file", "key_file"} <= set(job["tls_config"])
    keep = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    assert keep
    assert keep[0]["regex"] == "http-metrics"
    metrics_ports: set[str] = set()
    for svc in mesh.in_namespace("Service"):
        port = next((p for p in svc["spec"]["ports"] if p["name"] == "http-metrics"), None)
        assert port is not None, f"Service {svc['metadata']['name']} has no http-metrics port"
        metrics_ports.add(str(port["port"]))
    policy = mesh.get("AuthorizationPolicy", "allow-prometheus-scrape")
    assert policy is not None
    allowed = {p for r in policy["spec"]["rules"] for t in r["to"] for p in t["operation"]["ports"]}
    assert allowed == metrics_ports
    envoy = _job("envoy-stats")
    assert envoy["metrics_path"] == "/stats/prometheus"


def test_alert_rules_cover_the_issue(rendered: dict[str, list[Doc]]) -> None:
    alerts = {
        r["alert"]: r
        for g in _rules(rendered)["spec"]["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    for name in (
        "LlmmeshAvailabilityBudgetBurnFast",
        "LlmmeshAvailabilityBudgetBurnSlow",
        "LlmmeshTimeToFirstTokenBudgetBurnFast",
        "LlmmeshTimeToFirstTokenBudgetBurnSlow",
        "LlmmeshReplicaUnhealthy",
        "LlmmeshKvRegistryLagging",
        "LlmmeshKvRegistryResyncing",
        "LlmmeshAutoscalerStuck",
        "LlmmeshAutoscalerDown",
    ):
        assert name in alerts, name
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("page", "ticket", "warning"), name
        assert rule["annotations"].get("summary"), name
        assert "for" in rule, name
    jobs = {j["job_name"] for j in _scrape()["scrape_configs"]}
    for _where, expr in _exprs(rendered):
        for job in re.findall(r'job="([^"]+)"', expr):
            assert job in jobs, job
