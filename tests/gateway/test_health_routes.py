"""The health routes on the OpenAI HTTP port (`GET /health`, `GET /ready`), over a real aiohttp
server on an ephemeral port: status codes routers and balancers act on, bodies, no
authentication, draining."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import aiohttp.test_utils
import pytest
import pytest_asyncio

from services.gateway.admission import AdmissionStatus
from services.gateway.auth import Authenticator, TenantsFile, hash_key
from services.gateway.core import GatewayCore
from services.gateway.errors import OrchestratorUnavailable
from services.gateway.http import OpenAIHttpFront
from services.gateway.models import ServedModel
from services.gateway.settings import GatewaySettings, ModelSettings
from tests.gateway.conftest import MODEL, FakeAdmission, FakeEngine


@pytest.fixture(scope="module")
def model(tokenizer_path: Path) -> ServedModel:
    return ServedModel.load(ModelSettings(name=MODEL, tokenizer_path=tokenizer_path))


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def start(
    model: ServedModel,
    orch: FakeAdmission,
    auth: Authenticator | None = None,
    readiness_timeout_s: float = 1.0,
) -> tuple[OpenAIHttpFront, str]:
    cfg = GatewaySettings(
        models=[model.settings],
        http_port=0,
        drain_seconds=5,
        readiness_timeout_s=readiness_timeout_s,
    )
    front = OpenAIHttpFront(GatewayCore(cfg, [model], orch, FakeEngine([]), 32, auth), cfg)
    await front.start()
    return front, f"http://127.0.0.1:{front.port}"


async def test_health_and_ready_when_a_replica_can_take_a_lease(
    model: ServedModel, session: aiohttp.ClientSession
) -> None:
    orch = FakeAdmission()
    orch.view = AdmissionStatus(replicas=3, ready_replicas=2, queue_depth=4)
    front, url = await start(model, orch)
    try:
        async with session.get(f"{url}/health") as r:
            assert (r.status, await r.json()) == (200, {"status": "ok"})
        async with session.head(f"{url}/health") as r:
            assert r.status == 200
        async with session.get(f"{url}/ready") as r:
            assert r.status == 200
            assert await r.json() == {
                "status": "ready",
                "models": [MODEL],
                "replicas": 3,
                "ready_replicas": 2,
                "queue_depth": 4,
            }
    finally:
        await front.stop()


async def test_not_ready_without_a_ready_replica(
    model: ServedModel, session: aiohttp.ClientSession
) -> None:
    orch = FakeAdmission()
    orch.view = AdmissionStatus(replicas=2, ready_replicas=0, queue_depth=0)
    front, url = await start(model, orch)
    try:
        async with session.get(f"{url}/ready") as r:
            assert r.status == 503
            body = await r.json()
        assert body["status"] == "not_ready"
        assert body["reason"] == "no ready replica (2 known)"
        async with session.get(f"{url}/health") as r:  # liveness does not depend on replicas
            assert r.status == 200
    finally:
        await front.stop()


async def test_not_ready_when_the_orchestrator_is_down_or_slow(
    model: ServedModel, session: aiohttp.ClientSession
) -> None:
    orch = FakeAdmission()
    orch.view = OrchestratorUnavailable("orchestrator: UNAVAILABLE: connection refused")
    front, url = await start(model, orch, readiness_timeout_s=0.05)
    try:
        async with session.get(f"{url}/ready") as r:
            assert r.status == 503
            body = await r.json()
        assert body["reason"].startswith("orchestrator unreachable: orchestrator: UNAVAILABLE")
        assert "ready_replicas" not in body
        orch.view = AdmissionStatus(1, 1, 0)
        orch.status_gate = asyncio.Event()  # never set: the orchestrator does not answer
        async with session.get(f"{url}/ready") as r:
            assert r.status == 503
            assert (await r.json())["reason"].startswith("orchestrator unreachable")
    finally:
        await front.stop()


async def test_health_routes_need_no_api_key(
    model: ServedModel, session: aiohttp.ClientSession
) -> None:
    tenants = TenantsFile.model_validate(
        {"tenants": [{"name": "t", "api_keys_sha256": [hash_key("sk-1")]}]}
    )
    front, url = await start(model, FakeAdmission(), Authenticator(tenants))
    try:
        async with session.get(f"{url}/v1/models") as r:
            assert r.status == 401
        for route in ("/health", "/ready"):
            async with session.get(f"{url}{route}") as r:
                assert r.status == 200, route
    finally:
        await front.stop()


async def test_draining_gateway_answers_503(
    model: ServedModel, session: aiohttp.ClientSession
) -> None:
    orch = FakeAdmission()
    front, _ = await start(model, orch)
    app = front.app()  # the handlers, without the listening socket that stop() closes
    await front.stop()
    client_server = aiohttp.test_utils.TestServer(app, port=0)
    async with aiohttp.test_utils.TestClient(client_server) as client:
        for route in ("/health", "/ready"):
            r = await client.get(route)
            assert (r.status, await r.json()) == (503, {"status": "draining"}), route
