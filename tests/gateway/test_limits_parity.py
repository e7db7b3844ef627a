"""Every overload refusal reads the same on both fronts of one core: HTTP 429 with Retry-After
and retry-after-ms, gRPC RESOURCE_EXHAUSTED with `retry-after` trailing metadata, the same wait."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from llmmesh.common.errors import (
    RETRY_AFTER_KEY,
    DeadlineExceeded,
    Reason,
    ResourceExhausted,
    ServiceError,
)
from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.gateway.v1 import gateway_pb2_grpc as pb_grpc
from services.gateway.auth import Authenticator, TenantsFile, hash_key
from services.gateway.core import GatewayCore, GenerationRequest, Sampling
from services.gateway.http import OpenAIHttpFront
from services.gateway.models import ServedModel
from services.gateway.servicer import GatewayServicer, add_to_server
from services.gateway.settings import GatewaySettings, ModelSettings
from services.gateway.triton_stream import EngineChunk
from tests.gateway.conftest import MODEL, FakeAdmission, FakeEngine, Hang, chunk

KEY = "sk-acme"


@pytest.fixture(scope="module")
def model(tokenizer_path: Path) -> ServedModel:
    return ServedModel.load(ModelSettings(name=MODEL, tokenizer_path=tokenizer_path))


@dataclass(frozen=True)
class Case:
    name: str
    settings: dict[str, Any]
    tenant: dict[str, Any]
    hold_one: bool  # one stream open while the refused requests are sent
    reject: ServiceError | None = None  # the orchestrator's answer


CASES = [
    Case("gateway streams", {"max_concurrent_streams": 1}, {}, True),
    Case("tenant concurrency", {}, {"max_concurrent_requests": 1}, True),
    Case("tenant requests/min", {}, {"requests_per_minute": 1}, True),
    Case(
        "admission wait bound",
        {"admission_max_wait_s": 2.0},
        {},
        False,
        DeadlineExceeded("no replica slot in time", reason=Reason.QUEUE_TIMEOUT),
    ),
    Case(
        "orchestrator queue full",
        {},
        {},
        False,
        ResourceExhausted("queue full", retry_after_s=2.5),
    ),
]


@contextlib.asynccontextmanager
async def fronts(
    model: ServedModel, case: Case, engine: FakeEngine
) -> AsyncIterator[tuple[GatewayCore, str, str]]:
    settings = GatewaySettings(models=[model.settings], http_port=0, grpc_port=0, **case.settings)
    auth = Authenticator(
        TenantsFile.model_validate(
            {"tenants": [{"name": "acme", "api_keys_sha256": [hash_key(KEY)], **case.tenant}]}
        )
    )
    admission = FakeAdmission(case.reject)
    core = GatewayCore(settings, [model], admission, engine, 32, auth)
    http = OpenAIHttpFront(core, settings)
    await http.start()
    server = grpc.aio.server()
    add_to_server(GatewayServicer(core), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield core, f"http://127.0.0.1:{http.port}", f"127.0.0.1:{port}"
        wait = settings.admission_max_wait_s
        if wait is not None:  # the Admit deadline was the bound, not the request's
            assert admission.timeouts
            assert all(t == wait for t in admission.timeouts)
    finally:
        await server.stop(None)
        await http.stop()
        await core.close()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
async def test_refusal_is_the_same_on_http_and_grpc(model: ServedModel, case: Case) -> None:
    scripts: list[list[EngineChunk | Exception | Hang]] = [[chunk(7), Hang()]]
    scripts += [[chunk(7), chunk(8, final=True)]] * 4
    engine = FakeEngine(scripts)
    async with fronts(model, case, engine) as (core, url, address):
        held = core.generate(
            GenerationRequest(
                model=MODEL, request_id="held", prompt_ids=[1, 2], sampling=Sampling(), api_key=KEY
            ),
            10.0,
        )
        async with contextlib.aclosing(held):
            if case.hold_one:
                await anext(held)  # one stream open, its first token sent
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"{url}/v1/completions",
                    json={"model": MODEL, "prompt": "Hello", "max_tokens": 2, "stream": True},
                    headers={"Authorization": f"Bearer {KEY}"},
                ) as r,
            ):
                assert r.status == 429, await r.text()
                assert (await r.json())["error"]["type"] == "rate_limit_error"
                http_wait_ms = int(r.headers["retry-after-ms"])
                assert int(r.headers["Retry-After"]) == math.ceil(http_wait_ms / 1000)
            async with grpc.aio.insecure_channel(address) as channel:
                call = pb_grpc.GatewayServiceStub(channel).Generate(
                    pb.GenerateRequest(model=MODEL, text="Hello"),
                    metadata=(("authorization", f"Bearer {KEY}"),),
                )
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in call:
                        pass
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                trailers: Any = info.value.trailing_metadata() or ()
                waits = [str(v) for k, v in trailers if k == RETRY_AFTER_KEY]
                grpc_wait_s = float(waits[0])
            assert grpc_wait_s > 0
            # The same estimate on both (each computed at its own refusal).
            assert grpc_wait_s == pytest.approx(http_wait_ms / 1000, rel=0.1, abs=0.01)
