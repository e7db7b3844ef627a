"""The PromQL source: answer parsing (NaN/empty → unknown, malformed → error) and collection over
a fake HTTP API. The real-Prometheus test is in tests/integration."""

from __future__ import annotations

import json

import pytest

from llmmesh.common.topology import PoolKey
from services.autoscaler.promql import PromQLConfig, PromQLError, PromQLSource, parse_vector

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
    }
    import urllib.parse

    def get(url: str, timeout: float) -> bytes:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["query"][0]
        return answers[query]

    got = await PromQLSource(CONFIG, {}, get).collect(0.0)
    short = got[SHORT]
    assert (short.replicas_known, short.reporting_replicas) == (2, 2)
    assert (short.engine_active, short.engine_waiting, short.kv_utilization) == (4.0, 1.0, 0.2)
    assert short.queue_depth == 0.0
    assert short.leases_in_flight == 5.0
    assert short.arrival_rate == 3.0
    assert (short.ttft_p90_s, short.queue_wait_p90_s, short.itl_p90_s) == (None, None, None)
    assert short.prompt_tokens_rate == 30.0
    assert short.completion_tokens_rate == 0.0


async def test_promql_source_unreachable_is_all_unknown() -> None:
    def get(url: str, timeout: float) -> bytes:
        raise ConnectionRefusedError(url)

    got = await PromQLSource(CONFIG, {SHORT: "m"}, get).collect(0.0)
    assert set(got) == {SHORT}
    s = got[SHORT]
    assert (s.arrival_rate, s.engine_active, s.queue_depth) == (None, None, None)
