"""What tests/integration/test_observability.py runs against the local mesh: the shipped
dashboards and alert rules (rendered from mesh/ the way meshcheck reads them), a real Prometheus
whose scrape job labels the local processes like the Kubernetes `llmmesh` job does, Grafana's
template variables resolved through Prometheus, and an OTLP/gRPC trace receiver.

Local substitutions (documented here, asserted nowhere else):
- The Kubernetes job `llmmesh` discovers every Service port named http-metrics and relabels pod
  labels into `app`, `model_version`, `role`, `pool`, `replica`, `namespace`, `service`, `pod`.
  Locally one static job `llmmesh` carries the same labels per process (mesh/observability/
  prometheus/scrape-configs.yaml): the gateway is app=llmmesh-gateway role=serving, a second
  gateway plays the mirror target (role=shadow), Triton replicas are app=triton-<pool>-<version>
  with pool, model_version and replica = the orchestrator's replica id.
- Scrapes and rule evaluation run every second; every rule group's `interval` is rewritten to
  1s in the file Prometheus loads (promtool checks the file as shipped).
- Grafana's `$__rate_interval` is RATE_WINDOW (longer than the whole test, so a rate covers
  all of the load); multi-value variables with "All" become the regex of every value their
  `label_values` query finds, single-value ones the first value.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from llmmesh.common.process import tied_to_parent
from llmmesh.common.topology import DEFAULT_MODEL_VERSION, DEFAULT_POOL
from llmmesh.netutil import free_port
from llmmesh.tools.meshcheck.common import target_dir
from llmmesh.tools.meshcheck.index import Mesh as Manifests
from llmmesh.tools.meshcheck.render import render
from llmmesh.tools.meshcheck.rules import observability as obs

ROOT = Path(__file__).resolve().parents[2]
PROM_BIN = ROOT / ".build" / "prometheus" / "usr" / "bin"
PROMETHEUS = PROM_BIN / "prometheus"
PROMTOOL = PROM_BIN / "promtool"
SHIPPED_OVERLAY = "prod"
SCRAPE_S = 1
RATE_WINDOW = "2m"
NAMESPACE = "llmmesh"
# Metric names inside PromQL (recording rules included), as meshcheck finds them.
METRIC = obs.METRIC
SELECTOR = re.compile(METRIC.pattern + r"(\{[^}]*\})?")


# -- the shipped dashboards and rules ---------------------------------------------------------


@dataclass(frozen=True)
class Target:
    dashboard: str
    panel: str
    ref: str
    expr: str

    @property
    def where(self) -> str:
        return f"{self.dashboard}: panel {self.panel!r} target {self.ref}"


@dataclass
class Shipped:
    dashboards: dict[str, dict[str, Any]]
    rule_groups: list[dict[str, Any]]
    autoscaler_env: dict[str, str]  # the llmmesh-autoscaler container's environment

    def targets(self) -> list[Target]:
        return [
            Target(name, p["title"], t.get("refId", str(i)), t["expr"])
            for name, dash in self.dashboards.items()
            for p in obs.panels(dash)
            for i, t in enumerate(p["targets"])
        ]

    def rules(self) -> list[dict[str, Any]]:
        return [r for g in self.rule_groups for r in g["rules"]]


def shipped(overlay: str = SHIPPED_OVERLAY) -> Shipped:
    """Dashboards and rule groups of the rendered overlay (kubectl kustomize, like meshcheck)."""
    manifests = Manifests(render(target_dir(overlay)))
    autoscaler = manifests.get("Deployment", "llmmesh-autoscaler")
    assert autoscaler is not None
    return Shipped(
        obs.dashboards(manifests),
        obs.alert_rules(manifests)["spec"]["groups"],
        manifests.container_env(autoscaler, manifests.main_container(autoscaler)),
    )


def selectors(expr: str) -> list[str]:
    """Every `metric{matchers}` selector of a PromQL expression (recording rules included)."""
    return [m.group(0) for m in SELECTOR.finditer(expr)]


def promtool_check_rules(groups: list[dict[str, Any]], work: Path) -> str:
    """`promtool check rules` on the groups as shipped; its output (raises on failure)."""
    path = work / "shipped-rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    proc = subprocess.run(
        tied_to_parent([str(PROMTOOL), "check", "rules", str(path)]),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"promtool check rules failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


# -- the local scrape job -----------------------------------------------------------------------


@dataclass(frozen=True)
class ScrapeTarget:
    """One local process as the Kubernetes `llmmesh` job would label it."""

    address: str  # host:port of its /metrics
    labels: Mapping[str, str]


def hostport(url: str) -> str:
    return url.split("//", 1)[1].split("/", 1)[0]


def service_target(app: str, metrics_url: str, **labels: str) -> ScrapeTarget:
    return ScrapeTarget(
        hostport(metrics_url),
        {"namespace": NAMESPACE, "service": app, "app": app, "pod": f"{app}-local", **labels},
    )


def triton_target(replica: str, metrics_url: str, pool: str, model_version: str) -> ScrapeTarget:
    app = f"triton-{pool}-{model_version}"
    return ScrapeTarget(
        hostport(metrics_url),
        {
            "namespace": NAMESPACE,
            "service": app,
            "app": app,
            "pod": f"{app}-{replica}",
            "pool": pool,
            "model_version": model_version,
            "replica": replica,
        },
    )


def prometheus_config(targets: Iterable[ScrapeTarget], rule_file: Path) -> dict[str, object]:
    return {
        "global": {
            "scrape_interval": f"{SCRAPE_S}s",
            "scrape_timeout": f"{SCRAPE_S}s",
            "evaluation_interval": f"{SCRAPE_S}s",
        },
        "rule_files": [str(rule_file)],
        "scrape_configs": [
            {
                "job_name": "llmmesh",
                "metrics_path": "/metrics",
                "static_configs": [
                    {"targets": [t.address], "labels": dict(t.labels)} for t in targets
                ],
            }
        ],
    }


def local_rule_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The shipped groups, evaluated every scrape interval instead of their own."""
    return [{**g, "interval": f"{SCRAPE_S}s"} for g in groups]


# -- Prometheus ---------------------------------------------------------------------------------


@dataclass
class Answer:
    ok: bool
    error: str
    result: list[dict[str, Any]] = field(default_factory=list)

    def finite(self) -> list[dict[str, Any]]:
        return [s for s in self.result if math.isfinite(float(s["value"][1]))]


@dataclass
class Prometheus:
    url: str
    log: Path

    def _get(self, path: str, **params: str | list[str]) -> dict[str, Any]:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body: dict[str, Any] = json.loads(resp.read())
        except urllib.error.HTTPError as err:  # 400/422: a bad query, JSON with the reason
            body = json.loads(err.read())
        return body

    def query_now(self, expr: str) -> Answer:
        body = self._get("/api/v1/query", query=expr)
        if body.get("status") != "success":
            return Answer(False, f"{body.get('errorType')}: {body.get('error')}")
        data = body["data"]
        if data["resultType"] == "scalar":
            return Answer(True, "", [{"metric": {}, "value": data["result"]}])
        return Answer(True, "", list(data["result"]))

    async def query(self, expr: str) -> Answer:
        return await asyncio.to_thread(self.query_now, expr)

    async def label_values(self, label: str, match: str) -> list[str]:
        body = await asyncio.to_thread(self._get, f"/api/v1/label/{label}/values", match=[match])
        return sorted(body.get("data") or [])

    async def rules(self) -> list[dict[str, Any]]:
        body = await asyncio.to_thread(self._get, "/api/v1/rules")
        return [r for g in body["data"]["groups"] for r in g["rules"]]

    async def targets_up(self) -> tuple[int, int]:
        body = await asyncio.to_thread(self._get, "/api/v1/targets")
        active = body["data"]["activeTargets"]
        return sum(1 for t in active if t["health"] == "up"), len(active)


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
            return int(resp.status) == 200
    except OSError:
        return False


async def wait_ready(proc: asyncio.subprocess.Process, url: str, timeout_s: float) -> bool:
    """Poll the readiness endpoint (off the event loop) until ready, exited or timed out."""
    deadline = time.monotonic() + timeout_s
    while proc.returncode is None and time.monotonic() < deadline:
        if await asyncio.to_thread(ready, url):
            return True
        await asyncio.sleep(0.1)  # polling a child process's readiness endpoint
    return False


@contextlib.asynccontextmanager
async def running_prometheus(
    targets: list[ScrapeTarget], groups: list[dict[str, Any]]
) -> AsyncIterator[Prometheus]:
    """Prometheus scraping `targets` and evaluating `groups` (the shipped rules)."""
    if not PROMETHEUS.is_file():
        pytest.fail(f"{PROMETHEUS} missing: run `make setup` (unpacks Debian's prometheus package)")
    with tempfile.TemporaryDirectory(prefix="llmmesh-obs-prom-") as tmp:
        work = Path(tmp)
        rules = work / "rules.yml"
        rules.write_text(yaml.safe_dump({"groups": local_rule_groups(groups)}, sort_keys=False))
        config = work / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(targets, rules), sort_keys=False))
        log = work / "prometheus.log"
        proc: asyncio.subprocess.Process | None = None
        try:
            for _ in range(3):
                # A port picked free can be taken before Prometheus binds it: then it exits.
                port = free_port()
                with log.open("ab") as out:
                    argv = [
                        str(PROMETHEUS),
                        f"--config.file={config}",
                        f"--storage.tsdb.path={work / 'data'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                    ]
                    proc = await asyncio.create_subprocess_exec(
                        *tied_to_parent(argv), stdout=out, stderr=out
                    )
                url = f"http://127.0.0.1:{port}"
                if await wait_ready(proc, url, 60.0):
                    yield Prometheus(url, log)
                    return
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
            pytest.fail(f"prometheus did not start:\n{log.read_text(errors='replace')[-4000:]}")
        finally:
            if proc is not None and proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 15)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


# -- Grafana variables ----------------------------------------------------------------------------

LABEL_VALUES = re.compile(r"^label_values\((?:(?P<match>.+),\s*)?(?P<label>\w+)\)$")


async def resolve_variables(prom: Prometheus, dashboard: dict[str, Any]) -> dict[str, str]:
    """Each query variable's value as Grafana would fill it in: "All" (every value, as a regex
    alternation) for multi-value variables, the first value otherwise; in templating order, so
    a variable's query may use the ones before it."""
    values: dict[str, str] = {"__rate_interval": RATE_WINDOW}
    for var in dashboard["templating"]["list"]:
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = LABEL_VALUES.match(substitute(query, values).strip())
        if m is None:
            pytest.fail(f"variable {var['name']}: not a label_values query: {query!r}")
        found = await prom.label_values(m["label"], m["match"] or "{__name__=~'.+'}")
        if not found:
            pytest.fail(f"variable {var['name']}: {query!r} finds no value")
        if var.get("multi") or var.get("includeAll"):
            values[var["name"]] = "|".join(re.escape(v) for v in found)
        else:
            values[var["name"]] = found[0]
    return values


def substitute(expr: str, values: Mapping[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"undefined variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


# -- OTLP receiver --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: Mapping[str, object]

    @property
    def kind_name(self) -> str:
        kinds = trace_pb2.Span.SpanKind
        return kinds.Name(kinds.ValueType(self.kind)).removeprefix("SPAN_KIND_")


def _value(v: Any) -> object:
    which = v.WhichOneof("value")
    return getattr(v, which) if which else None


class TraceReceiver(otlp_grpc.TraceServiceServicer):
    """OTLP/gRPC TraceService: what a Jaeger collector's OTLP port would receive."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    async def Export(
        self,
        request: otlp_pb.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> otlp_pb.ExportTraceServiceResponse:
        for rs in request.resource_spans:
            res = {a.key: _value(a.value) for a in rs.resource.attributes}
            service = str(res.get("service.name", ""))
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(
                        Span(
                            service=service,
                            name=s.name,
                            kind=s.kind,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in s.attributes},
                        )
                    )
        return otlp_pb.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]


@contextlib.asynccontextmanager
async def trace_receiver() -> AsyncIterator[tuple[TraceReceiver, str]]:
    """A receiver on a free port, and its endpoint for LLMMESH_<SVC>_OTLP_ENDPOINT."""
    receiver = TraceReceiver()
    server = grpc.aio.server()
    otlp_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield receiver, f"http://127.0.0.1:{port}"
    finally:
        await server.stop(None)


def span_tree(spans: list[Span]) -> str:
    """The spans as an indented tree (roots: spans whose parent is not among them)."""
    ids = {s.span_id for s in spans}
    children: dict[str, list[Span]] = {}
    for s in spans:
        children.setdefault(s.parent_id if s.parent_id in ids else "", []).append(s)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for s in children.get(parent, []):
            attrs = {k: v for k, v in s.attributes.items() if k.startswith("llmmesh.")}
            lines.append(f"{'  ' * depth}{s.service} {s.name} [{s.kind_name}] {attrs}")
            walk(s.span_id, depth + 1)

    walk("", 0)
    return "\n".join(lines)


__all__ = [
    "DEFAULT_MODEL_VERSION",
    "DEFAULT_POOL",
    "Answer",
    "Prometheus",
    "ScrapeTarget",
    "Shipped",
    "Span",
    "Target",
    "TraceReceiver",
    "promtool_check_rules",
    "resolve_variables",
    "running_prometheus",
    "selectors",
    "service_target",
    "shipped",
    "span_tree",
    "substitute",
    "trace_receiver",
    "triton_target",
]
