"""Request migration: a replica failing mid-stream, the request continued on another replica,
the client's stream uninterrupted (in-process fakes of admission and the engine)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from llmmesh.common import metric_names as names
from llmmesh.common.errors import DeadlineExceeded, Reason, ResourceExhausted
from services.gateway import core as gateway_core
from services.gateway.admission import AdmissionRequest, Lease, Outcome
from services.gateway.core import (
    Completion,
    Delta,
    FinishReason,
    GatewayCore,
    GenerationRequest,
    Sampling,
)
from services.gateway.errors import InvalidRequest, NoReplica, ReplicaFailed
from services.gateway.faults import classify_message
from services.gateway.models import ServedModel
from services.gateway.settings import GatewaySettings, ModelSettings
from services.gateway.triton_stream import EngineChunk, TritonStreamError
from services.gateway.usage import UsageRecord
from tests.gateway.conftest import MODEL, FakeAdmission, FakeEngine, Hang, chunk

Event = Delta | Completion


@pytest.fixture(scope="module")
def model(tokenizer_path: Path) -> ServedModel:
    return ServedModel.load(ModelSettings(name=MODEL, tokenizer_path=tokenizer_path))


class Usage:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def submit(self, record: UsageRecord) -> None:
        self.records.append(record)


def make(
    model: ServedModel,
    engine: FakeEngine,
    admission: FakeAdmission | None = None,
    **settings: Any,
) -> tuple[GatewayCore, FakeAdmission, Usage]:
    """A core over `engine` and `admission` (default: a FakeAdmission), with a usage sink."""
    admission, usage = admission or FakeAdmission(), Usage()
    core = GatewayCore(
        GatewaySettings(models=[model.settings], **settings),
        [model],
        admission,
        engine,
        32,
        usage=usage,
    )
    return core, admission, usage


def fault(message: str = "connection reset") -> TritonStreamError:
    return TritonStreamError(message, replica_fault=True)


def tokens(*ids: int) -> list[EngineChunk]:
    """One chunk per token, as Triton streams them."""
    return [chunk(t) for t in ids]


def migrations(phase: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        names.GATEWAY_MIGRATIONS, {"phase": phase, "outcome": outcome}
    )
    return value or 0.0


PROMPT = list(range(100, 170))  # 70 tokens: 2 blocks of 32 and some


def request(**sampling: Any) -> GenerationRequest:
    return GenerationRequest(
        model=MODEL, request_id="req-7", prompt_ids=PROMPT, sampling=Sampling(**sampling)
    )


async def collect(core: GatewayCore, req: GenerationRequest) -> list[Event]:
    return [ev async for ev in core.generate(req, 10.0)]


def deltas(events: list[Event]) -> list[Delta]:
    return [e for e in events if isinstance(e, Delta)]


def assert_one_contiguous_stream(events: list[Event], ids: list[int]) -> None:
    """Offsets continue across the migration; every token once, in order."""
    offset = 0
    for d in deltas(events):
        assert d.offset == offset
        offset = d.end
    assert [t for d in deltas(events) for t in d.token_ids] == ids
    assert isinstance(events[-1], Completion)
    assert sum(isinstance(e, Completion) for e in events) == 1


def latency_counts(family: str, pool: str) -> float:
    value = REGISTRY.get_sample_value(f"{family}_count", {"model": MODEL, "pool": pool})
    return value or 0.0


async def test_latencies_are_observed_under_the_pool_of_the_replica_that_served_them(
    model: ServedModel,
) -> None:
    """The autoscaler judges each pool by its own latencies: the first token and the gaps of
    an attempt count under its replica's pool, also when the request moves to another pool."""
    ids = model.encode(" alpha beta gamma delta epsilon")
    k = 2
    engine = FakeEngine([[*tokens(*ids[:k]), fault()], [*tokens(*ids[k:]), chunk(final=True)]])
    core, _, _ = make(model, engine, FakeAdmission(pools=("pool-x", "pool-y")))
    ttft, itl = names.GATEWAY_TTFT, names.GATEWAY_ITL
    before = {(f, p): latency_counts(f, p) for f in (ttft, itl) for p in ("pool-x", "pool-y")}
    events = await collect(core, request(max_tokens=len(ids)))
    assert_one_contiguous_stream(events, ids)

    def added(family: str, pool: str) -> float:
        return latency_counts(family, pool) - before[(family, pool)]

    assert (added(ttft, "pool-x"), added(ttft, "pool-y")) == (1, 0)
    # Gaps: after the first token on pool-x; every token of the second attempt on pool-y.
    assert (added(itl, "pool-x"), added(itl, "pool-y")) == (k - 1, len(ids) - k)


def tokens_counted(pool: str, kind: str) -> float:
    labels = {"model": MODEL, "pool": pool, "kind": kind}
    return REGISTRY.get_sample_value(names.GATEWAY_TOKENS, labels) or 0.0


async def test_tokens_are_counted_per_attempt_under_the_pool_that_processed_them(
    model: ServedModel,
) -> None:
    """The autoscaler plans each pool for its own request shape: an attempt's prompt (the
    request's, plus the tokens generated before it: the engine processes them again) and its
    completion tokens count under its replica's pool."""
    ids = model.encode(" alpha beta gamma delta epsilon")
    k = 2
    engine = FakeEngine([[*tokens(*ids[:k]), fault()], [*tokens(*ids[k:]), chunk(final=True)]])
    core, _, _ = make(model, engine, FakeAdmission(pools=("pool-p", "pool-q")))
    events = await collect(core, request(max_tokens=len(ids)))
    assert_one_contiguous_stream(events, ids)
    prompt = len(PROMPT)
    assert tokens_counted("pool-p", "prompt") == prompt
    assert tokens_counted("pool-p", "completion") == k
    assert tokens_counted("pool-q", "prompt") == prompt + k
    assert tokens_counted("pool-q", "completion") == len(ids) - k


async def test_mid_stream_fault_continues_on_another_replica(model: ServedModel) -> None:
    # Text held back for a stop string and an unfinished character cross the boundary too.
    ids = model.encode(" alpha beta 🦙 gamma delta")
    k = ids.index(model.encode(" 🦙")[1])  # the emoji's second byte token: mid-character
    engine = FakeEngine(
        [
            [chunk(ids[0], reused=1), *tokens(*ids[1:k]), fault()],
            [chunk(ids[k], reused=3), *tokens(*ids[k + 1 :]), chunk(final=True)],
        ]
    )
    core, orch, usage = make(model, engine)
    before = migrations("mid_stream", "migrated")
    events = await collect(core, request(max_tokens=len(ids), stop=("zzzz",)))

    assert_one_contiguous_stream(events, ids)
    assert "".join(d.text for d in deltas(events)) == model.decode(ids)
    final = events[-1]
    assert isinstance(final, Completion)
    assert final.finish_reason is FinishReason.LENGTH
    assert (final.prompt_tokens, final.completion_tokens) == (len(PROMPT), len(ids))
    # Cached tokens as the attempt that prefilled the original prompt reported (1 block).
    assert final.cached_prompt_tokens == 32
    assert final.replica_id == "r2"
    # The continuation: prompt + tokens so far, the remaining max_tokens, not on r1.
    second = orch.admits[1]
    assert list(second.prompt_token_ids) == PROMPT + ids[:k]
    assert second.max_tokens == len(ids) - k
    assert second.exclude_replicas == {"r1"}
    assert orch.admits[0].exclude_replicas == frozenset()
    assert list(engine.requests[1].input_ids) == PROMPT + ids[:k]
    assert engine.requests[1].max_tokens == len(ids) - k
    assert engine.requests[1].request_id == engine.requests[0].request_id
    # One report per lease, each with its own attempt's numbers.
    reports = await orch.wait_reports(2)
    assert [(r.lease_id, r.outcome) for r in reports] == [
        ("lease-1", Outcome.REPLICA_ERROR),
        ("lease-2", Outcome.SUCCESS),
    ]
    assert [(r.prompt_tokens, r.completion_tokens) for r in reports] == [
        (len(PROMPT), k),
        (len(PROMPT) + k, len(ids) - k),
    ]
    assert [r.kv_cache_reused_blocks for r in reports] == [1, 3]
    assert all(r.ttft_ms is not None for r in reports)
    # Usage counts every token once, under the original prompt and the last replica.
    [record] = usage.records
    assert (record.outcome, record.prompt_tokens, record.completion_tokens) == (
        "success",
        len(PROMPT),
        len(ids),
    )
    assert record.replica == "r2"
    assert migrations("mid_stream", "migrated") == before + 1


async def test_several_migrations_exclude_every_failed_replica(model: ServedModel) -> None:
    ids = model.encode(" one two three four five six")
    engine = FakeEngine(
        [
            [*tokens(*ids[:2]), fault()],
            [*tokens(*ids[2:3]), fault("INTERNAL: boom")],
            [*tokens(*ids[3:]), chunk(final=True)],
        ]
    )
    core, orch, _ = make(model, engine, max_migrations=2)
    events = await collect(core, request(max_tokens=len(ids)))
    assert_one_contiguous_stream(events, ids)
    assert [set(a.exclude_replicas) for a in orch.admits] == [set(), {"r1"}, {"r1", "r2"}]
    assert [len(r.input_ids) for r in engine.requests] == [len(PROMPT) + n for n in (0, 2, 3)]
    assert [r.max_tokens for r in engine.requests] == [len(ids) - n for n in (0, 2, 3)]


async def test_migration_limit_then_unavailable(model: ServedModel) -> None:
    ids = model.encode(" one two three four")
    engine = FakeEngine([[*tokens(ids[0]), fault()], [*tokens(ids[1]), fault("gone again")]])
    core, orch, usage = make(model, engine, max_migrations=1)
    before = migrations("mid_stream", "limit_reached")
    got: list[Event] = []

    async def consume() -> None:
        async for ev in core.generate(request(max_tokens=len(ids)), 10.0):
            got.append(ev)

    with pytest.raises(ReplicaFailed, match="r2 failed: gone again"):
        await consume()
    assert [t for d in deltas(got) for t in d.token_ids] == ids[:2]
    assert len(orch.admits) == 2
    assert migrations("mid_stream", "limit_reached") == before + 1
    [record] = usage.records
    assert (record.outcome, record.completion_tokens) == ("replica_error", 2)


async def test_no_migration_when_disabled(model: ServedModel) -> None:
    ids = model.encode(" ok then")
    engine = FakeEngine([[chunk(ids[0]), fault()]])
    core, orch, _ = make(model, engine, max_migrations=0)
    with pytest.raises(ReplicaFailed, match="r1"):
        await collect(core, request())
    assert len(orch.admits) == 1


async def test_request_errors_are_not_migrated(model: ServedModel) -> None:
    ids = model.encode(" ok then")
    engine = FakeEngine(
        [[chunk(ids[0]), TritonStreamError("bad sampling parameter", replica_fault=False)]]
    )
    core, orch, _ = make(model, engine)
    with pytest.raises(ReplicaFailed, match="bad sampling parameter"):
        await collect(core, request())
    assert len(orch.admits) == 1


async def test_an_engine_refusing_the_clients_input_is_invalid_argument_at_once(
    model: ServedModel,
) -> None:
    """Not tried on another replica (each would refuse it), not UNAVAILABLE (a client would
    retry it); the report counts against no replica."""
    refused = "prompt of 9000 tokens exceeds max_num_tokens=8192 (chunked context is not enabled)"
    engine = FakeEngine([[TritonStreamError(refused, classify_message(refused))]] * 2)
    core, orch, _ = make(model, engine, retries_before_first_token=1)
    with pytest.raises(InvalidRequest, match="exceeds max_num_tokens"):
        await collect(core, request())
    assert len(orch.admits) == 1
    reports = await orch.wait_reports(1)
    assert [r.outcome for r in reports] == [Outcome.REQUEST_ERROR]


async def test_a_continuation_refused_for_its_size_is_not_blamed_on_the_client(
    model: ServedModel,
) -> None:
    """A continuation is the prompt and the tokens generated, built by the gateway: a refusal
    of its size is the replica failure's consequence, not the client's bad input (no 400)."""
    ids = model.encode(" one two")
    refused = "prompt of 9000 tokens exceeds max_num_tokens=8192 (chunked context is not enabled)"
    engine = FakeEngine(
        [[chunk(ids[0]), fault()], [TritonStreamError(refused, classify_message(refused))]]
    )
    core, orch, _ = make(model, engine)
    with pytest.raises(ReplicaFailed, match="exceeds max_num_tokens"):
        await collect(core, request(max_tokens=len(ids)))
    assert len(orch.admits) == 2


async def test_a_continuation_given_a_full_engine_goes_on_elsewhere(model: ServedModel) -> None:
    """A stream already started is not ended by back-pressure on the replica its continuation
    was given: it is admitted again, not there."""
    ids = model.encode(" one two three four")
    busy = "RESOURCE_EXHAUSTED: maximum queue size of 4 reached"
    engine = FakeEngine(
        [
            [*tokens(*ids[:2]), fault()],
            [TritonStreamError(busy, classify_message(busy))],
            [*tokens(*ids[2:]), chunk(final=True)],
        ]
    )
    core, orch, _ = make(model, engine, max_migrations=2)
    events = await collect(core, request(max_tokens=len(ids)))
    assert_one_contiguous_stream(events, ids)
    assert [set(a.exclude_replicas) for a in orch.admits] == [set(), {"r1"}, {"r1", "r2"}]
    reports = await orch.wait_reports(3)
    assert [r.outcome for r in reports] == [
        Outcome.REPLICA_ERROR,
        Outcome.REQUEST_ERROR,  # full, not failed: nothing against its health
        Outcome.SUCCESS,
    ]


async def test_a_full_replica_is_passed_over_for_the_next_admission_only(
    model: ServedModel,
) -> None:
    """Full is not failing: later in the same request it may take the stream again."""
    ids = model.encode(" one two three four")
    busy = "RESOURCE_EXHAUSTED: maximum queue size of 4 reached"
    engine = FakeEngine(
        [
            [*tokens(*ids[:1]), fault()],
            [TritonStreamError(busy, classify_message(busy))],
            [*tokens(*ids[1:2]), fault()],
            [*tokens(*ids[2:]), chunk(final=True)],
        ]
    )
    core, orch, _ = make(model, engine, max_migrations=3)
    events = await collect(core, request(max_tokens=len(ids)))
    assert_one_contiguous_stream(events, ids)
    assert [set(a.exclude_replicas) for a in orch.admits] == [
        set(),
        {"r1"},
        {"r1", "r2"},  # r2 was full
        {"r1", "r3"},  # r3 failed; r2 may be given again
    ]


async def test_a_continuation_not_admitted_before_the_deadline_is_a_deadline(
    model: ServedModel,
) -> None:
    ids = model.encode(" one two")
    engine = FakeEngine([[chunk(ids[0]), fault()]])
    core, orch, _ = make(model, engine)
    events = core.generate(request(max_tokens=len(ids)), 10.0)
    assert isinstance(await anext(events), Delta)
    orch.reject = DeadlineExceeded("admission: Deadline Exceeded", reason=Reason.QUEUE_TIMEOUT)
    before = migrations("mid_stream", "admission_failed")
    with pytest.raises(DeadlineExceeded):  # 504: not "unavailable, retry"
        await anext(events)
    assert migrations("mid_stream", "admission_failed") == before + 1


async def test_no_continuation_is_admitted_once_the_deadline_passed(model: ServedModel) -> None:
    ids = model.encode(" one two")
    hang = Hang()
    engine = FakeEngine([[chunk(ids[0]), hang, fault()]])
    core, orch, _ = make(model, engine)
    events = core.generate(request(max_tokens=len(ids)), 0.5)
    assert isinstance(await anext(events), Delta)
    await asyncio.sleep(0.6)  # the request's deadline passes while its replica hangs
    hang.release.set()  # then the replica fails
    with pytest.raises(DeadlineExceeded):
        await anext(events)
    assert len(orch.admits) == 1  # no lease that could only be wasted


async def test_a_request_the_engines_refuse_before_any_token_counts_against_no_replica(
    model: ServedModel,
) -> None:
    """Tried again elsewhere (a refusal no rule names may be a replica's: the retry passes
    over the replica that refused), then unavailable; neither report counts against a
    replica's health."""
    refused = "top_k 100000 exceeds the engine's limit"
    engine = FakeEngine([[TritonStreamError(refused, classify_message(refused))]] * 2)
    core, orch, _ = make(model, engine, retries_before_first_token=1)
    with pytest.raises(ReplicaFailed, match="exceeds the engine's limit"):
        await collect(core, request())
    assert [set(a.exclude_replicas) for a in orch.admits] == [set(), {"r1"}]
    reports = await orch.wait_reports(2)
    assert [r.outcome for r in reports] == [Outcome.REQUEST_ERROR] * 2


async def test_a_full_engine_before_any_token_is_retried_on_another_replica(
    model: ServedModel,
) -> None:
    busy = "RESOURCE_EXHAUSTED: maximum queue size of 4 reached"
    ids = model.encode(" ok")
    engine = FakeEngine(
        [[TritonStreamError(busy, classify_message(busy))], [chunk(ids[0], final=True)]]
    )
    core, orch, _ = make(model, engine, retries_before_first_token=1)
    await collect(core, request())
    assert [set(a.exclude_replicas) for a in orch.admits] == [set(), {"r1"}]


async def test_partially_matched_stop_string_still_stops_after_migration(
    model: ServedModel,
) -> None:
    ids = model.encode(" alpha beta gamma delta epsilon")
    # " beta" (the stop string's start) arrives before the failure, " gamma" after it.
    engine = FakeEngine([[*tokens(*ids[:2]), fault()], [*tokens(*ids[2:]), chunk(final=True)]])
    core, orch, _ = make(model, engine)
    events = await collect(core, request(max_tokens=50, stop=("beta gamma",)))
    assert "".join(d.text for d in deltas(events)) == " alpha "
    final = events[-1]
    assert isinstance(final, Completion)
    assert final.finish_reason is FinishReason.STOP
    assert final.completion_tokens == 3  # the stop string's last token, then no more read
    assert len(orch.admits) == 2


async def test_stall_timeout_migrates_and_cancels_the_stalled_stream(
    model: ServedModel,
) -> None:
    ids = model.encode(" one two three four")
    engine = FakeEngine([[*tokens(*ids[:2]), Hang()], [*tokens(*ids[2:]), chunk(final=True)]])
    core, orch, _ = make(model, engine, stall_timeout_s=0.05)
    events = await collect(core, request(max_tokens=len(ids)))
    assert_one_contiguous_stream(events, ids)
    assert engine.cancelled == 1
    assert orch.admits[1].exclude_replicas == {"r1"}
    report = (await orch.wait_reports(2))[0]
    assert report.outcome is Outcome.REPLICA_ERROR
    assert "stall timeout" in report.error


async def test_failure_before_first_token_excludes_the_replica(model: ServedModel) -> None:
    ids = model.encode(" ok")
    engine = FakeEngine([[fault()], [*tokens(*ids), chunk(final=True)]])
    core, orch, _ = make(model, engine, max_migrations=0)  # before the first token: retries
    before = migrations("before_first_token", "migrated")
    events = await collect(core, request(max_tokens=len(ids)))
    assert_one_contiguous_stream(events, ids)
    assert orch.admits[1].exclude_replicas == {"r1"}
    assert list(orch.admits[1].prompt_token_ids) == PROMPT
    assert migrations("before_first_token", "migrated") == before + 1


class OneReplica(FakeAdmission):
    """A cluster of one replica: an Admit that excludes it finds none."""

    async def admit(self, request: AdmissionRequest, *, timeout_s: float) -> Lease:
        if request.exclude_replicas:
            self.admits.append(request)
            raise NoReplica(f"no ready replica (excluding {sorted(request.exclude_replicas)})")
        return await super().admit(request, timeout_s=timeout_s)


async def test_the_only_replica_full_before_any_token_is_its_back_pressure_not_no_replica(
    model: ServedModel,
) -> None:
    """The retry passes over the full replica; with none other, the client gets the engine's
    answer (RESOURCE_EXHAUSTED with a retry-after: come back later), not UNAVAILABLE."""
    busy = "RESOURCE_EXHAUSTED: maximum queue size of 4 reached"
    engine = FakeEngine([[TritonStreamError(busy, classify_message(busy))]])
    core, orch, _ = make(model, engine, OneReplica(), retries_before_first_token=1)
    with pytest.raises(ResourceExhausted) as caught:
        await collect(core, request())
    assert caught.value.retry_after_s is not None
    assert len(orch.admits) == 2


async def test_no_replica_left_to_continue_on_is_unavailable(model: ServedModel) -> None:
    ids = model.encode(" one two")
    engine = FakeEngine([[chunk(ids[0]), fault()]])
    core, orch, _ = make(model, engine)
    before = migrations("mid_stream", "admission_failed")
    events = core.generate(request(max_tokens=len(ids)), 10.0)
    first = await anext(events)
    assert isinstance(first, Delta)
    orch.reject = NoReplica("no ready replica (excluding r1)")
    with pytest.raises(ReplicaFailed, match=r"replica r1 failed.*no other replica"):
        await anext(events)
    assert migrations("mid_stream", "admission_failed") == before + 1


async def test_a_caller_re_attached_to_a_running_generation_gets_its_own_deadline(
    model: ServedModel,
) -> None:
    """A retry with the same key and a shorter deadline ends at that deadline (the first
    caller's generation goes on), not when the generation ends."""
    ids = model.encode(" one two")
    hang = Hang()
    engine = FakeEngine([[chunk(ids[0]), hang, chunk(ids[1], final=True)]])
    core, _, _ = make(model, engine)
    req = GenerationRequest(
        model=MODEL, request_id="key-d", prompt_ids=PROMPT, sampling=Sampling(), keyed=True
    )
    first = core.generate(req, 30.0)
    assert isinstance(await anext(first), Delta)
    retry = core.generate(req, 0.2)
    assert isinstance(await anext(retry), Delta)  # the log so far
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(anext(retry), 10)
    await retry.aclose()
    hang.release.set()
    rest = [ev async for ev in first]
    assert isinstance(rest[-1], Completion)
    assert rest[-1].completion_tokens == len(ids)


async def test_resume_store_across_a_migration(model: ServedModel) -> None:
    ids = model.encode(" one two three four five")
    engine = FakeEngine([[*tokens(*ids[:2]), fault()], [*tokens(*ids[2:]), chunk(final=True)]])
    core, _, _ = make(model, engine)
    req = GenerationRequest(
        model=MODEL,
        request_id="key-1",
        prompt_ids=PROMPT,
        sampling=Sampling(max_tokens=len(ids)),
        keyed=True,
    )
    whole = await collect(core, req)
    assert_one_contiguous_stream(whole, ids)
    # Resuming from an offset before the migration and from one after it: the rest, once.
    for offset in (1, 3):
        rest = await collect(core, dataclasses.replace(req, resume_from=offset))
        assert [t for d in deltas(rest) for t in d.token_ids] == ids[offset:]
        assert deltas(rest)[0].offset == offset
        assert rest[-1] == whole[-1]
    assert len(engine.requests) == 2  # nothing generated again


class SharedReplicaAdmission(FakeAdmission):
    """The first two leases are on the same replica (r1); later ones on r3, r4, ..."""

    async def admit(self, request: Any, *, timeout_s: float) -> Any:
        lease = await super().admit(request, timeout_s=timeout_s)
        if len(self.admits) == 2:
            lease = dataclasses.replace(lease, replica=dataclasses.replace(lease.replica, id="r1"))
        return lease


async def test_a_dead_backend_seen_by_one_stream_moves_the_others_on_at_once(
    model: ServedModel,
) -> None:
    """Streams already running on a replica whose backend stub died get no error, only silence.
    When a new stream on that replica is told the stub is dead, the waiting ones migrate at once
    (stall timeout off here: without the trip, the first request would wait out its deadline)."""
    a, b, x = model.encode(" alpha beta gamma")[:3]
    dead = classify_message("Stub process 'tensorrt_llm_0_0' is not healthy.")
    assert dead.replica_wide
    engine = FakeEngine(
        [
            [chunk(a), Hang()],  # request 1 on r1: one token, then silence
            [TritonStreamError("Stub process 'tensorrt_llm_0_0' is not healthy.", dead)],
            [chunk(x), chunk(final=True)],  # request 2, retried before its first token
            [chunk(b), chunk(final=True)],  # request 1's continuation
        ]
    )
    core, orch, _ = make(model, engine, SharedReplicaAdmission(), stall_timeout_s=0)
    first = core.generate(
        GenerationRequest(
            model=MODEL, request_id="one", prompt_ids=PROMPT, sampling=Sampling(max_tokens=2)
        ),
        10.0,
    )
    head = await anext(first)
    assert isinstance(head, Delta)
    assert head.token_ids == [a]
    second = await collect(
        core,
        GenerationRequest(
            model=MODEL, request_id="two", prompt_ids=PROMPT, sampling=Sampling(max_tokens=1)
        ),
    )
    rest = [ev async for ev in first]
    assert [t for d in deltas([head, *rest]) for t in d.token_ids] == [a, b]
    assert [t for d in deltas(second) for t in d.token_ids] == [x]
    (tripped,) = [r for r in orch.reports if r.lease_id == "lease-1"]
    assert tripped.outcome is Outcome.REPLICA_ERROR
    assert "another stream saw this replica fail (backend_dead)" in tripped.error


async def test_a_migration_is_a_span_event_and_a_log_line_with_the_request_id(
    model: ServedModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(gateway_core, "_tracer", provider.get_tracer("test"))
    ids = model.encode(" one two three four five six")
    engine = FakeEngine(
        [[*tokens(*ids[:3]), fault("stream broken")], [*tokens(*ids[3:]), chunk(final=True)]]
    )
    core, _, _ = make(model, engine)
    with caplog.at_level(logging.WARNING, logger="services.gateway.attempts"):
        events = await collect(core, request(max_tokens=len(ids)))
    assert_one_contiguous_stream(events, ids)

    [span] = [s for s in exporter.get_finished_spans() if s.name == "gateway.generate"]
    migration = {e.name: dict(e.attributes or {}) for e in span.events}
    assert migration["migration"] == {
        "llmmesh.replica": "r1",
        "llmmesh.phase": "mid_stream",
        "llmmesh.tokens": 3,
        "llmmesh.error": "replica r1 failed: stream broken",
        "llmmesh.allowed": True,
    }
    assert migration["migration.admitted"] == {
        "llmmesh.replica": "r2",
        "llmmesh.phase": "mid_stream",
    }
    migrated = [r for r in caplog.records if r.getMessage() == "request migrated"]
    assert [(r.__dict__["request_id"], r.__dict__["replica"]) for r in migrated] == [
        ("req-7", "r2")
    ]
