"""Usage records on real processes: requests in flight when the gateway gets SIGTERM all finish
(the drain) and each leaves exactly one record in the usage log once the process exited."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
import pytest_asyncio

from llmmesh.common import metric_names as names
from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.gateway.v1 import gateway_pb2_grpc as pb_grpc
from llmmesh.localmesh import MODEL_NAME
from services.gateway.auth import hash_key
from tests.integration.conftest import Mesh, gateway_process, metric, start_mesh

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

MODEL = MODEL_NAME
N_HTTP = 6
N_GRPC = 6
MAX_TOKENS = 200


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def umesh(tokenizer_path: Path) -> AsyncIterator[Mesh]:
    m = await start_mesh(tokenizer_path, replicas=1, time_scale=1.0)
    yield m
    await m.close()
    await m.mesh.stop()


async def test_every_request_in_flight_at_sigterm_has_one_record(
    umesh: Mesh, tokenizer_path: Path
) -> None:
    workdir = umesh.mesh.workdir / "gw-usage"
    workdir.mkdir()
    tenants = workdir / "tenants.json"
    tenants.write_text(
        json.dumps({"tenants": [{"name": "acme", "api_keys_sha256": [hash_key("sk-acme")]}]})
    )
    log_path = workdir / "usage" / "usage.jsonl"
    gw = gateway_process(
        umesh,
        workdir,
        tokenizer_path,
        tenants_file=tenants,
        usage_log_path=log_path,
        drain_seconds=60.0,
    )
    await gw.start()
    metrics_url = f"http://127.0.0.1:{gw.metrics_port}/metrics"
    auth = {"Authorization": "Bearer sk-acme"}
    prompt = "Count the records please"
    first_tokens = 0
    all_started = asyncio.Event()

    def started() -> None:
        nonlocal first_tokens
        first_tokens += 1
        if first_tokens == N_HTTP + N_GRPC:
            all_started.set()

    http_ids: list[str] = []

    async def http_one(session: aiohttp.ClientSession, i: int) -> bytes:
        # Half keyed (through the idempotency store), half not (ids made by the gateway).
        body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "stream": True}
        headers = {**auth, "x-request-id": f"usage-http-{i}"} if i % 2 else auth
        async with session.post(
            f"{gw.http_base_url}/v1/completions", json=body, headers=headers
        ) as r:
            assert r.status == 200
            http_ids.append(r.headers["x-request-id"])
            first = await r.content.readline()
            assert first.startswith(b"id: " if i % 2 else b"data: ")
            started()
            return first + await r.content.read()

    async def grpc_one(stub: pb_grpc.GatewayServiceAsyncStub, i: int) -> int:
        req = pb.GenerateRequest(
            model=MODEL,
            text=prompt,
            sampling=pb.SamplingParams(max_tokens=MAX_TOKENS),
            request_id=f"usage-grpc-{i}",
        )
        n = 0
        seen_first = False
        async for msg in stub.Generate(
            req, timeout=120, metadata=(("authorization", "Bearer sk-acme"),)
        ):
            if msg.HasField("delta") and msg.delta.token_ids and not seen_first:
                seen_first = True
                started()
            if msg.HasField("complete"):
                n = msg.complete.usage.completion_tokens
        return n

    async with (
        aiohttp.ClientSession() as session,
        grpc.aio.insecure_channel(gw.address) as channel,
    ):
        stub = pb_grpc.GatewayServiceStub(channel)
        tasks = [asyncio.ensure_future(http_one(session, i)) for i in range(N_HTTP)] + [
            asyncio.ensure_future(grpc_one(stub, i)) for i in range(N_GRPC)
        ]
        # Every request is admitted and streaming; with MAX_TOKENS tokens to go they are still
        # in flight when the signal lands (one finishing first would need its record too).
        await asyncio.wait_for(all_started.wait(), 120)
        in_flight = metric(metrics_url, names.GATEWAY_IN_FLIGHT)
        gw.signal(signal.SIGTERM)
        results = await asyncio.gather(*tasks)
    for raw in results[:N_HTTP]:
        assert isinstance(raw, bytes)
        assert raw.rstrip().endswith(b"data: [DONE]")
    assert results[N_HTTP:] == [MAX_TOKENS] * N_GRPC
    assert gw.proc is not None
    assert await asyncio.wait_for(gw.proc.wait(), 60) == 0

    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    ids = sorted(r["request_id"] for r in records)
    assert ids == sorted(http_ids + [f"usage-grpc-{i}" for i in range(N_GRPC)])
    assert len(set(ids)) == N_HTTP + N_GRPC
    for r in records:
        assert r["tenant"] == "acme"
        assert r["model"] == MODEL
        assert r["outcome"] == "success"
        assert r["prompt_tokens"] > 0
        assert r["completion_tokens"] == MAX_TOKENS
        assert 0 < r["ttft_ms"] <= r["duration_ms"]
        assert r["replica"] == "replica-0"
    print(f"{in_flight:.0f} of {N_HTTP + N_GRPC} requests in flight at SIGTERM")
