"""The emulator model on a real tritonserver 2.51 (started by llmmesh.triton.launcher).

Requests go over Triton's gRPC `ModelStreamInfer` with the stubs tritonclient ships: tritonclient's
aio `stream_infer` refuses the reserved `triton_enable_empty_final_response` parameter, so requests
are built as protos here (as the gateway does) and responses read with `tritonclient.grpc.InferResult`.
KV events go to an in-process recording kv_registry.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc

from llmmesh.common import metric_names as names
from llmmesh.common.settings import KvBlockSettings, settings_of, to_env
from llmmesh.common.topology import TRITON_MODEL
from llmmesh.emulator.settings import EmulatorSettings
from llmmesh.emulator.tokens import expected_output_ids
from llmmesh.generated.kvregistry.v1 import kvregistry_pb2, kvregistry_pb2_grpc
from llmmesh.kvblocks import BlockConfig, block_hashes
from llmmesh.triton.launcher import TritonPorts, TritonServer

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

REPO = Path(__file__).resolve().parents[2] / "model_repository" / "emulator"
MODEL = TRITON_MODEL
BLOCKS = BlockConfig(block_size=16, hash_seed=0)
NUM_KV_BLOCKS = 2048
MAX_NUM_TOKENS = 1024
VOCAB = EmulatorSettings(replica_id="expected")


class RecordingRegistry(kvregistry_pb2_grpc.KvRegistryServiceServicer):
    def __init__(self) -> None:
        self.requests: list[kvregistry_pb2.PublishEventsRequest] = []
        self.stored: set[int] = set()

    async def PublishEvents(
        self,
        request: kvregistry_pb2.PublishEventsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> kvregistry_pb2.PublishEventsResponse:
        self.requests.append(request)
        for ev in request.events:
            if ev.WhichOneof("kind") == "stored":
                self.stored.update(b.block_hash for b in ev.stored.blocks)
        last = request.events[-1].sequence if request.events else 0
        return kvregistry_pb2.PublishEventsResponse(next_sequence=last + 1)

    async def Lookup(
        self,
        request: kvregistry_pb2.LookupRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> kvregistry_pb2.LookupResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not used by the engine")


class Replica:
    def __init__(self, server: TritonServer, registry: RecordingRegistry) -> None:
        self.server = server
        self.registry = registry
        self.channel = grpc.aio.insecure_channel(server.grpc_address)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def replica(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Replica]:
    registry = RecordingRegistry()  # type: ignore[abstract]  # PublishEvents and Lookup only
    grpc_server = grpc.aio.server()
    kvregistry_pb2_grpc.add_KvRegistryServiceServicer_to_server(registry, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    server = TritonServer(
        REPO,
        TritonPorts.free(),
        env={
            **to_env(
                settings_of(
                    EmulatorSettings,
                    replica_id="emu-test",
                    kv_registry_address=f"127.0.0.1:{port}",
                    time_scale=0.01,
                    num_kv_blocks=NUM_KV_BLOCKS,
                    max_num_tokens=MAX_NUM_TOKENS,
                    metrics_interval_ms=20.0,
                    cancellation_check_period_ms=5.0,
                    publish_interval_ms=5.0,
                )
            ),
            **to_env(
                settings_of(
                    KvBlockSettings, block_size=BLOCKS.block_size, hash_seed=BLOCKS.hash_seed
                )
            ),
        },
        log_path=log,
    )
    await server.start(ready_timeout_s=60)
    rep = Replica(server, registry)
    try:
        yield rep
    finally:
        await rep.channel.close(None)
        rc = await server.stop()
        await grpc_server.stop(None)
        assert rc == 0, server.log_tail()
    assert "Traceback" not in log.read_text(), server.log_tail()


def build(
    prompt: list[int],
    n: int,
    *,
    streaming: bool = True,
    seed: int | None = None,
    request_id: str = "",
) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=MODEL, id=request_id)

    def add(name: str, datatype: str, value: npt.NDArray[Any]) -> None:
        t = req.inputs.add()
        t.name = name
        t.datatype = datatype
        t.shape.extend(value.shape)
        req.raw_input_contents.append(value.tobytes())

    add("input_ids", "INT32", np.array([prompt], dtype=np.int32).reshape(1, len(prompt)))
    add("input_lengths", "INT32", np.array([[len(prompt)]], dtype=np.int32))
    add("request_output_len", "INT32", np.array([[n]], dtype=np.int32))
    add("streaming", "BOOL", np.array([[streaming]], dtype=np.bool_))
    add("end_id", "INT32", np.array([[2]], dtype=np.int32))
    add("temperature", "FP32", np.array([[0.7]], dtype=np.float32))
    add("return_perf_metrics", "BOOL", np.array([[True]], dtype=np.bool_))
    if seed is not None:
        add("seed", "UINT64", np.array([[seed]], dtype=np.uint64))
    req.parameters["triton_enable_empty_final_response"].bool_param = True
    return req


class Reply:
    def __init__(self, msg: service_pb2.ModelStreamInferResponse) -> None:
        self.error = msg.error_message
        self.result = None if self.error else InferResult(msg.infer_response)
        self.final = msg.infer_response.parameters["triton_final_response"].bool_param

    def array(self, name: str) -> npt.NDArray[Any] | None:
        assert self.result is not None, self.error
        out: npt.NDArray[Any] | None = self.result.as_numpy(name)
        return out


async def stream(replica: Replica, req: service_pb2.ModelInferRequest) -> list[Reply]:
    async def run() -> list[Reply]:
        call = replica.stub.ModelStreamInfer()
        await call.write(req)
        await call.done_writing()
        return [Reply(msg) async for msg in call]

    return await asyncio.wait_for(run(), timeout=20)


def tokens(replies: list[Reply]) -> list[int]:
    out: list[int] = []
    for r in replies:
        ids = r.array("output_ids")
        assert ids is not None
        out.extend(ids.reshape(-1).tolist())
    return out


def scrape(url: str) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith("nv_trt_llm_"):
            for s in fam.samples:
                assert s.labels["model"] == MODEL
                assert s.labels["version"] == "1"
                kind = s.labels.get("request_type") or s.labels["kv_cache_block_type"]
                out[(fam.name, kind)] = float(s.value)
    return out


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 10
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not reached within {timeout_s}s: {what}")
        await asyncio.sleep(0.02)


async def test_streamed_tokens_are_the_expected_ones(replica: Replica) -> None:
    prompt = list(range(1000, 1040))
    replies = await stream(replica, build(prompt, 24, seed=1234))
    assert all(not r.error for r in replies)
    assert tokens(replies) == expected_output_ids(1234, prompt, 24, VOCAB, end_id=2)
    assert len(replies) == 24  # one response per token, the last one final
    assert [r.final for r in replies] == [False] * 23 + [True]
    for r in replies:
        ids, lengths = r.array("output_ids"), r.array("sequence_length")
        assert ids is not None
        assert ids.shape == (1, 1, 1)
        assert ids.dtype == np.int32
        assert lengths is not None
        assert lengths.tolist() == [[1]]


async def test_non_streaming_returns_every_token_at_once(replica: Replica) -> None:
    prompt = [7, 8, 9]
    replies = await stream(replica, build(prompt, 10, streaming=False))
    assert len(replies) == 1
    assert replies[0].final
    assert tokens(replies) == expected_output_ids(0, prompt, 10, VOCAB)  # seed 0 when unset


async def test_repeated_prompt_reuses_blocks_and_publishes_them(replica: Replica) -> None:
    prompt = list(range(5000, 5100))  # 6 full blocks of 16 (+4 tokens)
    first = await stream(replica, build(prompt, 4))
    second = await stream(replica, build(prompt, 4))
    reused = [r.array("kv_cache_reused_blocks") for r in (first[0], second[0], second[-1])]
    assert [None if a is None else a.tolist() for a in reused] == [[[0]], [[6]], [[6]]]
    total = second[-1].array("kv_cache_alloc_total_blocks")
    assert total is not None
    assert total.tolist() == [[7]]
    assert tokens(first) == tokens(second)

    prompt_blocks = set(block_hashes(prompt, BLOCKS))

    async def published() -> bool:
        return prompt_blocks <= replica.registry.stored

    await eventually(published, "prompt blocks published to kv_registry")
    reqs = replica.registry.requests
    assert {(r.replica_id, r.epoch, r.block_size, r.hash_seed) for r in reqs} == {
        ("emu-test", reqs[0].epoch, 16, 0)
    }
    seqs = [e.sequence for r in reqs for e in r.events]
    assert seqs == list(range(len(seqs)))
    assert reqs[0].events[0].WhichOneof("kind") == "cleared"


async def test_trtllm_metrics_are_exported(replica: Replica) -> None:
    expected = {
        (names.TRTLLM_REQUEST_METRICS, "max"): 64.0,
        (names.TRTLLM_REQUEST_METRICS, "active"): 0.0,
        (names.TRTLLM_REQUEST_METRICS, "waiting"): 0.0,
        (names.TRTLLM_KV_CACHE_BLOCK_METRICS, "max"): float(NUM_KV_BLOCKS),
        (names.TRTLLM_KV_CACHE_BLOCK_METRICS, "tokens_per"): float(BLOCKS.block_size),
        (names.TRTLLM_KV_CACHE_BLOCK_METRICS, "used"): 0.0,
        (names.TRTLLM_KV_CACHE_BLOCK_METRICS, "free"): float(NUM_KV_BLOCKS),
        (names.TRTLLM_KV_CACHE_BLOCK_METRICS, "fraction"): 0.0,
    }
    url = replica.server.metrics_url

    async def settled() -> bool:
        m = await asyncio.to_thread(scrape, url)
        return all(m.get(k) == v for k, v in expected.items())

    await eventually(settled, "idle nv_trt_llm_* values")
    m = await asyncio.to_thread(scrape, url)
    kinds = {k for _, k in m}
    assert {"active", "max", "scheduled", "context", "waiting"} <= kinds
    assert {"max", "free", "used", "tokens_per", "reused", "fraction"} <= kinds


async def test_cancelling_a_stream_frees_its_slot(replica: Replica) -> None:
    url = replica.server.metrics_url
    call = replica.stub.ModelStreamInfer()
    await call.write(build(list(range(300, 340)), 20_000))
    await call.done_writing()
    for _ in range(3):
        msg = await asyncio.wait_for(call.read(), timeout=10)
        assert isinstance(msg, service_pb2.ModelStreamInferResponse)
        assert not msg.error_message

    async def busy() -> bool:
        m = await asyncio.to_thread(scrape, url)
        return m[(names.TRTLLM_REQUEST_METRICS, "active")] == 1

    await eventually(busy, "the long request is active")
    call.cancel()

    async def freed() -> bool:
        m = await asyncio.to_thread(scrape, url)
        return (
            m[(names.TRTLLM_REQUEST_METRICS, "active")] == 0
            and m[(names.TRTLLM_KV_CACHE_BLOCK_METRICS, "used")] == 0
        )

    await eventually(freed, "active back to 0 and blocks released after cancel")
    # The replica keeps serving.
    assert len(tokens(await stream(replica, build([1, 2, 3], 5)))) == 5


@pytest.mark.parametrize(
    ("prompt_len", "n", "message"),
    [
        (0, 4, "at least one token"),
        (8, 0, "request_output_len must be positive"),
        (MAX_NUM_TOKENS + 1, 4, "exceeds max_num_tokens"),
        (16, NUM_KV_BLOCKS * BLOCKS.block_size, "KV blocks"),
    ],
)
async def test_bad_input_gets_an_error(
    replica: Replica, prompt_len: int, n: int, message: str
) -> None:
    replies = await stream(replica, build([5] * prompt_len, n))
    assert len(replies) == 1
    assert message in replies[0].error
