"""Tenant rate limits shared by two gateways through one real redis-server (limits_redis.py):
the tenant's quota holds across both, completion tokens charged on one count on the other, and
with Redis down each gateway falls back to its share of the limit."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from llmmesh.common import metric_names as names
from llmmesh.common.errors import ServiceError
from llmmesh.redis_server import RedisServer
from services.gateway.auth import Authenticator, hash_key
from services.gateway.core import Completion, GatewayCore, GenerationRequest, Sampling
from services.gateway.errors import RateLimited
from services.gateway.limits_redis import RedisLimiter
from services.gateway.models import ServedModel
from services.gateway.settings import GatewaySettings, ModelSettings
from tests.gateway.conftest import MODEL, FakeAdmission, FakeEngine, chunk

KEY = "sk-acme"


@pytest.fixture(scope="module")
def model(tokenizer_path: Path) -> ServedModel:
    return ServedModel.load(ModelSettings(name=MODEL, tokenizer_path=tokenizer_path))


class Gateway:
    def __init__(self, core: GatewayCore, auth: Authenticator) -> None:
        self.core = core
        self.auth = auth

    async def generate(self, n: int = 0) -> int | ServiceError:
        """Completion tokens of one request with a 4-token prompt, or its refusal."""
        req = GenerationRequest(
            model=MODEL,
            request_id=f"r{n}",
            prompt_ids=[1, 2, 3, 4],
            sampling=Sampling(max_tokens=8),
            api_key=KEY,
        )
        done: int | None = None
        try:
            async with contextlib.aclosing(self.core.generate(req, 10.0)) as events:
                async for ev in events:
                    if isinstance(ev, Completion):
                        done = ev.completion_tokens
        except ServiceError as err:
            return err
        assert done is not None
        return done


@pytest_asyncio.fixture
async def gateways(
    model: ServedModel, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[tuple[Gateway, Gateway]]:
    """Two gateways (each its own core, authenticator and Redis connection) sharing tenant
    acme's limits: 6 requests/min, 60 tokens/min; fallback share 1/2 each."""
    async with aioredis.Redis.from_url(redis_server.url) as r:
        await r.flushall()
    tenants = tmp_path / "tenants.json"
    tenants.write_text(
        json.dumps(
            {
                "tenants": [
                    {
                        "name": "acme",
                        "requests_per_minute": 6,
                        "tokens_per_minute": 60,
                        "api_keys_sha256": [hash_key(KEY)],
                    }
                ]
            }
        )
    )
    settings = GatewaySettings(
        models=[model.settings],
        tenants_file=tenants,
        limits_redis_url=redis_server.url,
        limits_gateways=2,
        limits_redis_flush_s=0.01,
        limits_redis_retry_s=60,
    )
    out = []
    for _ in range(2):
        auth = Authenticator.from_settings(settings)
        assert auth is not None
        assert auth.shared is not None
        engine = FakeEngine([[chunk(7), chunk(8, final=True)]] * 20)
        out.append(Gateway(GatewayCore(settings, [model], FakeAdmission(), engine, 32, auth), auth))
    try:
        yield out[0], out[1]
    finally:
        for g in out:
            await g.core.close()


async def test_two_gateways_share_one_request_quota(gateways: tuple[Gateway, Gateway]) -> None:
    a, b = gateways
    results = [await (a if i % 2 else b).generate(i) for i in range(6)]
    assert results == [2] * 6  # 6 requests/min between them, not 6 each
    for g in (a, b):
        refused = await g.generate()
        assert isinstance(refused, RateLimited)
        assert refused.limit == "requests"
        assert refused.retry_after_s is not None
        assert 5 < refused.retry_after_s <= 10
    assert a.auth.shared is not None
    assert a.auth.shared.errors == 0


async def test_completion_tokens_charged_on_one_gateway_count_on_the_other(
    gateways: tuple[Gateway, Gateway],
) -> None:
    a, b = gateways
    tenant = a.auth.tenants["acme"].limits
    assert await a.generate() == 2  # 4 prompt + 2 completion tokens
    tenant.charge(53)  # a long completion streamed through a: 59 of 60 used
    assert a.auth.shared is not None
    await a.auth.shared.flush()
    refused = await b.generate()  # 4 more prompt tokens do not fit any more
    assert isinstance(refused, RateLimited)
    assert refused.limit == "tokens"
    assert refused.snapshot is not None
    assert refused.snapshot.tokens is not None
    assert refused.snapshot.tokens.remaining < 4


def _counter(name: str, op: str) -> float:
    return REGISTRY.get_sample_value(name, {"op": op}) or 0.0


async def test_redis_down_each_gateway_enforces_its_share(
    gateways: tuple[Gateway, Gateway], redis_server: RedisServer
) -> None:
    a, b = gateways
    errors = _counter(names.GATEWAY_RATE_LIMIT_REDIS_ERRORS, "admit")
    fallback = _counter(names.GATEWAY_RATE_LIMIT_FALLBACK, "admit")
    charged_locally = _counter(names.GATEWAY_RATE_LIMIT_FALLBACK, "charge")
    redis_server.kill()
    try:
        for g in (a, b):
            served = [await g.generate(i) for i in range(3)]
            assert served == [2, 2, 2]  # half of 6/min: the local share, the same fail-safe total
            refused = await g.generate()
            assert isinstance(refused, RateLimited)
            assert g.auth.shared is not None
            assert g.auth.shared.errors == 1
        # One failed call per gateway opened its retry window; every admission (3 served and
        # 1 refused per gateway) was the local share's, as were the completion tokens.
        errors_now = _counter(names.GATEWAY_RATE_LIMIT_REDIS_ERRORS, "admit")
        assert errors_now - errors == 2
        fallback_now = _counter(names.GATEWAY_RATE_LIMIT_FALLBACK, "admit")
        assert fallback_now - fallback == 8
        assert _counter(names.GATEWAY_RATE_LIMIT_FALLBACK, "charge") > charged_locally
    finally:
        await redis_server.start()


async def test_closing_mid_flush_loses_no_charge(gateways: tuple[Gateway, Gateway]) -> None:
    """close() cancelled the writer; a flush in progress lost the batch it had taken."""
    a, b = gateways
    limiter = a.auth.shared
    assert limiter is not None
    tenant = a.auth.tenants["acme"].limits
    run = limiter._run
    in_flight = asyncio.Event()
    release = asyncio.Event()

    async def held_run(*args: Any, **kw: Any) -> Any:
        in_flight.set()
        await release.wait()
        return await run(*args, **kw)

    limiter._run = held_run  # type: ignore[method-assign]
    tenant.charge(59)  # a long completion: 59 of acme's 60 tokens/min
    await asyncio.wait_for(in_flight.wait(), 5)  # the writer's flush took it
    closing = asyncio.ensure_future(limiter.close())
    await asyncio.sleep(0)  # close() has cancelled the writer
    release.set()
    await asyncio.wait_for(closing, 5)
    refused = await b.generate()  # 4 prompt tokens no longer fit on the other gateway
    assert isinstance(refused, RateLimited)
    assert refused.limit == "tokens"


async def test_completion_tokens_a_failed_write_held_go_to_the_local_buckets(
    gateways: tuple[Gateway, Gateway], redis_server: RedisServer
) -> None:
    """Charges queued while Redis was up and written after it went down are not lost: the
    write fails, and its completion tokens go to the tenant's local share (30 tokens/min);
    its refunds are dropped."""
    a, _ = gateways
    limiter = a.auth.shared
    assert limiter is not None
    tenant = a.auth.tenants["acme"].limits
    assert tenant.tokens is not None
    limiter._flush_s = 3600  # the test writes the queue itself
    assert tenant.shared is not None
    assert tenant.shared.refund(4)  # queued while Redis is up
    tenant.charge(27)
    tenant.charge(2)
    local = tenant.tokens.level()
    redis_server.kill()
    try:
        await limiter.flush()
        assert limiter.errors == 1
        # 29 taken; the share refills 0.5 tokens/s meanwhile (up to 2 s of a busy machine)
        assert local - tenant.tokens.level() == pytest.approx(29, abs=1.0)
        refused = await a.generate()  # 4 prompt tokens: 1 of 30 left locally
        assert isinstance(refused, RateLimited)
        assert refused.limit == "tokens"
    finally:
        await redis_server.start()


async def test_a_burst_of_admissions_beyond_the_pool_waits_for_connections(
    redis_server: RedisServer,
) -> None:
    """More admissions at once than the client's pool holds wait for a connection instead of
    failing: redis-py's default pool failed every call past 100 in use, and the limiter then
    fell back to its local share as if Redis were down. The connections stay within the bound."""
    limiter = RedisLimiter.from_url(
        redis_server.url, timeout_s=5.0, retry_s=60.0, flush_s=0.01, max_connections=4
    )
    quota = limiter.quota("burst", 1_000_000, 1_000_000_000)
    try:
        admitted = await asyncio.gather(*(quota.admit(1) for _ in range(300)))
        assert all(admitted)
        assert limiter.errors == 0
        async with aioredis.Redis.from_url(redis_server.url) as r:
            clients = await r.client_list()
        # This probe's connection and the limiter's, at most 4.
        assert 2 <= len(clients) <= 5, clients
    finally:
        await limiter.close()
