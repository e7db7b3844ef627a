"""Gateway core streaming logic against in-process fakes of the orchestrator and the engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from llmmesh.common.telemetry import setup_tracing
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as orch_pb
from services.gateway.core import (
    Completion,
    Delta,
    FinishReason,
    GatewayCore,
    GenerationRequest,
    Sampling,
)
from services.gateway.errors import ReplicaFailed
from services.gateway.models import ServedModel
from services.gateway.settings import GatewaySettings, ModelSettings
from services.gateway.triton_stream import EngineChunk, EngineRequest, TritonStreamError

MODEL = "smollm2"


class FakeOrchestrator:
    def __init__(self) -> None:
        self.admits: list[orch_pb.AdmitRequest] = []
        self.admit_metadata: list[tuple[tuple[str, str], ...]] = []
        self.completes: list[orch_pb.CompleteRequest] = []
        self.completed = asyncio.Event()

    async def Admit(
        self,
        request: orch_pb.AdmitRequest,
        *,
        metadata: tuple[tuple[str, str], ...] = (),
        **_: object,
    ) -> orch_pb.AdmitResponse:
        self.admits.append(request)
        self.admit_metadata.append(metadata)
        n = len(self.admits)
        return orch_pb.AdmitResponse(
            lease_id=f"lease-{n}",
            replica=orch_pb.Replica(id=f"r{n}", grpc_address=f"127.0.0.1:{n}"),
        )

    async def Complete(
        self, request: orch_pb.CompleteRequest, **_: object
    ) -> orch_pb.CompleteResponse:
        self.completes.append(request)
        self.completed.set()
        return orch_pb.CompleteResponse()


class FakeEngine:
    """Plays scripted chunk lists per attempt; an exception in the script is raised there."""

    def __init__(self, scripts: Sequence[Sequence[EngineChunk | Exception]]):
        self.scripts = scripts
        self.requests: list[tuple[str, EngineRequest]] = []
        self.metadata: list[Sequence[tuple[str, str]]] = []

    async def stream(
        self,
        address: str,
        authority: str,
        request: EngineRequest,
        *,
        timeout_s: float | None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> AsyncGenerator[EngineChunk, None]:
        self.requests.append((address, request))
        self.metadata.append(metadata)
        for item in self.scripts[len(self.requests) - 1]:
            if isinstance(item, Exception):
                raise item
            yield item


@pytest.fixture(scope="module")
def model(tokenizer_path: Path) -> ServedModel:
    return ServedModel.load(ModelSettings(name=MODEL, tokenizer_path=tokenizer_path))


def make(
    model: ServedModel, engine: FakeEngine, **settings: Any
) -> tuple[GatewayCore, FakeOrchestrator]:
    orch = FakeOrchestrator()
    core = GatewayCore(
        GatewaySettings(models=[model.settings], **settings), [model], cast(Any, orch), engine, 32
    )
    return core, orch


async def run(core: GatewayCore, **kw: Any) -> list[Delta | Completion]:
    req = GenerationRequest(model=MODEL, request_id="r", prompt_text="Hello", **kw)
    return [ev async for ev in core.generate(req, 10.0)]


def chunk(*ids: int, final: bool = False) -> EngineChunk:
    return EngineChunk(list(ids), final)


async def test_length_finish_and_completion_reported(model: ServedModel) -> None:
    ids = model.encode(" one two three")
    engine = FakeEngine([[chunk(t) for t in ids] + [chunk(final=True)]])
    core, orch = make(model, engine)
    events = await run(core, sampling=Sampling(max_tokens=len(ids)))
    deltas = [e for e in events if isinstance(e, Delta)]
    final = events[-1]
    assert isinstance(final, Completion)
    assert "".join(d.text for d in deltas) == model.decode(ids)
    assert final.finish_reason is FinishReason.LENGTH
    assert final.completion_tokens == len(ids)
    await orch.completed.wait()
    assert orch.completes[0].outcome == orch_pb.OUTCOME_SUCCESS
    assert orch.completes[0].completion_tokens == len(ids)


async def test_end_id_stops_and_is_not_emitted(model: ServedModel) -> None:
    ids = model.encode(" yes")
    engine = FakeEngine([[chunk(*ids), chunk(model.end_id, final=True)]])
    core, _ = make(model, engine)
    events = await run(core, sampling=Sampling(max_tokens=50))
    final = events[-1]
    assert isinstance(final, Completion)
    assert final.finish_reason is FinishReason.STOP
    assert [t for e in events if isinstance(e, Delta) for t in e.token_ids] == ids


async def test_stop_string_truncates_text(model: ServedModel) -> None:
    ids = model.encode(" alpha beta gamma delta")
    engine = FakeEngine([[chunk(t) for t in ids] + [chunk(final=True)]])
    core, _ = make(model, engine)
    events = await run(core, sampling=Sampling(max_tokens=50, stop=("gamma",)))
    text = "".join(e.text for e in events if isinstance(e, Delta))
    assert text == " alpha beta "
    final = events[-1]
    assert isinstance(final, Completion)
    assert final.finish_reason is FinishReason.STOP


async def test_replica_failure_before_first_token_retries_elsewhere(model: ServedModel) -> None:
    ids = model.encode(" ok")
    engine = FakeEngine(
        [
            [TritonStreamError("connection reset", replica_fault=True)],
            [chunk(*ids), chunk(final=True)],
        ]
    )
    core, orch = make(model, engine)
    events = await run(core, sampling=Sampling(max_tokens=len(ids)))
    final = events[-1]
    assert isinstance(final, Completion)
    assert final.replica_id == "r2"
    assert len(orch.admits) == 2
    while len(orch.completes) < 2:
        orch.completed.clear()
        await orch.completed.wait()
    assert sorted(c.outcome for c in orch.completes) == sorted(
        [orch_pb.OUTCOME_REPLICA_ERROR, orch_pb.OUTCOME_SUCCESS]
    )


async def test_replica_failure_after_first_token_is_not_retried(model: ServedModel) -> None:
    ids = model.encode(" ok then")
    engine = FakeEngine(
        [[chunk(ids[0]), TritonStreamError("connection reset", replica_fault=True)]]
    )
    core, orch = make(model, engine)
    got: list[Delta | Completion] = []

    async def consume() -> None:
        async for ev in core.generate(
            GenerationRequest(model=MODEL, request_id="r", prompt_text="Hi"), 10.0
        ):
            got.append(ev)

    with pytest.raises(ReplicaFailed, match="r1"):
        await consume()
    assert len(got) == 1
    assert len(orch.admits) == 1


async def test_no_retry_when_disabled(model: ServedModel) -> None:
    engine = FakeEngine([[TritonStreamError("down", replica_fault=True)]])
    core, orch = make(model, engine, retries_before_first_token=0)
    with pytest.raises(ReplicaFailed):
        await run(core)
    assert len(orch.admits) == 1


async def test_model_version_and_shadow_reach_admission(model: ServedModel) -> None:
    engine = FakeEngine([[chunk(model.encode("x")[0]), chunk(final=True)]])
    core, orch = make(model, engine, model_version="v2", shadow=True)
    await run(core, sampling=Sampling(max_tokens=1))
    assert orch.admits[0].model_version == "v2"
    assert orch.admits[0].priority == orch_pb.PRIORITY_BATCH


def trace_id(metadata: Sequence[tuple[str, str]]) -> str:
    parent = dict(metadata)["traceparent"]
    version, tid, span, flags = parent.split("-")
    assert (version, len(tid), len(span)) == ("00", 32, 16)
    assert int(flags, 16) & 1  # sampled
    return tid


async def test_trace_context_reaches_orchestrator_and_triton(model: ServedModel) -> None:
    setup_tracing("gateway-test", None, 1.0)
    engine = FakeEngine([[chunk(model.encode("x")[0]), chunk(final=True)]])
    core, orch = make(model, engine)
    await run(core, sampling=Sampling(max_tokens=1))
    assert trace_id(orch.admit_metadata[0]) == trace_id(engine.metadata[0])
