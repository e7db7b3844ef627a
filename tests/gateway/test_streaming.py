"""Gateway core streaming logic against in-process fakes of admission and the engine."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from llmmesh.common import metric_names as names
from llmmesh.common.telemetry import setup_tracing
from llmmesh.common.topology import DEFAULT_POOL, Priority, ReplicaAddress
from services.gateway.admission import Outcome
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
from services.gateway.stream_state import Progress, StreamState
from services.gateway.triton_stream import TritonStreamError
from tests.gateway.conftest import (
    METASPACE_VOCAB,
    MODEL,
    FakeAdmission,
    FakeEngine,
    chunk,
    fake_replica,
    metaspace_model,
)


@pytest.fixture(scope="module")
def model(tokenizer_path: Path) -> ServedModel:
    return ServedModel.load(ModelSettings(name=MODEL, tokenizer_path=tokenizer_path))


def make(
    model: ServedModel, engine: FakeEngine, **settings: Any
) -> tuple[GatewayCore, FakeAdmission]:
    admission = FakeAdmission()
    core = GatewayCore(
        GatewaySettings(models=[model.settings], **settings), [model], admission, engine, 32
    )
    return core, admission


async def run(core: GatewayCore, **kw: Any) -> list[Delta | Completion]:
    req = GenerationRequest(model=MODEL, request_id="r", prompt_text="Hello", **kw)
    return [ev async for ev in core.generate(req, 10.0)]


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
    [report] = await orch.wait_reports(1)
    assert report.lease_id == "lease-1"
    assert report.outcome is Outcome.SUCCESS
    assert report.completion_tokens == len(ids)
    assert report.prompt_tokens == final.prompt_tokens
    assert report.ttft_ms is not None


def stopped_with(events: list[Delta | Completion], ids: list[int]) -> Completion:
    """The stream's Completion, once it is asserted to finish STOP having emitted `ids`."""
    final = events[-1]
    assert isinstance(final, Completion)
    assert final.finish_reason is FinishReason.STOP
    assert [t for e in events if isinstance(e, Delta) for t in e.token_ids] == ids
    return final


async def test_end_id_stops_and_is_not_emitted(model: ServedModel) -> None:
    ids = model.encode(" yes")
    engine = FakeEngine([[chunk(*ids), chunk(model.end_id, final=True)]])
    core, _ = make(model, engine)
    events = await run(core, sampling=Sampling(max_tokens=50))
    stopped_with(events, ids)


@pytest.mark.parametrize("where", ["in a chunk", "alone"])
async def test_a_stop_token_id_ends_the_stream_like_the_end_id(
    tokenizer_path: Path, where: str
) -> None:
    """A model with more end tokens than the engines' end_id (Llama 3 Instruct's <|eot_id|>
    beside <|end_of_text|>): the first of them ends the stream (finish stop, not emitted) and
    the engine's stream is closed instead of read to max_tokens."""
    base = ServedModel.load(ModelSettings(name=MODEL, tokenizer_path=tokenizer_path))
    eot = base.encode(" zebra")[0]
    model = ServedModel.load(
        ModelSettings(name=MODEL, tokenizer_path=tokenizer_path, stop_token_ids=[eot])
    )
    assert model.end_ids == {model.end_id, eot}
    ids = model.encode(" one two three")
    after = model.encode(" four five")
    script = (
        [chunk(*ids, eot, *after[:1])]
        if where == "in a chunk"
        else [chunk(t) for t in ids] + [chunk(eot)]
    )
    engine = FakeEngine([[*script, *(chunk(t) for t in after), chunk(final=True)]])
    core, _ = make(model, engine)
    events = await run(core, sampling=Sampling(max_tokens=50))
    final = stopped_with(events, ids)
    assert "".join(e.text for e in events if isinstance(e, Delta)) == model.decode(ids)
    assert final.completion_tokens == len(ids)
    assert engine.closed == 1  # the rest of the engine's stream was not read


def test_a_stop_token_id_outside_the_vocabulary_is_refused_at_load(tokenizer_path: Path) -> None:
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ServedModel.load(
            ModelSettings(name=MODEL, tokenizer_path=tokenizer_path, stop_token_ids=[10**7])
        )


async def test_end_id_alone_still_delivers_the_text_held_for_stop_strings(
    model: ServedModel,
) -> None:
    # Triton streams one token per response: the end id comes alone, after the last text.
    ids = model.encode(" alpha beta gamma")
    engine = FakeEngine([[*(chunk(t) for t in ids), chunk(model.end_id, final=True)]])
    core, _ = make(model, engine)
    events = await run(core, sampling=Sampling(max_tokens=50, stop=("zzzz",)))
    assert "".join(e.text for e in events if isinstance(e, Delta)) == model.decode(ids)
    final = events[-1]
    assert isinstance(final, Completion)
    assert final.finish_reason is FinishReason.STOP
    assert final.completion_tokens == len(ids)


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
    reports = await orch.wait_reports(2)
    assert [(r.lease_id, r.outcome) for r in reports] == [
        ("lease-1", Outcome.REPLICA_ERROR),
        ("lease-2", Outcome.SUCCESS),
    ]
    assert "connection reset" in reports[0].error
    assert reports[0].ttft_ms is None
    # Each attempt streams from its own lease's replica, dialled with the lease's authority.
    assert engine.targets == [
        (fake_replica(n).grpc_address, fake_replica(n).authority) for n in (1, 2)
    ]


async def test_replica_failure_after_first_token_without_migration_is_unavailable(
    model: ServedModel,
) -> None:
    # With migration (test_migration.py) the request would continue on another replica.
    ids = model.encode(" ok then")
    engine = FakeEngine(
        [[chunk(ids[0]), TritonStreamError("connection reset", replica_fault=True)]]
    )
    core, orch = make(model, engine, max_migrations=0)
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
    assert orch.admits[0].priority is Priority.BATCH
    assert orch.admits[0].model == model.settings.triton_model


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
    assert orch.admit_trace_ids[0] == trace_id(engine.metadata[0]) != "0" * 32


async def test_the_end_id_right_at_max_tokens_finishes_stop(model: ServedModel) -> None:
    ids = model.encode(" one two three")
    engine = FakeEngine([[chunk(*ids[:-1]), chunk(ids[-1], model.end_id, final=True)]])
    core, _ = make(model, engine)
    final = (await run(core, sampling=Sampling(max_tokens=len(ids))))[-1]
    assert isinstance(final, Completion)
    assert (final.finish_reason, final.completion_tokens) == (FinishReason.STOP, len(ids))


async def test_an_end_id_beyond_max_tokens_finishes_length(model: ServedModel) -> None:
    ids = model.encode(" one two three")
    engine = FakeEngine([[chunk(*ids, model.end_id, final=True)]])
    core, _ = make(model, engine)
    events = await run(core, sampling=Sampling(max_tokens=len(ids) - 1))
    final = events[-1]
    assert isinstance(final, Completion)
    assert (final.finish_reason, final.completion_tokens) == (FinishReason.LENGTH, len(ids) - 1)
    assert "".join(e.text for e in events if isinstance(e, Delta)) == model.decode(ids[:-1])


async def test_a_stop_string_the_decoder_held_at_the_last_token_finishes_stop(
    model: ServedModel,
) -> None:
    # The last token is a partial UTF-8 character: the decoder holds " STOP" with it until the
    # flush at max_tokens, and the flush completes the stop string.
    ids = model.encode(" go STOP")
    first_byte = model.tokenizer.token_to_id("ä")  # byte 0xE4 (ByteLevel), a 3-byte lead
    assert first_byte is not None
    engine = FakeEngine([[chunk(*ids, first_byte, final=True)]])
    core, _ = make(model, engine)
    events = await run(core, sampling=Sampling(max_tokens=len(ids) + 1, stop=("STOP",)))
    final = events[-1]
    assert isinstance(final, Completion)
    assert final.finish_reason is FinishReason.STOP
    assert "".join(e.text for e in events if isinstance(e, Delta)) == " go "


async def test_a_completions_first_word_keeps_its_space(tmp_path: Path) -> None:
    # A SentencePiece-style tokenizer: the first token "▁Paris" decoded alone reads "Paris".
    sp = metaspace_model(tmp_path, MODEL)
    paris, is_ = METASPACE_VOCAB["▁Paris"], METASPACE_VOCAB["▁is"]
    core, _ = make(sp, FakeEngine([[chunk(paris), chunk(is_), chunk(sp.end_id, final=True)]]))
    events = await run(core)  # the prompt "Hello"
    assert "".join(e.text for e in events if isinstance(e, Delta)) == " Paris is"


@pytest.mark.parametrize("ending", ["end id alone", "final without end id"])
async def test_a_finished_streams_last_delta_carries_its_finish(
    model: ServedModel, ending: str
) -> None:
    # A takeover (resume_redis.py) reads the finish from the deltas a dead gateway wrote: one
    # missing would have the generation continued past its end.
    ids = model.encode(" yes")
    last = chunk(model.end_id, final=True) if ending == "end id alone" else chunk(final=True)
    core, _ = make(model, FakeEngine([[chunk(*ids), last]]))
    events = await run(core)
    deltas = [e for e in events if isinstance(e, Delta)]
    assert deltas[-1].finish_reason is FinishReason.STOP
    assert [d.token_ids for d in deltas] == [ids, []]
    assert isinstance(events[-1], Completion)


def test_a_continued_generation_times_only_its_own_tokens(model: ServedModel) -> None:
    """A takeover's state (`restore`) holds tokens another gateway generated and timed: the
    first token here is no time to first token (neither in the summary, the usage record nor
    the TTFT histogram), and the mean gap counts the gaps timed here only."""
    ids = model.encode(" one two three four five")
    progress = Progress()
    state = StreamState(
        model,
        prompt_tokens=3,
        max_tokens=50,
        stop=(),
        block_size=16,
        start=time.perf_counter(),
        progress=progress,
        limits=None,
    )
    state.restore([Delta(model.decode(ids[:1]), ids[:1], 0), Delta("", ids[1:2], 1)])
    state.serve_on(ReplicaAddress("replica-b", "replica-b:8001", pool=DEFAULT_POOL))
    ttft_before = _ttft_count()
    for t in ids[2:]:
        state.push(chunk(t))
    state.end()
    done = state.completion(0.0, "replica-b")
    assert done.completion_tokens == len(ids)
    assert done.ttft_ms == 0.0  # 0: not timed here (the proto's Timings)
    assert progress.first_token_s is None
    assert _ttft_count() == ttft_before
    timed_gaps = len(ids) - 2 - 1
    assert done.mean_itl_ms == pytest.approx(state._itl_sum / timed_gaps * 1000)


def _ttft_count() -> float:
    """TTFT observations for MODEL, whatever the pool."""
    return sum(
        s.value
        for family in REGISTRY.collect()
        for s in family.samples
        if s.name == f"{names.GATEWAY_TTFT}_count" and s.labels.get("model") == MODEL
    )
