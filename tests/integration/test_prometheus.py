"""The autoscaler's PromQL source against a real Prometheus (Debian's package, unpacked by `make
setup` into .build/prometheus) scraping the local mesh: after load it reads the same signals as
the direct-scrape source, and NaN/empty answers are unknown."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import yaml

from llmmesh.common import metric_names as names
from llmmesh.common.topology import DEFAULT_MODEL_VERSION, DEFAULT_POOL, PoolKey
from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.localmesh import MODEL_NAME
from llmmesh.netutil import free_port
from services.autoscaler.promql import PromQLConfig, PromQLSource
from services.autoscaler.scrape import EngineTarget, ScrapeSource
from services.autoscaler.signals import PoolSignals
from tests.integration.conftest import Mesh, eventually, metric, scrape
from tests.integration.observability import PROMETHEUS, wait_ready

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

MODEL = MODEL_NAME
KEY = PoolKey(DEFAULT_POOL, DEFAULT_MODEL_VERSION)
SCRAPE_S = 1
MAX_AGE_S = 10.0
MIN_SAMPLES = 20


@dataclass
class Prometheus:
    url: str
    proc: asyncio.subprocess.Process
    log: Path


def prometheus_config(mesh: Mesh) -> dict[str, object]:
    """Scrape jobs like mesh/observability/prometheus: engine series get the target labels pool,
    model_version and replica (the orchestrator's replica id)."""
    services = mesh.mesh.services

    def hostport(url: str) -> str:
        return url.split("//", 1)[1].split("/", 1)[0]

    return {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "scrape_timeout": f"{SCRAPE_S}s"},
        "scrape_configs": [
            {
                "job_name": "triton",
                "static_configs": [
                    {
                        "targets": [hostport(t.metrics_url)],
                        "labels": {
                            "pool": KEY.pool,
                            "model_version": KEY.model_version,
                            "replica": rid,
                        },
                    }
                    for rid, t in zip(mesh.mesh.replica_ids, mesh.mesh.tritons, strict=True)
                ],
            },
            *(
                {
                    "job_name": name,
                    "static_configs": [{"targets": [f"127.0.0.1:{services[name].metrics_port}"]}],
                }
                for name in ("orchestrator", "gateway")
            ),
        ],
    }


@contextlib.asynccontextmanager
async def running_prometheus(mesh: Mesh) -> AsyncIterator[Prometheus]:
    if not PROMETHEUS.is_file():
        pytest.fail(f"{PROMETHEUS} missing: run `make setup` (unpacks Debian's prometheus package)")
    with tempfile.TemporaryDirectory(prefix="llmmesh-prom-") as tmp:
        work = Path(tmp)
        config = work / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(mesh)))
        log = work / "prometheus.log"
        proc: asyncio.subprocess.Process | None = None
        try:
            for _ in range(3):
                # A port picked free can be taken before Prometheus binds it: then it exits.
                port = free_port()
                with log.open("ab") as out:
                    proc = await asyncio.create_subprocess_exec(
                        str(PROMETHEUS),
                        f"--config.file={config}",
                        f"--storage.tsdb.path={work / 'data'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                        stdout=out,
                        stderr=out,
                    )
                url = f"http://127.0.0.1:{port}"
                if await wait_ready(proc, url, 60.0):
                    yield Prometheus(url, proc, log)
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


@pytest_asyncio.fixture(loop_scope="session")
async def prometheus(mesh: Mesh) -> AsyncIterator[Prometheus]:
    async with running_prometheus(mesh) as p:
        yield p


def promql(prom: Prometheus, window_s: float) -> PromQLSource:
    return PromQLSource(
        PromQLConfig(
            base_url=prom.url,
            timeout_s=5,
            rate_window_s=window_s,
            max_age_s=MAX_AGE_S,
            engine_selector='job="triton"',
            orchestrator_selector='job="orchestrator"',
            gateway_selector='job="gateway"',
        ),
        {KEY: MODEL},
    )


def scrape_source(mesh: Mesh) -> ScrapeSource:
    services = mesh.mesh.services
    targets = [
        EngineTarget(rid, t.metrics_url, KEY)
        for rid, t in zip(mesh.mesh.replica_ids, mesh.mesh.tritons, strict=True)
    ]

    async def discover() -> list[EngineTarget]:
        return targets

    return ScrapeSource(
        targets=discover,
        orchestrator_urls=[f"http://127.0.0.1:{services['orchestrator'].metrics_port}/metrics"],
        gateway_url=f"http://127.0.0.1:{services['gateway'].metrics_port}/metrics",
        pool_models={KEY: MODEL},
        timeout_s=5,
        rate_window_s=3600,  # every point the test took: the PromQL window is chosen to match
        max_age_s=MAX_AGE_S,
    )


async def generate(mesh: Mesh, n: int, max_tokens: int) -> None:
    async def one(i: int) -> None:
        req = pb.GenerateRequest(
            model=MODEL,
            token_ids=pb.TokenIds(ids=list(range(2000 + i, 2064 + i))),
            sampling=pb.SamplingParams(max_tokens=max_tokens, seed=i),
        )
        async for _ in mesh.gateway.Generate(req, timeout=60):
            pass

    await asyncio.gather(*(one(i) for i in range(n)))


async def vector_len(source: PromQLSource, query: str) -> int:
    got = await source.query(query)
    return len(got or [])


def buckets_apart(url: str, histogram: str, a: float, b: float) -> int:
    """How many of `histogram`'s buckets (as `url` serves it) lie between values `a` and `b`:
    0 in the same bucket, 1 in adjacent ones."""
    bounds = sorted(
        {float(dict(lbls)["le"]) for n, lbls in scrape(url) if n == f"{histogram}_bucket"}
    )
    assert bounds, f"{histogram} has no buckets at {url}"
    return abs(bisect.bisect_left(bounds, a) - bisect.bisect_left(bounds, b))


def close(a: float | None, b: float | None, rel: float, abs_: float = 1e-9) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


@pytest.mark.timeout(300)
async def test_promql_source_matches_scrape_source(mesh: Mesh, prometheus: Prometheus) -> None:
    gw_metrics = f"http://127.0.0.1:{mesh.mesh.services['gateway'].metrics_port}/metrics"
    orch_metrics = f"http://127.0.0.1:{mesh.mesh.services['orchestrator'].metrics_port}/metrics"
    probe = promql(prometheus, 60)
    # The model's series exist (one request) and Prometheus has them before the measurement.
    await generate(mesh, 1, 4)
    await eventually(
        lambda: _has(probe, f'{names.GATEWAY_TOKENS}{{job="gateway"}}'),
        timeout_s=60,
        what="prometheus scraped the gateway",
    )
    await eventually(
        lambda: _has(probe, f'{names.ORCH_DECISIONS}{{job="orchestrator"}}'),
        timeout_s=60,
        what="prometheus scraped the orchestrator",
    )
    scrape = scrape_source(mesh)
    start = time.time()
    await scrape.collect(start)

    async def scraping() -> None:
        # The direct source reads at Prometheus' pace, as the autoscaler loop would.
        while True:
            await asyncio.sleep(SCRAPE_S)
            await scrape.collect(time.time())

    collector = asyncio.create_task(scraping())
    try:

        async def covered() -> bool:
            # Rates over a window of a few scrapes are mostly extrapolation: measure over one
            # that Prometheus sampled MIN_SAMPLES times since the direct source's first point.
            window = math.ceil(time.time() - start)
            got = await probe.query(f'count_over_time(up{{job="gateway"}}[{window}s])')
            return got is not None and len(got) == 1 and (got[0][1] or 0) >= MIN_SAMPLES

        await eventually(covered, timeout_s=120, what=f"{MIN_SAMPLES} scrapes in the window")
        await generate(mesh, 24, 16)
        requests = metric(gw_metrics, names.GATEWAY_REQUESTS)

        async def prometheus_caught_up() -> bool:
            got = await probe.query(f'sum({names.GATEWAY_REQUESTS}{{job="gateway"}})')
            return got is not None and len(got) == 1 and got[0][1] == requests

        await eventually(prometheus_caught_up, timeout_s=60, what="prometheus saw every request")
        admitted = metric(orch_metrics, names.ORCH_DECISIONS)

        async def prometheus_saw_admissions() -> bool:
            # Each target is scraped on its own schedule: the orchestrator's last scrape may
            # predate the requests even when the gateway's does not.
            got = await probe.query(f'sum({names.ORCH_DECISIONS}{{job="orchestrator"}})')
            return got is not None and len(got) == 1 and got[0][1] == admitted

        await eventually(
            prometheus_saw_admissions, timeout_s=60, what="prometheus saw every admission"
        )
        await eventually(lambda: _idle(probe), timeout_s=60, what="prometheus saw the engines idle")
    finally:
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector
    now = time.time()
    direct = (await scrape.collect(now))[KEY]
    # The same window for both: from the direct source's first point to now.
    via_prom = (await promql(prometheus, now - start).collect(now))[KEY]

    assert direct.reporting_replicas == via_prom.reporting_replicas == len(mesh.mesh.tritons)
    assert direct.replicas_known == via_prom.replicas_known
    assert (direct.engine_active, direct.engine_waiting) == (0.0, 0.0)
    assert (via_prom.engine_active, via_prom.engine_waiting) == (0.0, 0.0)
    assert close(direct.kv_utilization, via_prom.kv_utilization, rel=1e-6)
    if direct.queue_depth is not None:
        assert direct.queue_depth == via_prom.queue_depth == 0.0
    assert direct.arrival_rate is not None
    assert direct.arrival_rate > 0
    assert direct.prompt_tokens_rate is not None
    assert direct.prompt_tokens_rate > 0
    # Rates: Prometheus extrapolates to the window's edges (half a scrape interval each).
    for name in ("arrival_rate", "prompt_tokens_rate", "completion_tokens_rate"):
        a, b = getattr(direct, name), getattr(via_prom, name)
        assert close(a, b, rel=0.25), f"{name}: direct {a} vs prometheus {b}"
    # Percentiles: the same bucket increases, interpolated the same way. The two windows'
    # edges are each source's own samples, so an observation or two may fall in one window
    # only; where the p90 sits at a bucket's edge that moves it into the next bucket. So the
    # two agree closely, or lie in the same or adjacent buckets of the histogram served.
    for name, url, hist in (
        ("ttft_p90_s", gw_metrics, names.GATEWAY_TTFT),
        ("itl_p90_s", gw_metrics, names.GATEWAY_ITL),
        ("queue_wait_p90_s", orch_metrics, names.ORCH_QUEUE_WAIT),
    ):
        a, b = getattr(direct, name), getattr(via_prom, name)
        assert close(a, b, rel=0.15, abs_=1e-3) or (
            a is not None and b is not None and buckets_apart(url, hist, a, b) <= 1
        ), f"{name}: direct {a} vs prometheus {b}"
    assert direct.ttft_p90_s is not None


async def test_nan_and_empty_answers_are_unknown(mesh: Mesh, prometheus: Prometheus) -> None:
    source = promql(prometheus, 60)
    assert await source.query("0 / 0") == [({}, None)]
    assert await source.query("llmmesh_no_such_metric") == []
    assert await source.query("this is not promql") is None  # a 400 answer: unknown, no raise
    # No request in the last window: rates are 0 and every percentile is NaN -> unknown.
    idle = promql(prometheus, SCRAPE_S * 2)
    await eventually(lambda: _idle(idle), timeout_s=60, what="engines idle")

    async def quiet() -> bool:
        s: PoolSignals = (await idle.collect(time.time()))[KEY]
        return s.arrival_rate == 0.0

    await eventually(quiet, timeout_s=60, what="no admissions in the window")
    s = (await idle.collect(time.time()))[KEY]
    assert (s.ttft_p90_s, s.itl_p90_s) == (None, None)


async def _has(source: PromQLSource, query: str) -> bool:
    return await vector_len(source, query) > 0


async def _idle(source: PromQLSource) -> bool:
    s = (await source.collect(time.time())).get(KEY)
    return s is not None and s.engine_active == 0.0 and s.engine_waiting == 0.0
