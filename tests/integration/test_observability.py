"""Observability proven against the running local mesh (issue 13):

- every Grafana panel target and every alerting/recording rule of the shipped overlay is run as
  PromQL on a real Prometheus scraping the mesh after a short load: panels return data (or are
  listed below as not satisfiable locally, with the reason), rules pass `promtool check rules`,
  load into Prometheus, evaluate without error, and the llmmesh/Triton series they read exist;
- one request's spans, as an OTLP collector (Jaeger's OTLP port) receives them from gateway,
  orchestrator and kv_registry: one trace, parent links, the Triton hop.

Local substitutions (scrape labels, rule intervals, `$__rate_interval`) are described in
tests/integration/observability.py.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from llmmesh.common import metric_names as names
from llmmesh.common.components import GATEWAY, KV_REGISTRY, ORCHESTRATOR
from llmmesh.common.settings import settings_of, with_env
from llmmesh.common.topology import DEFAULT_MODEL_VERSION, DEFAULT_POOL, PoolKey
from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.gateway.v1 import gateway_pb2_grpc
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as opb
from llmmesh.localmesh import MODEL_NAME, ServiceProcess
from services.autoscaler.__main__ import build_source
from services.autoscaler.settings import AutoscalerSettings, PoolConfig
from tests.integration.conftest import Mesh, eventually, gateway_process, metric, start_mesh
from tests.integration.observability import (
    Prometheus,
    ScrapeTarget,
    Span,
    Target,
    TraceReceiver,
    promtool_check_rules,
    resolve_variables,
    running_prometheus,
    selectors,
    service_target,
    shipped,
    span_tree,
    substitute,
    trace_receiver,
    triton_target,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

OVERVIEW = "llmmesh-overview.json"
REPLICA = "llmmesh-replica.json"
# The serving gateway's deadline for requests without one: the load's long request ends on it.
GATEWAY_TIMEOUT_S = 2.0
# Series no local process can produce, by metric-name prefix.
NOT_LOCAL_METRICS = {
    "istio_": "Istio standard metrics come from the sidecars and the ingress gateway (no Istio "
    "locally)",
    "envoy_": "Envoy cluster stats come from the Istio sidecars (no sidecars in the local mesh)",
    "kube_": "kube-state-metrics (no Kubernetes locally)",
    "keda_": "KEDA's operator metrics (no KEDA locally)",
    "nv_gpu_": "Triton's GPU metrics need a GPU (--allow-gpu-metrics); the emulator replicas run "
    "on CPU",
}
# Panel targets whose every series is one of NOT_LOCAL_METRICS: (dashboard, panel, refId).
NOT_LOCAL_TARGETS = {
    (OVERVIEW, "Traffic share by model version (ingress)", "A"),
    (OVERVIEW, "Desired vs ready replicas", "C"),
    (OVERVIEW, "Outlier ejections (active)", "A"),
    (OVERVIEW, "Circuit breaker overflows", "A"),
    (OVERVIEW, "Circuit breaker overflows", "B"),
    (OVERVIEW, "Envoy retries", "A"),
    (REPLICA, "GPU utilization and memory", "A"),
    (REPLICA, "GPU utilization and memory", "B"),
}
# Panels that filter for a bad state and are empty while the mesh is healthy: their series must
# exist, the filter legitimately selects nothing.
FILTER_PANELS = {
    (OVERVIEW, "Unhealthy replicas per pool", "A"): "counts replicas with healthy == 0",
}
# Alert selectors of llmmesh series that exist only after the event they count.
EVENT_SERIES = {
    names.KV_RESYNCS: "a replica's resync counter appears at its first resync",
}


def _targets(mesh: Mesh, shadow: ServiceProcess) -> list[ScrapeTarget]:
    services = mesh.mesh.services
    version = {"model_version": DEFAULT_MODEL_VERSION}
    return [
        service_target(
            "llmmesh-gateway", services["gateway"].metrics_url, role="serving", **version
        ),
        service_target("llmmesh-gateway-shadow", shadow.metrics_url, role="shadow", **version),
        service_target("llmmesh-orchestrator", services["orchestrator"].metrics_url),
        service_target("llmmesh-kv-registry", services["kv_registry"].metrics_url),
        service_target("llmmesh-autoscaler", services["autoscaler"].metrics_url),
        *(
            triton_target(rid, t.metrics_url, DEFAULT_POOL, DEFAULT_MODEL_VERSION)
            for rid, t in zip(mesh.mesh.replica_ids, mesh.mesh.tritons, strict=True)
        ),
    ]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def traced(tokenizer_path: Path) -> AsyncIterator[tuple[Mesh, TraceReceiver]]:
    """The local mesh exporting every trace of gateway, orchestrator and kv_registry to an OTLP
    receiver in this process."""
    async with trace_receiver() as (receiver, endpoint):
        env = {
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s, not the SDK's 5 s
            f"{GATEWAY.env_prefix}REQUEST_TIMEOUT_S": str(GATEWAY_TIMEOUT_S),
            # The trace must show the lookup: its 50 ms budget can lapse on a loaded CI machine
            # (the request then routes by load, with no lookup span).
            f"{ORCHESTRATOR.env_prefix}KV_LOOKUP_TIMEOUT_S": "10",
            # ... and the lookup must be a call: the copy of the exact index (the emulators
            # publish KV events) would answer it in the orchestrator, with no span.
            f"{ORCHESTRATOR.env_prefix}KV_MIRROR": "false",
        }
        for comp in (GATEWAY, ORCHESTRATOR, KV_REGISTRY):
            env[f"{comp.env_prefix}OTLP_ENDPOINT"] = endpoint
            env[f"{comp.env_prefix}TRACE_SAMPLE_RATIO"] = "1.0"
        m = await start_mesh(tokenizer_path, replicas=2, time_scale=1.0, extra_env=env)
        try:
            yield m, receiver
        finally:
            await m.close()
            await m.mesh.stop()


def _request(i: int, max_tokens: int = 8, request_id: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=MODEL_NAME,
        token_ids=pb.TokenIds(ids=list(range(3000 + 97 * i, 3064 + 97 * i))),
        sampling=pb.SamplingParams(max_tokens=max_tokens, seed=i),
        request_id=request_id,
    )


async def _drain(stub: gateway_pb2_grpc.GatewayServiceAsyncStub, req: pb.GenerateRequest) -> None:
    async for _ in stub.Generate(req, timeout=60):
        pass


async def _late(mesh: Mesh) -> None:
    """A request the gateway's own deadline ends (outcome "deadline": an SLO error). No client
    deadline: with one, the client's cancellation may reach the gateway first ("cancelled")."""
    with pytest.raises(grpc.aio.AioRpcError) as late:
        async for _ in mesh.gateway.Generate(_request(99, max_tokens=4096)):
            pass
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def _refused(mesh: Mesh) -> None:
    """An admission the orchestrator refuses (rejection reason no_replica)."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mesh.orchestrator.Admit(
            opb.AdmitRequest(request_id="obs-refused", model="no-such-model", max_tokens=4),
            timeout=10,
        )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def _load(mesh: Mesh, shadow: gateway_pb2_grpc.GatewayServiceAsyncStub, prompts: int) -> None:
    """`prompts` generations, each prompt twice (prefix hits), one that runs out of time, one
    admission the orchestrator refuses, and mirrored requests to the shadow gateway."""

    async def rounds() -> None:
        for _ in range(2):
            await asyncio.gather(*(_drain(mesh.gateway, _request(i)) for i in range(prompts)))

    await asyncio.gather(
        rounds(),
        _late(mesh),
        _refused(mesh),
        *(_drain(shadow, _request(i)) for i in range(2)),
    )


async def _scraped_since(prom: Prometheus, t: float, n: int) -> bool:
    """Every one of the n targets was scraped (up) after time t."""
    got = await prom.query('timestamp(up{job="llmmesh"} == 1)')
    return len(got.result) == n and all(float(s["value"][1]) > t for s in got.result)


async def _rules_evaluated_since(prom: Prometheus, t: float) -> bool:
    rules = await prom.rules()
    return bool(rules) and all(_rfc3339(r.get("lastEvaluation", "")) > t for r in rules)


def _rfc3339(ts: str) -> float:
    """Prometheus' RFC 3339 timestamps (nanoseconds, Z) as epoch seconds; 0 if unparsable."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", ts)
    if m is None:
        return 0.0
    from datetime import datetime

    whole = datetime.fromisoformat(m[1] + (m[3] if m[3] != "Z" else "+00:00")).timestamp()
    return whole + float(m[2] or 0)


def _not_local(selector: str) -> str | None:
    return next((why for p, why in NOT_LOCAL_METRICS.items() if selector.startswith(p)), None)


async def _missing(prom: Prometheus, expr: str) -> list[str]:
    """The selectors of `expr` that match no series."""
    out = []
    for sel in selectors(expr):
        got = await prom.query(f"count({sel})")
        if not got.ok or not got.result:
            out.append(sel)
    return out


@pytest.mark.timeout(180)
async def test_every_panel_and_rule_against_prometheus(
    traced: tuple[Mesh, TraceReceiver], tokenizer_path: Path, tmp_path: Path
) -> None:
    mesh, _ = traced
    manifests = shipped()
    checked = promtool_check_rules(manifests.rule_groups, tmp_path)
    rules = manifests.rules()
    assert f"SUCCESS: {len(rules)} rules found" in checked, checked
    (tmp_path / "shadow").mkdir()
    shadow = gateway_process(mesh, tmp_path / "shadow", tokenizer_path)
    await shadow.start()
    channel = grpc.aio.insecure_channel(shadow.address)
    shadow_stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    try:
        # Every labelled series (outcomes, rejection reasons, histograms of the model) appears at
        # its first event: create them before Prometheus' first scrape, as in a running system;
        # otherwise rate() cannot see the first increase of a series (see the report on metric
        # initialisation in services/*/metrics.py).
        await _load(mesh, shadow_stub, prompts=1)
        targets = _targets(mesh, shadow)
        async with running_prometheus(targets, manifests.rule_groups) as prom:
            await eventually(
                lambda: _scraped_since(prom, 0, len(targets)),
                timeout_s=30,
                what="prometheus scrapes every local target",
            )
            await _load(mesh, shadow_stub, prompts=12)
            gw = mesh.mesh.services["gateway"].metrics_url

            async def late_counted() -> bool:
                return metric(gw, names.GATEWAY_REQUESTS, outcome="deadline") == 2

            await eventually(late_counted, what="the gateway counted both late requests")
            loaded = time.time()
            await eventually(
                lambda: _scraped_since(prom, loaded, len(targets)),
                timeout_s=30,
                what="prometheus scraped every target after the load",
            )
            evaluated = time.time()
            await eventually(
                lambda: _rules_evaluated_since(prom, evaluated),
                timeout_s=30,
                what="prometheus evaluated every rule after the load",
            )
            problems = await _check_panels(prom, manifests.dashboards, manifests.targets())
            problems += await _check_rules(prom, rules)
            problems += await _check_autoscaler(prom, manifests.autoscaler_env)
    finally:
        await channel.close(None)
        await shadow.stop()
    assert not problems, "\n".join(problems)


async def _check_panels(
    prom: Prometheus, dashboards: dict[str, dict[str, object]], targets: list[Target]
) -> list[str]:
    problems: list[str] = []
    not_local: set[tuple[str, str, str]] = set()
    variables = {name: await resolve_variables(prom, d) for name, d in dashboards.items()}
    for t in targets:
        key = (t.dashboard, t.panel, t.ref)
        expr = substitute(t.expr, variables[t.dashboard])
        got = await prom.query(expr)
        if not got.ok:
            problems.append(f"{t.where}: query fails: {got.error}\n    {expr}")
            continue
        if got.finite():
            if key in NOT_LOCAL_TARGETS or key in FILTER_PANELS:
                problems.append(f"{t.where}: has data locally, remove it from the exemptions")
            continue
        missing = await _missing(prom, expr)
        if key in FILTER_PANELS and not missing:
            continue
        if missing and all(_not_local(s) for s in missing):
            not_local.add(key)
            if key in NOT_LOCAL_TARGETS:
                continue
        what = f"missing series {missing}" if missing else "series exist, result empty or NaN"
        problems.append(f"{t.where}: no data ({what})\n    {expr}")
    problems.extend(
        f"{d}: panel {p!r} target {r}: listed as not locally satisfiable but is not"
        for d, p, r in sorted(NOT_LOCAL_TARGETS - not_local)
    )
    with_data = len(targets) - len(NOT_LOCAL_TARGETS) - len(FILTER_PANELS)
    print(
        f"\n{len(targets)} panel targets; {with_data} returned data; not locally satisfiable "
        f"({len(NOT_LOCAL_TARGETS)}):"
    )
    for d, p, r in sorted(NOT_LOCAL_TARGETS):
        t = next(t for t in targets if (t.dashboard, t.panel, t.ref) == (d, p, r))
        reasons = sorted({w for s in selectors(t.expr) if (w := _not_local(s))})
        print(f"  {d}: {p} [{r}]: {'; '.join(reasons)}")
    for (d, p, r), why in FILTER_PANELS.items():
        print(f"  {d}: {p} [{r}]: empty while healthy ({why}); its series exist")
    return problems


async def _check_rules(prom: Prometheus, rules: list[dict[str, object]]) -> list[str]:
    problems: list[str] = []
    for rule in rules:
        name = str(rule.get("alert") or rule.get("record"))
        expr = str(rule["expr"])
        got = await prom.query(expr)
        if not got.ok:
            problems.append(f"rule {name}: does not evaluate: {got.error}")
            continue
        if "record" in rule and not got.finite():
            problems.append(
                f"recording rule {name}: no data (missing {await _missing(prom, expr)})"
            )
        for sel in await _missing(prom, expr):
            base = sel.split("{", 1)[0]
            if not (_not_local(sel) or base in EVENT_SERIES or base.startswith("llmmesh:")):
                problems.append(f"rule {name}: selector {sel} matches no series")
    loaded = {str(r["name"]): r for r in await prom.rules()}
    for rule in rules:
        name = str(rule.get("alert") or rule.get("record"))
        state = loaded.get(name)
        if state is None:
            problems.append(f"rule {name}: not loaded by prometheus")
        elif state.get("health") != "ok" or state.get("lastError"):
            problems.append(f"rule {name}: {state.get('health')}: {state.get('lastError')}")
    records = sum(1 for r in rules if "record" in r)
    print(
        f"{len(rules)} rules ({records} recording, {len(rules) - records} alerting): promtool "
        "check ok, loaded and evaluated by prometheus"
    )
    return problems


async def _check_autoscaler(prom: Prometheus, env: dict[str, str]) -> list[str]:
    """The autoscaler, configured as shipped (its ConfigMap: source, selectors, windows; the
    Prometheus URL and the pool map are the local ones), reads the gateway's latency signals and
    the engines' and orchestrator's."""
    settings = with_env(settings_of(AutoscalerSettings), env)
    if settings.source != "promql":
        return [f"shipped autoscaler: source {settings.source}, not promql"]
    # The shipped pools and served model are the cluster's; locally one pool serves MODEL_NAME.
    assert settings.pools
    assert all(p.model for p in settings.pools)
    pool = PoolConfig(pool=DEFAULT_POOL, model_version=DEFAULT_MODEL_VERSION, model=MODEL_NAME)
    local = settings.model_copy(update={"prometheus_url": prom.url, "pools": [pool]})
    key = PoolKey(DEFAULT_POOL, DEFAULT_MODEL_VERSION)
    got = (await build_source(local).collect(time.time())).get(key)
    print(f"shipped autoscaler config reads, for {key}: {got}")
    if got is None:
        return [f"shipped autoscaler: no signals for pool {key}"]
    problems = [
        f"shipped autoscaler: {name} unknown"
        for name in ("ttft_p90_s", "itl_p90_s", "completion_tokens_rate", "arrival_rate")
        if getattr(got, name) is None
    ]
    if got.reporting_replicas != 2:
        problems.append(f"shipped autoscaler: {got.reporting_replicas} engines report, not 2")
    return problems


# -- traces ---------------------------------------------------------------------------------------


async def _one_traced_request(
    mesh: Mesh, receiver: TraceReceiver, want: set[str]
) -> tuple[list[Span], str, str, pb.GenerationComplete]:
    """One generation under a W3C trace context (as Istio's ingress would start it); the spans
    of that trace once `want` (span names) have arrived."""
    trace_id, ingress_span = secrets.token_hex(16), secrets.token_hex(8)
    metadata = (("traceparent", f"00-{trace_id}-{ingress_span}-01"),)
    complete = None
    async for resp in mesh.gateway.Generate(
        _request(7, request_id=f"obs-trace-{trace_id[:8]}"), metadata=metadata, timeout=30
    ):
        if resp.HasField("complete"):
            complete = resp.complete
    assert complete is not None

    async def arrived() -> bool:
        return want <= {s.name for s in receiver.of_trace(trace_id)}

    await eventually(arrived, timeout_s=20, what=f"spans {sorted(want)} of trace {trace_id}")
    spans = receiver.of_trace(trace_id)
    print(f"\ntrace {trace_id} (ingress span {ingress_span}):\n{span_tree(spans)}")
    return spans, trace_id, ingress_span, complete


def _one(spans: list[Span], service: str, name: str) -> Span:
    found = [s for s in spans if s.service == service and s.name == name]
    assert len(found) == 1, f"{service} {name}: {len(found)} spans\n{span_tree(spans)}"
    return found[0]


@pytest.mark.timeout(60)
async def test_one_request_is_one_trace(traced: tuple[Mesh, TraceReceiver]) -> None:
    mesh, receiver = traced
    spans, trace_id, ingress_span, complete = await _one_traced_request(
        mesh, receiver, {"gateway.generate", "orchestrator.admit", "triton.stream"}
    )
    assert {s.trace_id for s in spans} == {trace_id}
    gen = _one(spans, "llmmesh-gateway", "gateway.generate")
    admit = _one(spans, "llmmesh-orchestrator", "orchestrator.admit")
    stream = _one(spans, "llmmesh-gateway", "triton.stream")
    tree = span_tree(spans)
    # The gateway continues the caller's trace; the orchestrator's Admit and the Triton stream
    # are the gateway request's children.
    assert gen.parent_id == ingress_span, tree
    assert admit.parent_id == gen.span_id, tree
    assert stream.parent_id == gen.span_id, tree
    assert gen.attributes.get("llmmesh.request_id") == f"obs-trace-{trace_id[:8]}", tree
    replica = complete.replica_id
    assert replica in mesh.mesh.replica_ids
    assert gen.attributes.get("llmmesh.replica") == replica, tree
    assert admit.attributes.get("llmmesh.replica") == replica, tree
    # The Triton hop: the gateway's span around the engine stream names the replica it called.
    assert stream.attributes.get("llmmesh.replica") == replica, tree


@pytest.mark.timeout(60)
async def test_trace_has_kv_lookup_and_span_kinds(traced: tuple[Mesh, TraceReceiver]) -> None:
    mesh, receiver = traced
    spans, _, _, _ = await _one_traced_request(
        mesh,
        receiver,
        {"gateway.generate", "orchestrator.admit", "triton.stream", "kv_registry.lookup"},
    )
    tree = span_tree(spans)
    admit = _one(spans, "llmmesh-orchestrator", "orchestrator.admit")
    lookups = [s for s in spans if s.service == "llmmesh-kv_registry"]
    assert lookups, f"no kv_registry span in the trace\n{tree}"
    assert all(s.parent_id == admit.span_id for s in lookups), tree
    gen = _one(spans, "llmmesh-gateway", "gateway.generate")
    stream = _one(spans, "llmmesh-gateway", "triton.stream")
    assert (gen.kind_name, admit.kind_name, stream.kind_name) == ("SERVER", "SERVER", "CLIENT"), (
        tree
    )
