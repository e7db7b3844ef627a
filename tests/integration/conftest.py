from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from llmmesh.common.components import GATEWAY
from llmmesh.common.settings import settings_of
from llmmesh.generated.gateway.v1 import gateway_pb2_grpc
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2_grpc
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2_grpc
from llmmesh.localmesh import MODEL_NAME, LocalMesh, MeshOptions, ServiceProcess
from services.gateway.settings import GatewaySettings, ModelSettings
from tests.helpers import eventually

__all__ = ["Mesh", "eventually", "gateway_process", "metric", "scrape", "start_mesh"]


class Mesh:
    """A started local mesh plus stubs over real channels."""

    def __init__(self, mesh: LocalMesh, channels: list[grpc.aio.Channel]):
        self.mesh = mesh
        self._channels = channels
        self.gateway = gateway_pb2_grpc.GatewayServiceStub(channels[0])
        self.orchestrator = orchestrator_pb2_grpc.OrchestratorServiceStub(channels[1])
        self.kv_registry = kvregistry_pb2_grpc.KvRegistryServiceStub(channels[2])

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close(None)


async def start_mesh(tokenizer_path: Path, **kw: object) -> Mesh:
    mesh = LocalMesh(MeshOptions(tokenizer_path=tokenizer_path, **kw))  # type: ignore[arg-type]
    try:
        await mesh.start()
    except BaseException:
        for svc in mesh.services.values():
            print(f"--- {svc.name} log ---\n{svc.log_tail()}")
        await mesh.stop()
        raise
    chans = [
        grpc.aio.insecure_channel(mesh.services[n].address)
        for n in ("gateway", "orchestrator", "kv_registry")
    ]
    return Mesh(mesh, chans)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mesh(tokenizer_path: Path) -> AsyncIterator[Mesh]:
    m = await start_mesh(tokenizer_path, replicas=2, time_scale=1.0)
    yield m
    await m.close()
    await m.mesh.stop()


def gateway_process(
    mesh: Mesh, workdir: Path, tokenizer_path: Path, **fields: object
) -> ServiceProcess:
    """Another gateway (not started) in front of `mesh`'s orchestrator, on free ports, serving
    the mesh's model; `fields` are further `GatewaySettings`."""
    settings = settings_of(
        GatewaySettings,
        **{
            "grpc_port": 0,
            "http_port": 0,
            "metrics_port": 0,
            "orchestrator_address": mesh.mesh.services["orchestrator"].address,
            "models": [ModelSettings(name=MODEL_NAME, tokenizer_path=tokenizer_path)],
            **fields,
        },
    )
    return ServiceProcess(GATEWAY, settings, workdir)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for (n, lbls), v in scrape(url).items():
        if n == name and all(dict(lbls).get(k) == val for k, val in labels.items()):
            total += v
    return total
