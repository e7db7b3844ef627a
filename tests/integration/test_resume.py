"""Client request ids as idempotency keys, through a real mesh (tritonserver + services):
disconnect and resume from an offset, retry after the finish, conflicting bodies, tenants kept
apart, retention expiry. "The engine ran once" is the orchestrator's decision count."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
import pytest_asyncio

from llmmesh.common import metric_names as names
from llmmesh.emulator.settings import EmulatorSettings
from llmmesh.emulator.tokens import expected_output_ids
from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.gateway.v1 import gateway_pb2_grpc as pb_grpc
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as orch_pb
from llmmesh.localmesh import MODEL_NAME, ServiceProcess
from services.gateway.auth import hash_key
from services.gateway.models import ServedModel
from services.gateway.settings import ModelSettings
from tests.integration.conftest import Mesh, eventually, gateway_process, metric, start_mesh

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

MODEL = MODEL_NAME
ALPHA = (("authorization", "Bearer sk-alpha"),)
BETA = (("authorization", "Bearer sk-beta"),)
PROMPT = list(range(2000, 2032))


def tenants_file(path: Path) -> Path:
    path.write_text(
        json.dumps(
            {
                "tenants": [
                    {"name": "alpha", "api_keys_sha256": [hash_key("sk-alpha")]},
                    {"name": "beta", "api_keys_sha256": [hash_key("sk-beta")]},
                ]
            }
        )
    )
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def rmesh(
    tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    tenants = tenants_file(tmp_path_factory.mktemp("resume") / "tenants.json")
    m = await start_mesh(
        tokenizer_path,
        replicas=1,
        time_scale=1.0,
        extra_env={
            "LLMMESH_GATEWAY_TENANTS_FILE": str(tenants),
            # Long enough never to expire within the module: expiry has its own gateway.
            "LLMMESH_GATEWAY_RESUME_RETENTION_S": "600",
            "LLMMESH_GATEWAY_RESUME_GRACE_S": "600",
        },
    )
    yield m
    await m.close()
    await m.mesh.stop()


@pytest.fixture(scope="module")
def model(tokenizer_path: Path) -> ServedModel:
    return ServedModel.load(ModelSettings(name=MODEL, tokenizer_path=tokenizer_path))


def decisions(mesh: Mesh) -> float:
    url = f"http://127.0.0.1:{mesh.mesh.services['orchestrator'].metrics_port}/metrics"
    return metric(url, names.ORCH_DECISIONS)


def resume_metric(mesh: Mesh, result: str) -> float:
    url = f"http://127.0.0.1:{mesh.mesh.services['gateway'].metrics_port}/metrics"
    return metric(url, names.GATEWAY_RESUME_REQUESTS, result=result)


def request(
    request_id: str, n: int, seed: int, resume_from: int | None = None
) -> pb.GenerateRequest:
    req = pb.GenerateRequest(
        model=MODEL,
        token_ids=pb.TokenIds(ids=PROMPT),
        sampling=pb.SamplingParams(max_tokens=n, seed=seed),
        request_id=request_id,
    )
    if resume_from is not None:
        req.resume_from = resume_from
    return req


def tokens(msgs: list[pb.GenerateResponse]) -> list[int]:
    return [t for m in msgs if m.HasField("delta") for t in m.delta.token_ids]


async def collect(
    stub: pb_grpc.GatewayServiceAsyncStub,
    req: pb.GenerateRequest,
    metadata: tuple[tuple[str, str], ...] = ALPHA,
) -> list[pb.GenerateResponse]:
    return [m async for m in stub.Generate(req, timeout=120, metadata=metadata)]


async def read_then_disconnect(
    stub: pb_grpc.GatewayServiceAsyncStub, req: pb.GenerateRequest, at_least: int
) -> list[pb.GenerateResponse]:
    call = stub.Generate(req, timeout=120, metadata=ALPHA)
    got: list[pb.GenerateResponse] = []
    async for msg in call:
        got.append(msg)
        if len(tokens(got)) >= at_least:
            break
    call.cancel()
    return got


async def test_disconnect_then_resume_gives_exactly_the_rest_and_the_engine_ran_once(
    rmesh: Mesh,
) -> None:
    n, seed = 120, 11
    before = decisions(rmesh)
    first = await read_then_disconnect(rmesh.gateway, request("resume-grpc", n, seed), 5)
    k = len(tokens(first))
    assert 5 <= k < n
    assert first[-1].delta.offset + len(first[-1].delta.token_ids) == k
    rest = await collect(rmesh.gateway, request("resume-grpc", n, seed, resume_from=k))
    deltas = [m.delta for m in rest if m.HasField("delta")]
    assert deltas[0].offset == k
    assert tokens(first) + tokens(rest) == expected_output_ids(seed, PROMPT, n, EmulatorSettings())
    assert rest[-1].complete.usage.completion_tokens == n
    assert all(m.request_id == "resume-grpc" for m in rest)
    assert decisions(rmesh) == before + 1


async def test_retry_after_finish_replays_without_generating(rmesh: Mesh) -> None:
    n, seed = 16, 12
    before = decisions(rmesh)
    replayed = resume_metric(rmesh, "replayed")
    full = await collect(rmesh.gateway, request("resume-done", n, seed))
    again = await collect(rmesh.gateway, request("resume-done", n, seed))
    assert again == full
    k = full[2].delta.offset + len(full[2].delta.token_ids)
    tail = await collect(rmesh.gateway, request("resume-done", n, seed, resume_from=k))
    assert tokens(full)[k:] == tokens(tail)
    assert tail[-1] == full[-1]
    assert decisions(rmesh) == before + 1
    assert resume_metric(rmesh, "replayed") == replayed + 2


async def test_same_id_different_body_is_a_conflict(rmesh: Mesh) -> None:
    await collect(rmesh.gateway, request("resume-conflict", 4, 13))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(rmesh.gateway, request("resume-conflict", 5, 13))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "request_id" in (info.value.details() or "")
    base = rmesh.mesh.services["gateway"].http_base_url
    body = {"model": MODEL, "prompt": "different", "max_tokens": 4}
    headers = {"Authorization": "Bearer sk-alpha", "x-request-id": "resume-conflict"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{base}/v1/completions", json=body, headers=headers) as r,
    ):
        assert r.status == 409
        err = (await r.json())["error"]
    assert err["code"] == "request_id_conflict"
    assert err["param"] == "x-request-id"


async def test_another_tenant_cannot_attach(rmesh: Mesh) -> None:
    n, seed = 12, 14
    mine = await collect(rmesh.gateway, request("resume-tenant", n, seed), ALPHA)
    k = len(tokens(mine[:2]))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(rmesh.gateway, request("resume-tenant", n, seed, resume_from=k), BETA)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # The same id and body from the other tenant is that tenant's own, new generation.
    before = decisions(rmesh)
    theirs = await collect(rmesh.gateway, request("resume-tenant", n, seed), BETA)
    assert decisions(rmesh) == before + 1
    assert tokens(theirs) == tokens(mine)  # same seed, same emulator: same tokens


async def test_resume_needs_a_request_id_and_a_delta_boundary(rmesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(rmesh.gateway, request("", 4, 15, resume_from=0))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    full = await collect(rmesh.gateway, request("resume-bad-offset", 4, 15))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(rmesh.gateway, request("resume-bad-offset", 4, 15, resume_from=99))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "resume_from" in (info.value.details() or "")
    assert full[-1].complete.usage.completion_tokens == 4


# -- HTTP: SSE event ids and Last-Event-ID ------------------------------------------------


async def read_sse(
    resp: aiohttp.ClientResponse, stop_after_ids: int | None = None
) -> list[tuple[str | None, str]]:
    """(id, data) per event; stops after `stop_after_ids` events with an id when given."""
    events: list[tuple[str | None, str]] = []
    event_id: str | None = None
    while True:
        line = (await resp.content.readline()).decode()
        if not line:
            return events
        line = line.rstrip("\n")
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            events.append((event_id, line[6:]))
            event_id = None
            if (
                stop_after_ids is not None
                and sum(e[0] is not None for e in events) >= stop_after_ids
            ):
                return events


def text_of(events: list[tuple[str | None, str]]) -> str:
    out = []
    for _, data in events:
        if data == "[DONE]":
            continue
        for choice in json.loads(data)["choices"]:
            out.append(choice["text"])
    return "".join(out)


async def test_sse_resume_with_last_event_id(rmesh: Mesh, model: ServedModel) -> None:
    base = rmesh.mesh.services["gateway"].http_base_url
    n, seed = 80, 16
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": n, "seed": seed, "stream": True}
    headers = {"Authorization": "Bearer sk-alpha", "x-request-id": "resume-sse"}
    before = decisions(rmesh)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/v1/completions", json=body, headers=headers) as r:
            assert r.status == 200
            first = await read_sse(r, stop_after_ids=4)
        last_id = first[-1][0]
        assert last_id is not None
        resumed_headers = {**headers, "Last-Event-ID": last_id}
        async with s.post(f"{base}/v1/completions", json=body, headers=resumed_headers) as r:
            assert r.status == 200
            rest = await read_sse(r)
        assert rest[-1] == (None, "[DONE]")
        # An event id is the token offset reached, "offset.k" for the k-th event without
        # tokens after it (the closing chunks): increasing, one per event.
        ids = [(*map(int, i.split(".")), 0) for i, _ in rest if i is not None]
        assert ids == sorted(ids)
        assert len(set(ids)) == len(ids)
        assert ids[0] > (int(last_id), 0)
        assert ids[-1][:2] == (n, 1)
        expected = model.decode(expected_output_ids(seed, PROMPT, n, EmulatorSettings()))
        assert text_of(first) + text_of(rest) == expected
        # Non-streaming retry of the same request: the same completion.
        # Idempotency-Key names the same key; stream is not part of the request identity.
        plain = {**body, "stream": False}
        idem = {"Authorization": "Bearer sk-alpha", "Idempotency-Key": "resume-sse"}
        async with s.post(f"{base}/v1/completions", json=plain, headers=idem) as r:
            assert r.status == 200
            assert r.headers["x-request-id"] == "resume-sse"
            done = await r.json()
    assert done["choices"][0]["text"] == expected
    assert done["usage"]["completion_tokens"] == n
    assert decisions(rmesh) == before + 1


# -- retention expiry and the grace period: a gateway that keeps nothing -------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def forgetful_gateway(rmesh: Mesh, tokenizer_path: Path) -> AsyncIterator[ServiceProcess]:
    workdir = rmesh.mesh.workdir / "gw-forgetful"
    workdir.mkdir()
    gw = gateway_process(
        rmesh,
        workdir,
        tokenizer_path,
        resume_retention_s=0.0,
        resume_grace_s=0.0,
        drain_seconds=5.0,
    )
    await gw.start()
    yield gw
    await gw.stop()


async def test_after_retention_a_retry_generates_afresh_and_a_resume_is_not_found(
    rmesh: Mesh, forgetful_gateway: ServiceProcess
) -> None:
    async with grpc.aio.insecure_channel(forgetful_gateway.address) as ch:
        stub = pb_grpc.GatewayServiceStub(ch)
        before = decisions(rmesh)
        full = await collect(stub, request("expiring", 8, 17), ())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(stub, request("expiring", 8, 17, resume_from=2), ())
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        again = await collect(stub, request("expiring", 8, 17), ())
        assert tokens(again) == tokens(full)
        assert decisions(rmesh) == before + 2


async def test_keyed_stream_abandoned_past_the_grace_is_cancelled(
    rmesh: Mesh, forgetful_gateway: ServiceProcess
) -> None:
    url = f"http://127.0.0.1:{forgetful_gateway.metrics_port}/metrics"
    async with grpc.aio.insecure_channel(forgetful_gateway.address) as ch:
        stub = pb_grpc.GatewayServiceStub(ch)
        call = stub.Generate(request("abandoned", 2000, 18), timeout=120)
        async for msg in call:
            if msg.HasField("delta") and msg.delta.token_ids:
                break
        call.cancel()

    async def released() -> bool:
        resp = await rmesh.orchestrator.ListReplicas(orch_pb.ListReplicasRequest(), timeout=5)
        return all(r.in_flight == 0 for r in resp.replicas)

    await eventually(released, what="the abandoned generation's lease is completed")

    async def counted() -> bool:
        return (
            metric(url, names.GATEWAY_REQUESTS, outcome="cancelled") == 1
            and metric(url, names.GATEWAY_RESUME_EVICTIONS, reason="abandoned") == 1
        )

    await eventually(counted, what="counted as cancelled and abandoned")
