"""The PromQL source: answer parsing (NaN/empty → unknown, malformed → error) and collection over
a fake HTTP API. The real-Prometheus test is in tests/integration."""

from __future__ import annotations

import dataclasses
import json
import urllib.parse
from collections.abc import Callable, Set

import pytest
from prometheus_client import REGISTRY

from llmmesh.common import metric_names as names
from llmmesh.common.topology import PoolKey
from services.autoscaler.core import Autoscaler
from services.autoscaler.promql import (
    PromQLConfig,
    PromQLError,
    PromQLSource,
    PromQueries,
    parse_vector,
)
from services.autoscaler.settings import AutoscalerSettings
from services.autoscaler.signals import SourceUnavailable

SHORT = PoolKey("short", "v1")
WINDOW, MAX_AGE = 60.0, 30.0


def vector(*items: tuple[dict[str, str], str]) -> bytes:
    return json.dumps(
        {
            "status": "success",
            "data": {
                "resultType": "vector",
                "result": [{"metric": m, "value": [1.0, v]} for m, v in items],
            },
        }
    ).encode()


def test_parse_vector_nan_and_empty() -> None:
    assert parse_vector(vector(({"pool": "a"}, "NaN"), ({"pool": "b"}, "2"))) == [
        ({"pool": "a"}, None),
        ({"pool": "b"}, 2.0),
    ]
    assert parse_vector(vector()) == []
    assert parse_vector(vector(({}, "+Inf"))) == [({}, None)]


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"status": "error", "error": "parse error at char 3"}',
        b'{"status": "success", "data": {"resultType": "matrix", "result": []}}',
        b'{"status": "success", "data": {"resultType": "vector", "result": [{"value": 1}]}}',
    ],
)
def test_parse_vector_errors(body: bytes) -> None:
    with pytest.raises(PromQLError):
        parse_vector(body)


CONFIG = PromQLConfig(
    base_url="http://prom:9090",
    timeout_s=1.0,
    rate_window_s=WINDOW,
    max_age_s=MAX_AGE,
    engine_selector='job="triton"',
    orchestrator_selector='job="orchestrator"',
    gateway_selector='job="gateway"',
)


async def test_promql_source_answers_and_nan() -> None:
    q = PromQLSource(CONFIG, {}).queries
    answers: dict[str, bytes] = {
        q.engines_known: vector(({"pool": "short", "model_version": "v1"}, "2")),
        q.engines_reporting: vector(({"pool": "short", "model_version": "v1"}, "2")),
        q.engine_active: vector(({"pool": "short", "model_version": "v1"}, "4")),
        q.engine_waiting: vector(({"pool": "short", "model_version": "v1"}, "1")),
        q.kv_used: vector(({"pool": "short", "model_version": "v1"}, "20")),
        q.kv_max: vector(({"pool": "short", "model_version": "v1"}, "100")),
        q.queue_depth: vector(),
        q.leases: vector(({"pool": "short", "model_version": "v1"}, "5")),
        q.orchestrator_up: vector(({}, "1")),
        q.admissions: vector(({"model": "m", "pool": "short", "model_version": "v1"}, "3")),
        q.queue_wait_p90: vector(({"model": "m"}, "NaN")),
        q.gateway_up: vector(({}, "1")),
        q.ttft_p90: vector(({"model": "m"}, "NaN")),
        q.itl_p90: vector(),
        q.tokens: vector(({"model": "m", "kind": "prompt"}, "30")),
        q.queue_wait_p90_by_pool: vector(),
        q.ttft_p90_by_pool: vector(),
        q.itl_p90_by_pool: vector(),
    }
    got = await PromQLSource(CONFIG, {}, answering(answers)).collect(0.0)
    short = got[SHORT]
    assert (short.replicas_known, short.reporting_replicas) == (2, 2)
    assert (short.engine_active, short.engine_waiting, short.kv_utilization) == (4.0, 1.0, 0.2)
    assert short.queue_depth == 0.0
    assert short.leases_in_flight == 5.0
    assert short.arrival_rate == 3.0
    assert (short.ttft_p90_s, short.queue_wait_p90_s, short.itl_p90_s) == (None, None, None)
    assert short.prompt_tokens_rate == 30.0
    assert short.completion_tokens_rate == 0.0
    assert short.unread == ()


async def test_an_instance_down_makes_the_sums_lower_bounds() -> None:
    """Of two orchestrators (active-active) one is down: the queue and admissions read are the
    other's alone, and the pools say that they undercount; a gateway down, likewise."""
    q = PromQLSource(CONFIG, {}).queries
    up = {"job": "x"}
    answers = {
        q.queue_depth: vector(({"pool": "short", "model_version": "v1"}, "4")),
        q.orchestrator_up: vector(({**up, "instance": "a"}, "1"), ({**up, "instance": "b"}, "0")),
        q.gateway_up: vector(({**up, "instance": "g"}, "1")),
    }
    got = await PromQLSource(CONFIG, {}, answering(answers)).collect(0.0)
    assert got[SHORT].queue_depth == 4.0
    assert got[SHORT].unread == ("1 of 2 orchestrators not read",)
    answers[q.gateway_up] = vector(({**up, "instance": "g"}, "0"), ({**up, "instance": "h"}, "1"))
    answers[q.orchestrator_up] = vector(({**up, "instance": "a"}, "1"))
    got = await PromQLSource(CONFIG, {}, answering(answers)).collect(0.0)
    assert got[SHORT].unread == ("1 of 2 gateways not read",)


def answering(
    answers: dict[str, bytes], failing: Set[str] = frozenset()
) -> Callable[[str, float], bytes]:
    """A fake HTTP GET that answers each query from `answers` (an empty vector otherwise), and
    fails the `failing` ones like a refused connection."""

    def get(url: str, timeout: float) -> bytes:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["query"][0]
        if query in failing:
            raise ConnectionRefusedError(url)
        return answers.get(query, vector())

    return get


async def test_promql_source_gives_each_pool_its_own_latencies() -> None:
    """Where the series label pools, a pool gets its own percentiles (under its version, else
    under none: the orchestrator labels no version) and a pool none labels gets none; a model
    whose series label no pool gives its percentile to each of its pools."""
    long_, spare, other = PoolKey("long", "v1"), PoolKey("spare", "v1"), PoolKey("o", "v1")
    q = PromQLSource(CONFIG, {}).queries
    answers = {
        q.orchestrator_up: vector(({}, "1")),
        q.gateway_up: vector(({}, "1")),
        q.ttft_p90: vector(({"model": "m"}, "3.0"), ({"model": "o"}, "0.7")),
        q.queue_wait_p90: vector(({"model": "m"}, "0.9"), ({"model": "o"}, "0.2")),
        q.ttft_p90_by_pool: vector(
            ({"model": "m", "pool": "short", "model_version": "v1"}, "0.4"),
            ({"model": "m", "pool": "short", "model_version": "v2"}, "0.6"),
            ({"model": "m", "pool": "long", "model_version": "v1"}, "3.5"),
        ),
        q.queue_wait_p90_by_pool: vector(
            ({"model": "m", "pool": "short"}, "0.05"),
            ({"model": "m", "pool": "long"}, "NaN"),
        ),
    }
    pools = {SHORT: "m", long_: "m", spare: "m", other: "o"}
    got = await PromQLSource(CONFIG, pools, answering(answers)).collect(0.0)
    assert (got[SHORT].ttft_p90_s, got[SHORT].queue_wait_p90_s) == (0.4, 0.05)
    assert (got[long_].ttft_p90_s, got[long_].queue_wait_p90_s) == (3.5, None)
    assert (got[spare].ttft_p90_s, got[spare].queue_wait_p90_s) == (None, None)
    assert (got[other].ttft_p90_s, got[other].queue_wait_p90_s) == (0.7, 0.2)


async def test_a_failed_pool_query_leaves_the_pools_latency_unknown() -> None:
    """The per-pool query failing is no sign that no series labels a pool: the pool's TTFT is
    unknown that round, not the model's (which would be the long pool's slow first tokens)."""
    q = PromQLSource(CONFIG, {}).queries
    answers = {
        q.gateway_up: vector(({}, "1")),
        q.ttft_p90: vector(({"model": "m"}, "3.0")),
        q.ttft_p90_by_pool: vector(({"model": "m", "pool": "short"}, "0.4")),
    }
    source = PromQLSource(CONFIG, {SHORT: "m"}, answering(answers))
    assert (await source.collect(0.0))[SHORT].ttft_p90_s == 0.4
    source = PromQLSource(CONFIG, {SHORT: "m"}, answering(answers, failing={q.ttft_p90_by_pool}))
    assert (await source.collect(0.0))[SHORT].ttft_p90_s is None


async def test_promql_source_unreachable_raises_and_the_pools_hold() -> None:
    """Every query failed: the source says so (the core counts it as a source error, for the
    alert, and every pool holds), rather than all-unknown signals read as fresh."""

    def get(url: str, timeout: float) -> bytes:
        raise ConnectionRefusedError(url)

    with pytest.raises(SourceUnavailable, match="all 18 queries failed"):
        await PromQLSource(CONFIG, {SHORT: "m"}, get).collect(0.0)
    errors = REGISTRY.get_sample_value(names.AS_ERRORS, {"stage": "source"}) or 0.0
    core = Autoscaler(AutoscalerSettings(), PromQLSource(CONFIG, {SHORT: "m"}, get))
    assert await core.evaluate() == []  # nothing known of SHORT: not decided
    assert REGISTRY.get_sample_value(names.AS_ERRORS, {"stage": "source"}) == errors + 1


def test_an_empty_engine_selector_still_builds_valid_queries() -> None:
    queries = PromQueries.build(dataclasses.replace(CONFIG, engine_selector=""))
    for q in dataclasses.astuple(queries):
        assert "{," not in q, q
    assert '{request_type="active"}' in queries.engines_reporting
