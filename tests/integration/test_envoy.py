"""The Istio data path rehearsed on a real Envoy (llmmesh.envoymesh, `make run MESH=envoy`): one
mesh for the module, configured from the dev overlay (80/20 canary, every generation mirrored),
two v1 gateway pods, one v2, the shadow; the gateway -> Triton streams through the outbound
Envoy and the Triton pods' sidecars. Requests enter at the ingress Envoy."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
import pytest_asyncio

from llmmesh.common import metric_names as names
from llmmesh.envoymesh.plane import EnvoyDataPlane, EnvoyOptions
from llmmesh.envoymesh.translate import cluster_name
from llmmesh.generated.gateway.v1 import gateway_pb2 as pb
from llmmesh.generated.gateway.v1 import gateway_pb2_grpc
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as opb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2_grpc
from llmmesh.localmesh import MODEL_NAME, LocalMesh, MeshOptions
from tests.integration.conftest import eventually, metric

pytestmark = pytest.mark.integration

# Every ingress route's stream idle timeout here (Envoy's default, which Istio keeps, is 300 s).
IDLE_S = 1.0
CANARY = (("x-llmmesh-canary", "always"),)
# v2 refuses a third concurrent stream (RESOURCE_EXHAUSTED with retry-after).
V2_MAX_STREAMS = 2


class EnvoyMesh:
    def __init__(self, mesh: LocalMesh, plane: EnvoyDataPlane):
        self.mesh = mesh
        self.plane = plane
        self.ingress = f"127.0.0.1:{plane.ingress_port}"
        self.channel = grpc.aio.insecure_channel(self.ingress)
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)

    async def completed(self, pod: str, port: int) -> int:
        """Requests the pod's sidecar passed to its gateway on `port`."""
        name = f"http.inbound_{port}.downstream_rq_completed"
        return (await self.plane.sidecars[pod].stats(name)).get(name, 0)

    async def counts(self, port: int) -> dict[str, int]:
        return {pod: await self.completed(pod, port) for pod in self.plane.gateways}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def em(tokenizer_path: Path) -> AsyncIterator[EnvoyMesh]:
    plane = EnvoyDataPlane(
        EnvoyOptions(
            gateway_pods={"v1": 2, "v2": 1},
            route_idle_timeout_s=IDLE_S,
            gateway_env={
                "gateway-v2-0": {"LLMMESH_GATEWAY_MAX_CONCURRENT_STREAMS": str(V2_MAX_STREAMS)}
            },
        ),
        datetime.datetime.now(datetime.UTC),
    )
    mesh = LocalMesh(
        MeshOptions(
            tokenizer_path=tokenizer_path,
            replicas=2,
            data_plane=plane,
            extra_env=plane.mesh_gateway_env(),
        )
    )
    try:
        await mesh.start()
    except BaseException:
        for svc in mesh.services.values():
            print(f"--- {svc.name} log ---\n{svc.log_tail()}")
        for proxy in plane.processes():
            print(f"--- envoy {proxy.name} ---\n{proxy.log_tail()}")
        await mesh.stop()
        raise
    em = EnvoyMesh(mesh, plane)
    async with grpc.aio.insecure_channel(mesh.services["orchestrator"].address) as ch:
        orch = orchestrator_pb2_grpc.OrchestratorServiceStub(ch)

        async def both_ready() -> bool:
            resp = await orch.ListReplicas(opb.ListReplicasRequest(), timeout=5)
            return sum(r.healthy for r in resp.replicas) == 2

        await eventually(both_ready, 60, "both replicas ready through their sidecars")
    yield em
    await em.channel.close(None)
    await mesh.stop()


def request(max_tokens: int = 1, text: str = "hello") -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=MODEL_NAME, text=text, sampling=pb.SamplingParams(max_tokens=max_tokens)
    )


def weights(em: EnvoyMesh, route: str) -> dict[str, int]:
    vs = em.plane.manifests.virtual_service("llmmesh-gateway")
    (http,) = [h for h in vs["spec"]["http"] if h["name"] == route]
    return {d["destination"]["subset"]: int(d.get("weight", 0)) for d in http["route"]}


async def test_weighted_split_within_3_points_over_2000_requests(em: EnvoyMesh) -> None:
    expected = weights(em, "openai-unary")["v2"] / 100
    before = await em.counts(8080)
    url = f"http://{em.ingress}/v1/models"
    statuses: list[int] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as session:

        async def one() -> None:
            async with session.get(url) as resp:
                await resp.read()
                statuses.append(resp.status)

        for _ in range(2000 // 200):
            await asyncio.gather(*(one() for _ in range(200)))
    after = await em.counts(8080)
    delta = {pod: after[pod] - before[pod] for pod in after}
    assert statuses == [200] * 2000
    assert delta["gateway-shadow"] == 0  # /v1/models is not mirrored
    v2 = delta["gateway-v2-0"]
    assert v2 + delta["gateway-v1-0"] + delta["gateway-v1-1"] == 2000
    share = v2 / 2000
    print(f"v2 share {share:.4f} (configured {expected})")
    assert abs(share - expected) <= 0.03
    assert delta["gateway-v1-0"] > 0
    assert delta["gateway-v1-1"] > 0  # both v1 pods balanced


async def test_canary_header_always_reaches_v2_and_is_not_mirrored(em: EnvoyMesh) -> None:
    before_http, before_grpc = await em.counts(8080), await em.counts(50051)
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            async with session.get(f"http://{em.ingress}/v1/models", headers=dict(CANARY)) as r:
                assert r.status == 200
    replicas = set()
    for _ in range(5):
        msgs = [m async for m in em.stub.Generate(request(2), metadata=CANARY, timeout=30)]
        replicas.add(msgs[-1].complete.replica_id)
    after_http, after_grpc = await em.counts(8080), await em.counts(50051)
    assert {p: after_http[p] - before_http[p] for p in after_http} == {
        "gateway-v1-0": 0,
        "gateway-v1-1": 0,
        "gateway-v2-0": 20,
        "gateway-shadow": 0,
    }
    assert {p: after_grpc[p] - before_grpc[p] for p in after_grpc} == {
        "gateway-v1-0": 0,
        "gateway-v1-1": 0,
        "gateway-v2-0": 5,
        "gateway-shadow": 0,
    }
    assert replicas == {"replica-1"}  # the v2 replica (EnvoyOptions.replica_versions)


async def test_mirrored_copies_reach_the_shadow_never_the_client(em: EnvoyMesh) -> None:
    shadow = em.mesh.services["gateway-shadow"]
    assert shadow.settings.shadow  # type: ignore[attr-defined]  # admits as PRIORITY_BATCH
    served = metric(shadow.metrics_url, names.GATEWAY_REQUESTS, outcome="success")
    before = await em.completed("gateway-shadow", 50051)
    n, tokens = 10, 3
    for _ in range(n):
        msgs = [m async for m in em.stub.Generate(request(tokens), timeout=30)]
        # One generation per call: contiguous offsets, one completion, from a serving replica.
        deltas = [m.delta for m in msgs if m.HasField("delta")]
        assert [d.offset for d in deltas] == list(range(tokens))
        assert [m.HasField("complete") for m in msgs].count(True) == 1
        assert msgs[-1].complete.usage.completion_tokens == tokens

    async def shadow_completed() -> bool:
        # Envoy sends each copy without waiting for it: it may complete after the original.
        return await em.completed("gateway-shadow", 50051) - before >= n

    await eventually(shadow_completed, 15, "the shadow's sidecar completed every copy")
    assert await em.completed("gateway-shadow", 50051) - before == n

    async def shadow_served() -> bool:
        return metric(shadow.metrics_url, names.GATEWAY_REQUESTS, outcome="success") >= served + n

    await eventually(shadow_served, 15, "the shadow gateway served every copy")
    stats = await em.plane.ingress.stats(cluster_name(shadow_host(em), 50051))  # type: ignore[union-attr]
    assert stats[f"cluster.{cluster_name(shadow_host(em), 50051)}.upstream_rq_200"] >= n


def shadow_host(em: EnvoyMesh) -> str:
    return next(p.host for p in em.plane.gateway_pods if p.name == "gateway-shadow")


async def test_plaintext_and_certificateless_clients_are_refused(em: EnvoyMesh) -> None:
    pod = next(p for p in em.plane.gateway_pods if p.name == "gateway-v1-0")
    grpc_port, http_port = pod.inbound_ports[50051], pod.inbound_ports[8080]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gateway_pb2_grpc.GatewayServiceStub(ch).ListModels(
                pb.ListModelsRequest(), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"http://127.0.0.1:{http_port}/v1/models") as r:
                await r.read()
    ca = em.plane.ca
    no_cert = ssl.create_default_context(cafile=str(ca.root_cert))
    no_cert.check_hostname = False  # mesh certificates name a SPIFFE URI, no host
    with_cert = ssl.create_default_context(cafile=str(ca.root_cert))
    with_cert.check_hostname = False
    me = ca.identity("istio-system", "istio-ingressgateway-service-account")
    with_cert.load_cert_chain(me.cert, me.key)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"https://127.0.0.1:{http_port}/v1/models", ssl=no_cert) as r:
                await r.read()
        # The control: a mesh identity gets through.
        async with session.get(f"https://127.0.0.1:{http_port}/v1/models", ssl=with_cert) as r:
            assert r.status == 200


async def test_grpc_status_trailers_and_retry_after_pass_through(em: EnvoyMesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in em.stub.Generate(pb.GenerateRequest(model=MODEL_NAME), timeout=10):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in (err.value.details() or "")
    # Fill v2's stream slots (canary header), then one more: refused with a retry-after.
    held = [
        em.stub.Generate(request(1000), metadata=CANARY, timeout=60) for _ in range(V2_MAX_STREAMS)
    ]
    try:
        for call in held:
            await call.read()  # the first token: admitted and streaming
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in em.stub.Generate(request(2), metadata=CANARY, timeout=10):
                pass
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers: dict[str, str] = dict(err.value.trailing_metadata() or ())  # type: ignore[arg-type]
        assert float(trailers["retry-after"]) > 0
    finally:
        for call in held:
            call.cancel()


async def _sse(
    session: aiohttp.ClientSession, base: str, tokens: int, headers: dict[str, str]
) -> tuple[float, float]:
    """(time to the first SSE event, time to the end) of a streamed completion."""
    start = time.perf_counter()
    first = 0.0
    body = {"model": MODEL_NAME, "prompt": "hello", "max_tokens": tokens, "stream": True}
    async with session.post(f"{base}/v1/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
        async for _ in resp.content:
            if not first:
                first = time.perf_counter() - start
    return first, time.perf_counter() - start


async def test_sse_is_not_buffered(em: EnvoyMesh) -> None:
    direct = em.mesh.services["gateway"].http_base_url  # the v1-0 pod's process itself
    via: list[tuple[float, float]] = []
    plain: list[tuple[float, float]] = []
    async with aiohttp.ClientSession() as session:
        for _ in range(6):  # alternated, so load drift hits both alike
            plain.append(await _sse(session, direct, 40, {}))
            # The header route: v2, not mirrored (a copy would load the shared CPUs).
            via.append(await _sse(session, f"http://{em.ingress}", 40, dict(CANARY)))
    ttft_via = sorted(f for f, _ in via)[len(via) // 2]
    ttft_plain = sorted(f for f, _ in plain)[len(plain) // 2]
    print(f"TTFT median direct {ttft_plain * 1e3:.1f} ms, through Envoy {ttft_via * 1e3:.1f} ms")
    # Streamed, not buffered: the first event arrives long before the stream ends.
    for first, total in via:
        assert first < total / 2
    assert ttft_via - ttft_plain < 0.025


async def test_stream_longer_than_the_idle_timeout_is_not_cut(em: EnvoyMesh) -> None:
    start = time.perf_counter()
    msgs = [m async for m in em.stub.Generate(request(450), timeout=60)]
    elapsed = time.perf_counter() - start
    assert msgs[-1].complete.usage.completion_tokens == 450
    assert elapsed > 2 * IDLE_S, f"the stream took {elapsed:.2f} s: not longer than the timeout"
    # The control: a request that stalls (headers, then no body) is cut after the idle timeout.
    host, port = em.ingress.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 10 * IDLE_S)
        assert status.split()[1] == b"408"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def host_stat(em: EnvoyMesh, cluster: str, port: int, stat: str) -> str:
    """One per-host value of the ingress's /clusters (e.g. cx_active, health_flags)."""
    assert em.plane.ingress is not None
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{em.plane.ingress.admin}/clusters") as resp,
    ):
        text = await resp.text()
    key = f"{cluster}::127.0.0.1:{port}::{stat}::"
    return next(line[len(key) :] for line in text.splitlines() if line.startswith(key))


async def test_outlier_detection_ejects_a_dead_gateway_pod(em: EnvoyMesh) -> None:
    """Near the end: it kills a pod's sidecar, left dead (not supervised from then on). The
    gateway DestinationRule ejects on local-origin failures only (5xx ejection off), so the
    failing pod is one whose connections are refused."""
    assert em.plane.ingress is not None
    cluster = cluster_name(em.plane.gateway_host, 8080, "v1")
    dead = next(p for p in em.plane.gateway_pods if p.name == "gateway-v1-1")
    port = dead.inbound_ports[8080]
    em.mesh.supervisor.unwatch("envoy gateway-v1-1")
    em.plane.sidecars["gateway-v1-1"].kill()

    async def pool_emptied() -> bool:
        return await host_stat(em, cluster, port, "cx_active") == "0"

    # The ingress has seen its pooled connections to the pod close: what follows are refusals.
    await eventually(pool_emptied, 10, "the ingress dropped its connections to the dead pod")
    assert await host_stat(em, cluster, port, "health_flags") == "healthy"
    statuses = []
    async with aiohttp.ClientSession() as session:
        for _ in range(40):
            async with session.get(f"http://{em.ingress}/v1/models") as r:
                statuses.append(r.status)
        stats = await em.plane.ingress.stats(cluster)
        prefix = f"cluster.{cluster}.outlier_detection."
        assert stats[prefix + "ejections_enforced_consecutive_local_origin_failure"] == 1
        assert stats[prefix + "ejections_active"] == 1
        assert "failed_outlier_check" in await host_stat(em, cluster, port, "health_flags")
        failures = stats[f"cluster.{cluster}.upstream_cx_connect_fail"]
        assert failures > 0
        for _ in range(40):
            async with session.get(f"http://{em.ingress}/v1/models") as r:
                statuses.append(r.status)
    # Retries (connect-failure, another host) hid every failure from the clients, and the
    # ejected pod is no longer tried.
    assert statuses == [200] * 80
    after = await em.plane.ingress.stats(cluster)
    assert after[f"cluster.{cluster}.upstream_cx_connect_fail"] == failures


async def test_a_killed_envoy_is_restarted_on_its_ports(em: EnvoyMesh) -> None:
    ingress = em.plane.ingress
    assert ingress is not None
    old_pid = ingress.pid
    restarts = len(em.mesh.supervisor.history)
    ingress.kill()  # SIGKILL, as the OOM killer would

    async def restarted() -> bool:
        return any(e.name == "envoy ingress" for e in em.mesh.supervisor.history[restarts:])

    await eventually(restarted, 30, "the supervisor restarted the ingress Envoy")
    assert ingress.pid != old_pid
    # The same listener port: clients keep their address.
    msgs = [m async for m in em.stub.Generate(request(2), timeout=30)]
    assert msgs[-1].complete.usage.completion_tokens == 2


async def test_stopping_the_mesh_lets_a_stream_through_the_ingress_finish(em: EnvoyMesh) -> None:
    """Last (it stops the mesh): the gateways drain first, their streams still flowing through
    the ingress, their sidecars and the outbound Envoy; the proxies stop after them."""
    stream = em.stub.Generate(request(300), timeout=60)
    messages = aiter(stream)
    first = await anext(messages)
    assert first.HasField("delta")
    stopping = asyncio.ensure_future(em.mesh.stop())
    rest = [m async for m in messages]
    await stopping
    assert rest[-1].complete.usage.completion_tokens == 300
