"""Observability rules: the Grafana dashboards (ConfigMap llmmesh-grafana-dashboards), the
PrometheusRule llmmesh and the scrape jobs in observability/prometheus/scrape-configs.yaml parse,
cover the panels and alerts mesh/README.md promises, and only use metrics that exist
(llmmesh.common.metric_names, Triton, Istio/Envoy, KEDA, kube-state-metrics) with labels the scrape
job produces; tracing agrees between Istio's Telemetry and the services' own exporters."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from llmmesh.common.components import COMPONENTS
from llmmesh.tools.meshcheck.common import Doc, doc_id, require
from llmmesh.tools.meshcheck.index import Mesh
from llmmesh.tools.meshcheck.project import llmmesh_metrics
from llmmesh.tools.meshcheck.rules.helpers import (
    autoscaler_env,
    component_deployments,
    is_redis,
    istiod_values,
)

# Metrics from outside llmmesh that the dashboards and rules may use.
EXTERNAL_METRICS = frozenset(
    {
        "istio_requests_total",
        "envoy_cluster_outlier_detection_ejections_active",
        "envoy_cluster_upstream_rq_pending_overflow",
        "envoy_cluster_upstream_cx_overflow",
        "envoy_cluster_upstream_rq_retry",
        "kube_deployment_status_replicas_ready",
        "kube_deployment_spec_replicas",
        "keda_scaled_object_errors_total",
        # Triton core inference metrics (docs/conventions.md lists them with llmmesh's).
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_pending_request_count",
        "nv_inference_queue_duration_us",
        # Triton core GPU metrics (--allow-gpu-metrics) and the TRT-LLM backend's batcher metrics.
        "nv_gpu_utilization",
        "nv_gpu_memory_used_bytes",
        "nv_gpu_memory_total_bytes",
        "nv_trt_llm_inflight_batcher_metrics",
    }
)
METRIC = re.compile(r"\b((?:llmmesh|nv|istio|envoy|kube|keda)_[a-z0-9_]+|llmmesh:[a-z0-9_:]+)")
SCRAPE_CONFIGS = Path("observability") / "prometheus" / "scrape-configs.yaml"
DASHBOARDS_CONFIGMAP = "llmmesh-grafana-dashboards"
OVERVIEW = "llmmesh-overview.json"
REPLICA = "llmmesh-replica.json"
OVERVIEW_PANELS = (
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
)
REQUIRED_ALERTS = (
    "LlmmeshAvailabilityBudgetBurnFast",
    "LlmmeshAvailabilityBudgetBurnSlow",
    "LlmmeshTimeToFirstTokenBudgetBurnFast",
    "LlmmeshTimeToFirstTokenBudgetBurnSlow",
    "LlmmeshReplicaUnhealthy",
    "LlmmeshKvRegistryLagging",
    "LlmmeshKvRegistryResyncing",
    "LlmmeshAutoscalerStuck",
    "LlmmeshAutoscalerDown",
    "LlmmeshAutoscalerBlind",
    "LlmmeshUsageRecordsLost",
    "LlmmeshRateLimiterFallback",
)
SEVERITIES = ("page", "ticket", "warning")
# Labels the llmmesh scrape job must add, and the ones the canary panels and SLO rules split by.
SCRAPE_LABELS = ("model_version", "role", "pool", "replica", "pod", "pod_ip", "app", "service")
CANARY_LABELS = frozenset({"model_version", "role"})


def dashboards(mesh: Mesh) -> dict[str, dict[str, Any]]:
    """Dashboard file name -> parsed dashboard, from the rendered ConfigMap."""
    cm = require(mesh.get("ConfigMap", DASHBOARDS_CONFIGMAP), f"ConfigMap {DASHBOARDS_CONFIGMAP}")
    return {name: json.loads(text) for name, text in cm["data"].items()}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """The panels of a dashboard, rows left out."""
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def alert_rules(mesh: Mesh) -> Doc:
    return require(mesh.get("PrometheusRule", "llmmesh"), "PrometheusRule llmmesh")


def queries(mesh: Mesh) -> list[tuple[str, str]]:
    """(where, PromQL) for every dashboard target and every alerting and recording rule."""
    out: list[tuple[str, str]] = []
    for name, dash in dashboards(mesh).items():
        out.extend((f"{name}: {p['title']}", t["expr"]) for p in panels(dash) for t in p["targets"])
    for group in alert_rules(mesh)["spec"]["groups"]:
        out.extend((f"rule {r.get('alert', r.get('record'))}", r["expr"]) for r in group["rules"])
    return out


def scrape_jobs(mesh: Mesh) -> dict[str, dict[str, Any]]:
    loaded: dict[str, Any] = yaml.safe_load((mesh.root / SCRAPE_CONFIGS).read_text())
    return {j["job_name"]: j for j in loaded["scrape_configs"]}


def check_dashboards(mesh: Mesh) -> list[str]:
    """Dashboards parse, have unique ids, queries, the datasource variable, fit the grid and use
    only defined variables; the overview has the promised panels and links the replica drill-down,
    whose every query is filtered by one replica."""
    problems: list[str] = []
    cm = require(mesh.get("ConfigMap", DASHBOARDS_CONFIGMAP), f"ConfigMap {DASHBOARDS_CONFIGMAP}")
    if cm["metadata"].get("labels", {}).get("grafana_dashboard") != "1":
        problems.append(f"{doc_id(cm)}: needs the label grafana_dashboard=1 (Grafana's sidecar)")
    dashes = dashboards(mesh)
    if set(dashes) != {OVERVIEW, REPLICA}:
        problems.append(f"dashboards {sorted(dashes)} are not {sorted({OVERVIEW, REPLICA})}")
    uids = [d["uid"] for d in dashes.values()]
    if len(set(uids)) != len(uids):
        problems.append(f"dashboard uids repeat: {uids}")
    for name, dash in dashes.items():
        ids = [p["id"] for p in dash["panels"]]
        if len(set(ids)) != len(ids):
            problems.append(f"{name}: duplicate panel ids")
        for panel in panels(dash):
            if not panel["targets"]:
                problems.append(f"{name}: {panel['title']} has no query")
            if panel["datasource"]["uid"] != "${datasource}":
                problems.append(f"{name}: {panel['title']} must use the ${{datasource}} variable")
            grid = panel["gridPos"]
            if grid["x"] + grid["w"] > 24:
                problems.append(f"{name}: {panel['title']} overflows the grid")
        variables = {v["name"] for v in dash["templating"]["list"]}
        used = set(re.findall(r"\$(\w+)", json.dumps(dash["panels"]))) - {"__rate_interval"}
        if not used <= variables:
            problems.append(f"{name}: undefined variables {sorted(used - variables)}")
    if OVERVIEW in dashes:
        titles = {p["title"] for p in panels(dashes[OVERVIEW])}
        problems.extend(f"{OVERVIEW}: no panel {t!r}" for t in OVERVIEW_PANELS if t not in titles)
        if not any("/d/llmmesh-replica/" in link["url"] for link in dashes[OVERVIEW]["links"]):
            problems.append(f"{OVERVIEW}: no link to the replica dashboard")
    if REPLICA in dashes:
        variables = dashes[REPLICA]["templating"]["list"]
        replica = next((v for v in variables if v["name"] == "replica"), None)
        if replica is None or replica.get("multi") is not False:
            problems.append(f"{REPLICA}: variable replica must select exactly one replica")
        for panel in panels(dashes[REPLICA]):
            for target in panel["targets"]:
                if '"$replica"' not in target["expr"]:
                    problems.append(f"{REPLICA}: {panel['title']}: not filtered by replica")
    return problems


def check_metrics(mesh: Mesh) -> list[str]:
    """Queries name only metrics llmmesh produces (metric_names), known external ones or recording
    rules; the Envoy cluster stats they use are kept by the sidecars' proxyStatsMatcher."""
    problems: list[str] = []
    known = llmmesh_metrics() | EXTERNAL_METRICS
    records = {
        r["record"]
        for g in alert_rules(mesh)["spec"]["groups"]
        for r in g["rules"]
        if "record" in r
    }
    dep = require(mesh.get("Deployment", "llmmesh-gateway-v1"), "Deployment llmmesh-gateway-v1")
    proxy = yaml.safe_load(
        dep["spec"]["template"]["metadata"]["annotations"]["proxy.istio.io/config"]
    )
    patterns = [re.compile(p) for p in proxy["proxyStatsMatcher"]["inclusionRegexps"]]
    for where, expr in queries(mesh):
        for name in METRIC.findall(expr):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            if name not in known and base not in known and name not in records:
                problems.append(
                    f"{where}: {name} is neither in llmmesh.common.metric_names, "
                    "a known external metric nor a recording rule"
                )
            stat = name.removeprefix("envoy_cluster_")
            if name.startswith("envoy_cluster_") and not any(
                p.fullmatch(stat) or p.search(stat) for p in patterns
            ):
                problems.append(
                    f"{where}: {name}: Istio drops this Envoy stat unless proxyStatsMatcher "
                    "(proxy.istio.io/config of the llmmesh pods) includes it"
                )
    return problems


def check_scrape(mesh: Mesh) -> list[str]:
    """The llmmesh job scrapes every Service's http-metrics port over mTLS and adds the labels the
    queries use; Prometheus is allowed on exactly those ports; envoy-stats reads the sidecars."""
    problems: list[str] = []
    jobs = scrape_jobs(mesh)
    job = require(jobs.get("llmmesh"), "scrape job llmmesh")
    targets = {r["target_label"] for r in job["relabel_configs"] if "target_label" in r}
    problems.extend(
        f"scrape job llmmesh: adds no label {label}"
        for label in SCRAPE_LABELS
        if label not in targets
    )
    used: set[str] = set()
    for _where, expr in queries(mesh):
        used.update(re.findall(r"\b(model_version|role)\s*(?:=|!=|=~)", expr))
    if used != CANARY_LABELS:
        problems.append(f"queries select by {sorted(used)}, expected {sorted(CANARY_LABELS)}")
    if job.get("scheme") != "https":
        problems.append("scrape job llmmesh: STRICT mTLS: scrape over https")
    if not {"ca_file", "cert_file", "key_file"} <= set(job.get("tls_config", {})):
        problems.append("scrape job llmmesh: tls_config needs Prometheus' Istio certificate")
    keep = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    if not keep or keep[0].get("regex") != "http-metrics":
        problems.append("scrape job llmmesh: must first keep only ports named http-metrics")
    metrics_ports: set[str] = set()
    for svc in mesh.in_namespace("Service"):
        port = next((p for p in svc["spec"]["ports"] if p["name"] == "http-metrics"), None)
        if port is None and is_redis(svc):
            continue  # no exporter: the gateways' Redis metrics stand for it (mesh/README.md)
        if port is None:
            problems.append(f"{doc_id(svc)}: no http-metrics port")
        else:
            metrics_ports.add(str(port["port"]))
    policy = require(
        mesh.get("AuthorizationPolicy", "allow-prometheus-scrape"),
        "AuthorizationPolicy allow-prometheus-scrape",
    )
    allowed = {p for r in policy["spec"]["rules"] for t in r["to"] for p in t["operation"]["ports"]}
    if allowed != metrics_ports:
        problems.append(
            f"{doc_id(policy)}: allows ports {sorted(allowed)}, the metrics ports are "
            f"{sorted(metrics_ports)}"
        )
    envoy = jobs.get("envoy-stats")
    if envoy is None or envoy.get("metrics_path") != "/stats/prometheus":
        problems.append("scrape job envoy-stats must read the sidecars' /stats/prometheus")
    return problems


def check_alerts(mesh: Mesh) -> list[str]:
    """The promised alerts exist, each with a severity, a summary and a `for`; the jobs the queries
    select on are scrape jobs."""
    problems: list[str] = []
    alerts = {
        r["alert"]: r
        for g in alert_rules(mesh)["spec"]["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    problems.extend(f"no alert {name}" for name in REQUIRED_ALERTS if name not in alerts)
    for name, rule in alerts.items():
        if rule.get("labels", {}).get("severity") not in SEVERITIES:
            problems.append(f"alert {name}: severity must be one of {SEVERITIES}")
        if not rule.get("annotations", {}).get("summary"):
            problems.append(f"alert {name}: needs a summary annotation")
        if "for" not in rule:
            problems.append(f"alert {name}: needs a `for` duration")
    jobs = scrape_jobs(mesh)
    for where, expr in queries(mesh):
        problems.extend(
            f"{where}: job {job} is not a scrape job"
            for job in re.findall(r'job="([^"]+)"', expr)
            if job not in jobs
        )
    return problems


def check_tracing(mesh: Mesh) -> list[str]:
    problems: list[str] = []
    providers = {
        p["name"]: p
        for p in istiod_values(mesh.root)["meshConfig"]["extensionProviders"]
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
        for dep in component_deployments(mesh, comp):
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


# The autoscaler's PromQL selectors (LLMMESH_AUTOSCALER_PROMQL_<KIND>_SELECTOR): the workloads each
# must select, by pod template labels. Gateways: serving only (mirrored traffic is no load signal).
AUTOSCALER_ENV = "LLMMESH_AUTOSCALER_"
AUTOSCALER_SELECTS = {
    "ENGINE": {"app.kubernetes.io/component": "triton"},
    "ORCHESTRATOR": {"app.kubernetes.io/component": "orchestrator"},
    "GATEWAY": {"app.kubernetes.io/component": "gateway", "llmmesh.io/role": "serving"},
}
# Target labels of the `llmmesh` scrape job and the pod labels they are relabelled from.
SCRAPE_POD_LABELS = {
    "app": "app",
    "role": "llmmesh.io/role",
    "pool": "llmmesh.io/pool",
    "model_version": "version",
}
MATCHER = re.compile(r'\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def parse_matchers(selector: str) -> list[tuple[str, str, str]] | None:
    """`label="v",other=~"re"` as (label, op, value); None when it does not parse."""
    out: list[tuple[str, str, str]] = []
    pos = 0
    while pos < len(selector):
        m = MATCHER.match(selector, pos)
        if m is None or m.end() == pos:
            return None
        out.append((m[1], m[2], m[3]))
        pos = m.end()
    return out


def _matches(op: str, value: str, actual: str) -> bool:
    if op in ("=", "!="):
        return (actual == value) == (op == "=")
    return (re.fullmatch(value, actual) is not None) == (op == "=~")


def check_autoscaler_signals(mesh: Mesh) -> list[str]:
    """The autoscaler reads its signals from Prometheus (SOURCE=promql, PROMETHEUS_URL), so the
    gateways' TTFT/ITL histograms of every serving pod feed its SLO inputs; its engine,
    orchestrator and gateway selectors are set, use labels the `llmmesh` scrape job produces, and
    select exactly the Triton, orchestrator and serving gateway pods."""
    problems: list[str] = []
    env = autoscaler_env(mesh)
    if env.get(f"{AUTOSCALER_ENV}SOURCE") != "promql":
        problems.append(
            f"{AUTOSCALER_ENV}SOURCE must be promql: the gateways' TTFT/ITL (the SLO inputs) come "
            "from every serving gateway pod's histograms through Prometheus"
        )
    if not env.get(f"{AUTOSCALER_ENV}PROMETHEUS_URL", "").strip():
        problems.append(f"{AUTOSCALER_ENV}PROMETHEUS_URL is empty")
    problems.extend(_autoscaler_pools(mesh, env))
    job = require(scrape_jobs(mesh).get("llmmesh"), "scrape job llmmesh")
    produced = {r["target_label"] for r in job["relabel_configs"] if "target_label" in r}
    templates = mesh.pod_templates()
    for kind, wanted in AUTOSCALER_SELECTS.items():
        name = f"{AUTOSCALER_ENV}PROMQL_{kind}_SELECTOR"
        selector = env.get(name, "")
        matchers = parse_matchers(selector) if selector.strip() else []
        if not matchers:
            problems.append(f"{name} is {'empty' if matchers == [] else 'not label matchers'}")
            continue
        bad = [
            label
            for label, op, value in matchers
            if not (label == "job" and op == "=" and value == "llmmesh") and label not in produced
        ]
        if bad:
            problems.append(
                f"{name}: {bad} are not labels of the llmmesh scrape job (job must be llmmesh)"
            )
            continue
        selected = {
            d["metadata"]["name"]
            for d, tpl in templates
            if all(
                _matches(
                    op, value, tpl["metadata"].get("labels", {}).get(SCRAPE_POD_LABELS[lbl], "")
                )
                for lbl, op, value in matchers
                if lbl in SCRAPE_POD_LABELS
            )
        }
        expected = {d["metadata"]["name"] for d in mesh.deployments_selected(wanted)}
        if not expected or selected != expected:
            problems.append(
                f"{name} {selector!r} selects the pods of {sorted(selected)}, "
                f"expected {sorted(expected)}"
            )
    return problems


def _autoscaler_pools(mesh: Mesh, env: dict[str, str]) -> list[str]:
    """POOLS names every pool of REPLICA_DNS with a served model of the gateways: gateway series
    carry the served name, the orchestrator's the Triton model, so without the map the gateway's
    TTFT/ITL are attributed to no pool."""
    gateway = require(mesh.get("Deployment", "llmmesh-gateway-v1"), "Deployment llmmesh-gateway-v1")
    served = {
        m["name"]
        for m in json.loads(
            mesh.container_env(gateway, mesh.main_container(gateway)).get(
                "LLMMESH_GATEWAY_MODELS", "[]"
            )
        )
    }
    dns = json.loads(env.get(f"{AUTOSCALER_ENV}REPLICA_DNS", "[]"))
    wanted = {(d["pool"], d["model_version"]) for d in dns}
    pools = json.loads(env.get(f"{AUTOSCALER_ENV}POOLS", "[]"))
    listed = {(p["pool"], p["model_version"]): p.get("model", "") for p in pools}
    problems = [
        f"{AUTOSCALER_ENV}POOLS: no entry for pool {pool} ({version}) of REPLICA_DNS"
        for pool, version in sorted(wanted - set(listed))
    ]
    problems.extend(
        f"{AUTOSCALER_ENV}POOLS: pool {pool} ({version}) model {model!r} is not a served model "
        f"of the gateways {sorted(served)}"
        for (pool, version), model in sorted(listed.items())
        if model not in served
    )
    return problems
