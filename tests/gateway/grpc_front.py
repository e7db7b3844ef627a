"""A real gateway gRPC server (the production servicer and handlers, no network fakes) on an
ephemeral port, over a core built from the shared fakes, for tests of the gRPC front and of its
clients (llmmesh.cli)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import grpc

from llmmesh.common.errors import ServiceError
from services.gateway.core import GatewayCore
from services.gateway.models import ServedModel
from services.gateway.servicer import GatewayServicer, add_to_server
from services.gateway.settings import GatewaySettings, ModelSettings
from services.gateway.triton_stream import EngineChunk
from tests.gateway.conftest import FakeAdmission, FakeEngine

CHAT_MODEL = "smollm2"  # SmolLM2-135M-Instruct's tokenizer and chat template
BARE_MODEL = "bare"  # the same tokenizer without a chat template
BLOCK_SIZE = 4


def chat_and_bare_models(tokenizer_path: Path) -> tuple[ServedModel, ServedModel]:
    chat = ServedModel.load(
        ModelSettings(
            name=CHAT_MODEL,
            tokenizer_path=tokenizer_path,
            context_length=256,
            max_completion_tokens=64,
        )
    )
    assert chat.chat_template is not None
    bare = dataclasses.replace(
        chat, settings=chat.settings.model_copy(update={"name": BARE_MODEL}), chat_template=None
    )
    return chat, bare


@dataclasses.dataclass
class Front:
    address: str
    engine: FakeEngine
    admission: FakeAdmission


@asynccontextmanager
async def grpc_gateway(
    models: Sequence[ServedModel],
    scripts: Sequence[Sequence[EngineChunk | Exception]] = (),
    reject: ServiceError | None = None,
) -> AsyncIterator[Front]:
    """Serves `models`; the engine plays `scripts`, one per stream call."""
    engine = FakeEngine(scripts)
    admission = FakeAdmission(reject)
    settings = GatewaySettings(models=[m.settings for m in models], grpc_port=0)
    core = GatewayCore(settings, list(models), admission, engine, BLOCK_SIZE)
    server = grpc.aio.server()
    add_to_server(GatewayServicer(core), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Front(f"127.0.0.1:{port}", engine, admission)
    finally:
        await server.stop(None)
        await core.close()
