"""A VirtualService route's timeout on a real Envoy (the venv's, as the local mesh runs it): the
translated route ends a request its upstream does not answer, as Istio's does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest_asyncio

from llmmesh.envoymesh.envoy import EnvoyProcess
from llmmesh.envoymesh.proxies import bootstrap, listener
from llmmesh.envoymesh.translate import cluster, cluster_name, routes
from llmmesh.netutil import free_port

UPSTREAM = "upstream.test.svc.cluster.local"


@pytest_asyncio.fixture
async def silent_upstream() -> AsyncIterator[int]:
    """An HTTP/1.1 server that reads requests and never answers; its port."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()  # until the peer (Envoy) gives up on it

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


async def test_a_route_timeout_ends_a_request_its_upstream_does_not_answer(
    silent_upstream: int, tmp_path: Path
) -> None:
    vs = {
        "spec": {
            "http": [
                {
                    "name": "slow",
                    "timeout": "0.3s",
                    "route": [{"destination": {"host": UPSTREAM, "port": {"number": 80}}}],
                }
            ]
        }
    }
    port = free_port()
    config = bootstrap(
        "test",
        [listener("in", port, [{"name": "v", "domains": ["*"], "routes": routes(vs)}], None)],
        [cluster(cluster_name(UPSTREAM, 80), {}, False, [("127.0.0.1", silent_upstream)], None)],
    )
    envoy = EnvoyProcess("timeouts", config, tmp_path)
    await envoy.start()
    try:
        # The client's own bound is far beyond the route's: only Envoy can end it first (else
        # the test fails on that bound's TimeoutError).
        limit = aiohttp.ClientTimeout(total=5)
        async with (
            aiohttp.ClientSession(timeout=limit) as session,
            session.get(f"http://127.0.0.1:{port}/") as resp,
        ):
            assert resp.status == 504  # upstream request timeout
        timeouts = await envoy.stats("upstream_rq_timeout")
        assert sum(timeouts.values()) >= 1
    finally:
        await envoy.stop()
