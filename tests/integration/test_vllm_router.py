"""vLLM's router (`vllm-router` 0.1.17 from PyPI, the Rust router vLLM ships) in front of two
llmmesh gateways, as a user would put it: it must admit both as workers (it waits for their
`GET /health`), forward OpenAI requests unmodified (it adds vLLM/SGLang extension fields at their
defaults), and spread streams over both gateways."""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from openai import AsyncOpenAI

from llmmesh.common import metric_names as names
from llmmesh.common.process import tied_to_parent
from llmmesh.localmesh import MODEL_NAME, ServiceProcess
from llmmesh.netutil import free_port
from tests.integration.conftest import Mesh, eventually, gateway_process, metric

pytestmark = [
    pytest.mark.integration,
    pytest.mark.ecosystem,
    pytest.mark.asyncio(loop_scope="session"),
]

STREAMS = 8


def vllm_router() -> str:
    path = shutil.which("vllm-router", path=str(Path(sys.executable).parent))
    assert path is not None, "vllm-router is a pinned dev dependency (make setup)"
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def second_gateway(
    mesh: Mesh, tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServiceProcess]:
    gw = gateway_process(mesh, tmp_path_factory.mktemp("gw2"), tokenizer_path)
    await gw.start()
    yield gw
    await gw.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def router(mesh: Mesh, second_gateway: ServiceProcess, tmp_path: Path) -> AsyncIterator[str]:
    port = free_port()
    workers = [mesh.mesh.services["gateway"].http_base_url, second_gateway.http_base_url]
    log = (tmp_path / "vllm-router.log").open("wb")
    argv = [
        vllm_router(),
        *("--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin"),
        *("--worker-urls", *workers),
        *("--worker-startup-timeout-secs", "60", "--log-level", "info"),
    ]
    proc = await asyncio.create_subprocess_exec(
        *tied_to_parent(argv), stdout=log, stderr=asyncio.subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def admitted_both() -> bool:
                assert proc.returncode is None, (tmp_path / "vllm-router.log").read_text()
                try:
                    async with session.get(f"{url}/health") as r:
                        return r.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            # The router answers only once every worker passed its health check.
            await eventually(admitted_both, timeout_s=60, what="vllm-router admits both gateways")
        yield url
    finally:
        proc.terminate()
        await proc.wait()
        log.close()


async def test_router_admits_gateways_and_streams_through_both(
    router: str, mesh: Mesh, second_gateway: ServiceProcess
) -> None:
    gateways = [mesh.mesh.services["gateway"], second_gateway]

    def served() -> list[float]:
        return [metric(g.metrics_url, names.GATEWAY_REQUESTS) for g in gateways]

    before = served()
    client = AsyncOpenAI(base_url=f"{router}/v1", api_key="unused", max_retries=0, timeout=60)

    async def chat(i: int) -> tuple[str, str | None]:
        stream = await client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": f"Say something about the number {i}."}],
            max_tokens=12,
            stream=True,
        )
        text, finish = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def complete(i: int) -> tuple[str, str | None]:
        stream = await client.completions.create(
            model=MODEL_NAME, prompt=f"Count to {i}:", max_tokens=12, stream=True
        )
        text, finish = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                reason: str | None = chunk.choices[0].finish_reason  # None until the last
                finish = reason or finish
        return text, finish

    try:
        results = await asyncio.gather(
            *(chat(i) for i in range(STREAMS)), *(complete(i) for i in range(STREAMS))
        )
    finally:
        await client.close()
    for text, finish in results:
        assert text
        assert finish in ("stop", "length")
    after = served()
    per_gateway = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(per_gateway) == 2 * STREAMS
    assert all(n >= 1 for n in per_gateway), per_gateway  # round robin reached both
