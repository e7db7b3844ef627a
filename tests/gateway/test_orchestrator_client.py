"""`OrchestratorClient` over a real grpc.aio channel (ephemeral port) against a tiny fake
OrchestratorService: every field converted both ways, refusals mapped by their typed reason
(never by message text), retry-after kept, Complete retried in the background. Admits go both
ways the client sends them (`served` is parametrized): on the AdmitStream and as Admit calls;
an orchestrator without AdmitStream gets Admit calls."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from opentelemetry.sdk.trace import TracerProvider

from llmmesh.common.errors import (
    NOT_OFFERED,
    DeadlineExceeded,
    Reason,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    abort,
    code_number,
)
from llmmesh.common.sojourn import CALLER_KEY, SENT_AT_KEY
from llmmesh.common.topology import Priority, ReplicaAddress
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as pb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from llmmesh.kvblocks import (
    BlockConfig,
    ChunkedHashes,
    block_hashes,
    hashes_from_le64,
    tokens_from_bytes,
)
from services.gateway import orchestrator_client
from services.gateway.admission import AdmissionRequest, LeaseReport, Outcome
from services.gateway.errors import NoReplica, OrchestratorTimedOut, OrchestratorUnavailable
from services.gateway.orchestrator_client import (
    COMPLETE_ATTEMPTS,
    NOT_OFFERED_RETRY_S,
    OrchestratorClient,
    StreamEnded,
    replica_from_pb,
)
from tests.helpers import ManualClock, eventually

Ctx = grpc.aio.ServicerContext[object, object]

REPLICA = pb.Replica(
    id="r-9",
    grpc_address="10.0.0.9:8001",
    pool="long-context",
    model_version="v3",
    authority="triton-long.llm.svc.cluster.local:8001",
)


class FakeOrchestratorService(pb_grpc.OrchestratorServiceServicer):
    """Grants lease-9 on REPLICA unless told to refuse; its first `complete_failures` Complete
    or CompleteBatch calls fail with UNAVAILABLE; CompleteBatch is UNIMPLEMENTED (an older
    orchestrator) while `batches` is False."""

    def __init__(self) -> None:
        self.admits: list[pb.AdmitRequest] = []
        self.admit_metadata: list[dict[str, str]] = []
        self.refusal: ServiceError | None = None  # sent with its typed reason and retry-after
        self.plain_refusal: tuple[grpc.StatusCode, str] | None = None  # no status details
        self.completes: list[pb.CompleteRequest] = []
        self.complete_failures = 0
        self.complete_failure_code = grpc.StatusCode.UNAVAILABLE
        self.complete_calls: list[tuple[str, int]] = []  # (method, reports) per call
        self.batches = True
        self.batch_refusal = grpc.StatusCode.UNIMPLEMENTED  # while `batches` is False
        self.replicas = pb.ListReplicasResponse()
        self.hold: asyncio.Event | None = None  # Admit waits for it, once `holding` is set
        self.list_hold: asyncio.Event | None = None  # ListReplicas waits for it
        self.list_refusal: grpc.StatusCode | None = None  # ListReplicas answers it
        self.held: list[tuple[int, list[str]]] = []  # each stream's `held`: number, leases
        self.holding = asyncio.Event()
        self.streams = True  # AdmitStream refused with `stream_refusal` while False
        self.stream_refusal = grpc.StatusCode.UNIMPLEMENTED
        self.cancels: list[int] = []
        self.ignore_cancels = False  # answer a withdrawn Admit all the same
        self.end_streams = asyncio.Event()  # every AdmitStream ends, Admits unanswered...
        self.end_status: grpc.StatusCode | None = None  # ...with this status (None: OK)
        self.stream_calls = 0
        self.granted = 0

    async def Admit(self, request: pb.AdmitRequest, context: Ctx) -> pb.AdmitResponse:
        self.admits.append(request)
        self.admit_metadata.append(
            {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        )
        if self.refusal is not None:
            await abort(context, self.refusal)
        if self.plain_refusal is not None:
            await context.abort(*self.plain_refusal)
        return await self._lease()

    async def _lease(self) -> pb.AdmitResponse:
        if self.hold is not None:
            self.holding.set()
            await self.hold.wait()
        self.granted += 1
        return pb.AdmitResponse(
            lease_id=f"lease-{self.granted + 8}", replica=REPLICA, queue_ms=12.5
        )

    async def AdmitStream(
        self, request_iterator: AsyncIterator[pb.AdmitStreamRequest], context: Ctx
    ) -> AsyncIterator[pb.AdmitStreamResponse]:
        """Each Admit as `Admit` decides it, its metadata from the call's and its own fields;
        refusals as fields. `cancels`: the call ids withdrawn."""
        self.stream_calls += 1
        if not self.streams:
            await context.abort(self.stream_refusal, "an older orchestrator, or the mesh's policy")
        stream_md = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        answers: asyncio.Queue[pb.AdmitStreamResponse | None] = asyncio.Queue()
        tasks: dict[int, asyncio.Task[None]] = {}

        async def one(msg: pb.AdmitStreamRequest) -> None:
            self.admits.append(msg.admit)
            self.admit_metadata.append(
                {**stream_md, SENT_AT_KEY: f"{msg.sent_at_unix_s:.6f}", **msg.trace_context}
            )
            answer = pb.AdmitStreamResponse(call_id=msg.call_id)
            err = self.refusal
            if err is not None:
                answer.refusal.code, answer.refusal.message = code_number(err.code), str(err)
                if err.reason is not None:
                    answer.refusal.reason = err.reason.value
                if err.retry_after_s is not None:
                    answer.refusal.retry_after_s = err.retry_after_s
            elif self.plain_refusal is not None:
                code, message = self.plain_refusal
                answer.refusal.CopyFrom(pb.AdmitRefusal(code=code_number(code), message=message))
            else:
                answer.lease.CopyFrom(await self._lease())
            await answers.put(answer)

        async def read() -> None:
            async for msg in request_iterator:
                if msg.HasField("held"):
                    self.held.append((msg.held.stream, sorted(msg.held.lease_ids)))
                elif msg.HasField("admit"):
                    tasks[msg.call_id] = asyncio.create_task(one(msg))
                else:
                    self.cancels.append(msg.call_id)
                    if not self.ignore_cancels:
                        tasks[msg.call_id].cancel()
            await answers.put(None)

        ended = False

        async def end() -> None:
            nonlocal ended
            await self.end_streams.wait()
            ended = True
            await answers.put(None)

        reader, ender = asyncio.create_task(read()), asyncio.create_task(end())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            if ended and self.end_status is not None:
                await context.abort(self.end_status, "the stream broke")
        finally:
            reader.cancel()
            ender.cancel()

    async def Complete(self, request: pb.CompleteRequest, context: Ctx) -> pb.CompleteResponse:
        await self._reports("Complete", [request], context)
        return pb.CompleteResponse()

    async def CompleteBatch(
        self, request: pb.CompleteBatchRequest, context: Ctx
    ) -> pb.CompleteBatchResponse:
        if not self.batches:
            await context.abort(self.batch_refusal, "an older orchestrator, or the mesh's policy")
        await self._reports("CompleteBatch", list(request.reports), context)
        return pb.CompleteBatchResponse()

    async def _reports(self, method: str, reports: list[pb.CompleteRequest], context: Ctx) -> None:
        self.completes.extend(reports)
        self.complete_calls.append((method, len(reports)))
        if len(self.complete_calls) <= self.complete_failures:
            await context.abort(self.complete_failure_code, "busy")

    # Not used by the gateway (ListReplicas above is its readiness check).
    async def ListReplicas(
        self, request: pb.ListReplicasRequest, context: Ctx
    ) -> pb.ListReplicasResponse:
        if self.list_hold is not None:
            await self.list_hold.wait()
        if self.list_refusal is not None:
            await context.abort(self.list_refusal, "refused")
        return self.replicas

    async def RegisterReplica(
        self, request: pb.RegisterReplicaRequest, context: Ctx
    ) -> pb.RegisterReplicaResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not faked")

    async def DrainReplica(
        self, request: pb.DrainReplicaRequest, context: Ctx
    ) -> pb.DrainReplicaResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not faked")

    async def DeregisterReplica(
        self, request: pb.DeregisterReplicaRequest, context: Ctx
    ) -> pb.DeregisterReplicaResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not faked")


@dataclass
class Served:
    service: FakeOrchestratorService
    client: OrchestratorClient
    clock: ManualClock  # when the client tries a refused method again


@contextlib.asynccontextmanager
async def serve(
    *, admit_stream: bool, hasher: ChunkedHashes | None = None, complete_retry_s: float = 5.0
) -> AsyncIterator[Served]:
    """The fake on an ephemeral port, and a client sending Admits on the AdmitStream or as
    Admit calls."""
    service = FakeOrchestratorService()
    server = grpc.aio.server()
    pb_grpc.add_OrchestratorServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    clock = ManualClock()
    client = OrchestratorClient.connect(
        f"127.0.0.1:{port}",
        admit_stream=admit_stream,
        hasher=hasher,
        complete_retry_s=complete_retry_s,
        clock=clock,
    )
    try:
        yield Served(service, client, clock)
    finally:
        await client.close()
        await server.stop(None)


@pytest_asyncio.fixture(loop_scope="session", params=["stream", "calls"])
async def served(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    async with serve(admit_stream=request.param == "stream") as s:
        yield s


@pytest_asyncio.fixture(loop_scope="session")
async def streamed() -> AsyncIterator[Served]:
    async with serve(admit_stream=True) as s:
        yield s


def admission(**kw: object) -> AdmissionRequest:
    base: dict[str, object] = {
        "request_id": "req-1",
        "model": "tensorrt_llm",
        "prompt_token_ids": [5, 6, 7],
        "max_tokens": 16,
        "priority": Priority.BATCH,
        "tenant": "acme",
        "model_version": "v3",
        "exclude_replicas": frozenset({"r-2", "r-1"}),
    }
    base.update(kw)
    return AdmissionRequest(**base)  # type: ignore[arg-type]


async def test_admit_round_trip_carries_every_field(served: Served) -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("caller") as span:
        lease = await served.client.admit(admission(), timeout_s=5.0)
    assert lease.lease_id == "lease-9"
    assert lease.queue_ms == 12.5
    assert lease.replica == ReplicaAddress(
        id="r-9",
        grpc_address="10.0.0.9:8001",
        pool="long-context",
        model_version="v3",
        authority="triton-long.llm.svc.cluster.local:8001",
    )
    [sent] = served.service.admits
    # The prompt travels packed: one bytes field, not a varint per token.
    assert (sent.request_id, sent.model, list(tokens_from_bytes(sent.prompt_tokens_le32))) == (
        "req-1",
        "tensorrt_llm",
        [5, 6, 7],
    )
    assert not sent.prompt_token_ids
    assert (sent.max_tokens, sent.tenant, sent.model_version) == (16, "acme", "v3")
    assert sent.priority == pb.PRIORITY_BATCH
    assert list(sent.exclude_replicas) == ["r-1", "r-2"]
    # The caller's trace continues in the orchestrator.
    traceparent = served.service.admit_metadata[0]["traceparent"]
    assert traceparent.split("-")[1] == format(span.get_span_context().trace_id, "032x")
    # Who sent it and when, from which the orchestrator reads how long the call waited.
    assert served.service.admit_metadata[0][CALLER_KEY] == served.client.caller
    assert abs(float(served.service.admit_metadata[0][SENT_AT_KEY]) - time.time()) < 60


@pytest.mark.parametrize(
    ("priority", "wire"),
    [
        (Priority.INTERACTIVE, pb.PRIORITY_INTERACTIVE),
        (Priority.STANDARD, pb.PRIORITY_STANDARD),
        (Priority.BATCH, pb.PRIORITY_BATCH),
    ],
)
async def test_priority_reaches_the_wire(
    served: Served, priority: Priority, wire: pb.Priority.ValueType
) -> None:
    await served.client.admit(admission(priority=priority), timeout_s=5.0)
    assert served.service.admits[0].priority == wire


@pytest.mark.parametrize("reason", [Reason.NO_REPLICA, Reason.ACTIVATION_TIMEOUT])
async def test_unavailable_with_a_replica_reason_is_no_replica(
    served: Served, reason: Reason
) -> None:
    served.service.refusal = Unavailable("nothing ready", reason=reason)
    with pytest.raises(NoReplica) as info:
        await served.client.admit(admission(), timeout_s=5.0)
    assert info.value.reason is reason
    assert info.value.http_status == 503
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


async def test_unavailable_without_reason_is_the_orchestrator_whatever_the_text(
    served: Served,
) -> None:
    # The message names a replica, the status carries no reason: only the reason counts.
    served.service.plain_refusal = (grpc.StatusCode.UNAVAILABLE, "no ready replica")
    with pytest.raises(OrchestratorUnavailable) as info:
        await served.client.admit(admission(), timeout_s=5.0)
    assert info.value.reason is None
    assert not isinstance(info.value, NoReplica)


async def test_a_call_the_orchestrator_dropped_is_dropped(served: Served) -> None:
    # gRPC cancels calls a saturated server held too long unstarted: not the caller's cancel.
    served.service.plain_refusal = (grpc.StatusCode.CANCELLED, "CANCELLED")
    with pytest.raises(ResourceExhausted) as info:
        await served.client.admit(admission(), timeout_s=5.0)
    assert info.value.reason is Reason.DROPPED
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_the_caller_s_own_cancel_stays_a_cancel(served: Served) -> None:
    held = asyncio.Event()
    served.service.hold = held
    call = asyncio.ensure_future(served.client.admit(admission(), timeout_s=5.0))
    await served.service.holding.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    held.set()


async def test_nothing_listening_is_orchestrator_unavailable(tmp_path: Path) -> None:
    client = OrchestratorClient.connect(f"unix:{tmp_path / 'absent.sock'}")
    try:
        with pytest.raises(OrchestratorUnavailable):
            await client.admit(admission(), timeout_s=5.0)
    finally:
        await client.close()


async def test_queue_full_keeps_retry_after_and_reason(served: Served) -> None:
    served.service.refusal = ResourceExhausted(
        "admission queue full", retry_after_s=2.4, reason=Reason.QUEUE_FULL
    )
    with pytest.raises(ResourceExhausted) as info:
        await served.client.admit(admission(), timeout_s=5.0)
    assert info.value.retry_after_s == pytest.approx(2.4)
    assert info.value.reason is Reason.QUEUE_FULL
    assert info.value.http_status == 429


async def test_queue_timeout_is_deadline_exceeded(served: Served) -> None:
    served.service.refusal = DeadlineExceeded("no slot", reason=Reason.QUEUE_TIMEOUT)
    with pytest.raises(DeadlineExceeded) as info:
        await served.client.admit(admission(), timeout_s=5.0)
    assert info.value.reason is Reason.QUEUE_TIMEOUT


@pytest.mark.parametrize(
    ("outcome", "wire"),
    [
        (Outcome.SUCCESS, pb.OUTCOME_SUCCESS),
        (Outcome.CANCELLED, pb.OUTCOME_CANCELLED),
        (Outcome.REPLICA_ERROR, pb.OUTCOME_REPLICA_ERROR),
        (Outcome.REQUEST_ERROR, pb.OUTCOME_REQUEST_ERROR),
    ],
)
async def test_complete_carries_every_field(
    served: Served, outcome: Outcome, wire: pb.Outcome.ValueType
) -> None:
    served.client.complete(
        LeaseReport(
            lease_id="lease-9",
            outcome=outcome,
            prompt_tokens=40,
            completion_tokens=7,
            kv_cache_reused_blocks=1,
            ttft_ms=31.5,
            error="boom",
        )
    )
    await served.client.drain()
    [sent] = served.service.completes
    assert (sent.lease_id, sent.outcome, sent.error_message) == ("lease-9", wire, "boom")
    assert (sent.prompt_tokens, sent.completion_tokens, sent.kv_cache_reused_blocks) == (40, 7, 1)
    assert sent.HasField("time_to_first_token_ms")
    assert sent.time_to_first_token_ms == 31.5


async def test_complete_without_a_token_sends_no_ttft(served: Served) -> None:
    served.client.complete(LeaseReport("lease-9", Outcome.CANCELLED, 40, 0, 0, None))
    await served.client.drain()
    assert not served.service.completes[0].HasField("time_to_first_token_ms")


@pytest.mark.parametrize("batches", [True, False])
async def test_complete_is_retried_through_an_outage_then_given_up(
    served: Served, batches: bool
) -> None:
    served.service.batches = batches
    # Failing for a while (a restarting sidecar, an overloaded orchestrator): tried again
    # with backoff until it takes the report, not dropped after a few quick tries.
    served.service.complete_failures = COMPLETE_ATTEMPTS + 1
    served.client.complete(LeaseReport("lease-1", Outcome.SUCCESS, 1, 1, 0, 1.0))

    async def delivered() -> bool:
        return served.client.pending == 0 and len(served.service.completes) > COMPLETE_ATTEMPTS

    await eventually(delivered, what="the report delivered through the outage")
    assert [c.lease_id for c in served.service.completes] == ["lease-1"] * (COMPLETE_ATTEMPTS + 2)

    async with serve(admit_stream=False, complete_retry_s=1.0) as short:
        short.service.batches = batches
        short.service.complete_failures = 1000
        short.client.complete(LeaseReport("lease-2", Outcome.SUCCESS, 1, 1, 0, 1.0))

        async def sent() -> bool:
            return short.client.pending == 0

        await eventually(sent, what="the report given up on after complete_retry_s")
        assert COMPLETE_ATTEMPTS < len(short.service.completes) < 1000
        # Given up on once: the next report is tried COMPLETE_ATTEMPTS times, not a window
        # more, until a call succeeds; so are the last ones, once closing.
        for lease in ("lease-3", "lease-4"):
            short.service.completes.clear()
            short.client.complete(LeaseReport(lease, Outcome.SUCCESS, 1, 1, 0, 1.0))
            if lease == "lease-3":
                await eventually(sent, what="the report given up on")
            else:
                await short.client.close()
            assert [c.lease_id for c in short.service.completes] == [lease] * COMPLETE_ATTEMPTS


async def test_a_report_refused_for_good_is_not_retried_for_a_window(served: Served) -> None:
    served.service.complete_failures = 1000
    served.service.complete_failure_code = grpc.StatusCode.INVALID_ARGUMENT
    served.client.complete(LeaseReport("lease-1", Outcome.SUCCESS, 1, 1, 0, 1.0))

    async def sent() -> bool:
        return served.client.pending == 0

    await eventually(sent, what="the report given up on")
    assert [c.lease_id for c in served.service.completes] == ["lease-1"] * COMPLETE_ATTEMPTS
    # That refusal spent no retry window: the next outage still gets one.
    served.service.completes.clear()
    served.service.complete_calls.clear()
    served.service.complete_failures = COMPLETE_ATTEMPTS + 1
    served.service.complete_failure_code = grpc.StatusCode.UNAVAILABLE
    served.client.complete(LeaseReport("lease-2", Outcome.SUCCESS, 1, 1, 0, 1.0))

    async def delivered() -> bool:
        return sent_now() and len(served.service.completes) > COMPLETE_ATTEMPTS

    def sent_now() -> bool:
        return served.client.pending == 0

    await eventually(delivered, what="the next report delivered through an outage")
    assert [c.lease_id for c in served.service.completes] == ["lease-2"] * (COMPLETE_ATTEMPTS + 2)


async def test_reports_that_come_together_share_one_call_in_order(served: Served) -> None:
    for i in range(5):
        served.client.complete(LeaseReport(f"lease-{i}", Outcome.SUCCESS, 1, 1, 0, 1.0))
    assert served.client.pending == 5
    await served.client.drain()
    assert served.client.pending == 0
    assert served.service.complete_calls == [("CompleteBatch", 5)]
    assert [c.lease_id for c in served.service.completes] == [f"lease-{i}" for i in range(5)]


@pytest.mark.parametrize("refusal", sorted(NOT_OFFERED, key=str))
async def test_an_orchestrator_refusing_complete_batch_gets_a_call_per_report_for_a_while(
    served: Served, refusal: grpc.StatusCode
) -> None:
    served.service.batches = False
    served.service.batch_refusal = refusal
    for i in range(3):
        served.client.complete(LeaseReport(f"lease-{i}", Outcome.SUCCESS, 1, 1, 0, 1.0))
    await served.client.drain()
    served.service.batches = True  # not asked again yet: the client remembers the refusal
    served.client.complete(LeaseReport("lease-3", Outcome.SUCCESS, 1, 1, 0, 1.0))
    await served.client.drain()
    assert served.service.complete_calls == [("Complete", 1)] * 4
    assert sorted(c.lease_id for c in served.service.completes) == [f"lease-{i}" for i in range(4)]
    served.clock.t += NOT_OFFERED_RETRY_S  # then it is asked again (the mesh now allows it)
    served.client.complete(LeaseReport("lease-4", Outcome.SUCCESS, 1, 1, 0, 1.0))
    await served.client.drain()
    assert served.service.complete_calls[4:] == [("CompleteBatch", 1)]


async def test_a_batch_that_raises_does_not_strand_the_next(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(orchestrator_client, "COMPLETE_BATCH", 1)  # a call per report
    client = OrchestratorClient.connect(served.client.address)
    real = client._send_batch
    calls = 0

    async def once_broken(batch: list[pb.CompleteRequest]) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in the first call")
        return await real(batch)

    monkeypatch.setattr(client, "_send_batch", once_broken)
    try:
        client.complete(LeaseReport("lease-0", Outcome.SUCCESS, 1, 1, 0, 1.0))
        client.complete(LeaseReport("lease-1", Outcome.SUCCESS, 1, 1, 0, 1.0))
        await client.drain()
        assert client.pending == 0  # lease-0's call raised (logged, given up on); lease-1 went on
        assert [c.lease_id for c in served.service.completes] == ["lease-1"]
    finally:
        await client.close()


async def test_the_queue_is_bounded_and_reports_after_close_are_not_sent(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(orchestrator_client, "COMPLETE_QUEUE", 3)
    client = OrchestratorClient.connect(served.client.address)
    for i in range(5):
        client.complete(LeaseReport(f"lease-{i}", Outcome.SUCCESS, 1, 1, 0, 1.0))
    assert client.pending == 3
    await client.close()
    client.complete(LeaseReport("late", Outcome.SUCCESS, 1, 1, 0, 1.0))
    assert client.pending == 0
    assert [c.lease_id for c in served.service.completes] == ["lease-2", "lease-3", "lease-4"]


async def test_status_counts_replicas_that_can_take_a_lease(served: Served) -> None:
    served.service.replicas = pb.ListReplicasResponse(
        replicas=[
            pb.ReplicaStatus(replica=REPLICA, healthy=True, models=["a", "b"]),
            pb.ReplicaStatus(replica=REPLICA, healthy=True, draining=True),
            pb.ReplicaStatus(replica=REPLICA, healthy=False, ejected_for_s=3.0),
        ],
        queue_depth=7,
    )
    status = await served.client.status(timeout_s=5.0)
    assert (status.replicas, status.ready_replicas, status.queue_depth) == (3, 1, 7)
    # Every replica is kept, with its address (degraded mode routes over them).
    assert [k.routable for k in status.known] == [True, False, False]
    assert status.known[0].replica == replica_from_pb(REPLICA)
    assert [k.models for k in status.known[:2]] == [frozenset({"a", "b"}), frozenset()]
    assert not status.degraded


async def test_status_of_an_unreachable_orchestrator_is_orchestrator_unavailable(
    tmp_path: Path,
) -> None:
    client = OrchestratorClient.connect(f"unix:{tmp_path / 'absent.sock'}")
    try:
        with pytest.raises(OrchestratorUnavailable) as info:
            await client.status(timeout_s=5.0)
        assert not isinstance(info.value, OrchestratorTimedOut)  # not reached, not slow
    finally:
        await client.close()


@pytest.mark.parametrize("code", [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED])
async def test_a_listing_refused_is_no_sign_the_orchestrator_is_down(
    served: Served, code: grpc.StatusCode
) -> None:
    """An answer (a mesh policy, an older version): not OrchestratorUnavailable, which marks
    the orchestrator down and abandons its Admits to degraded mode."""
    served.service.list_refusal = code
    with pytest.raises(ServiceError) as info:
        await served.client.status(timeout_s=5.0)
    assert not isinstance(info.value, OrchestratorUnavailable)


async def test_status_not_answered_in_time_is_told_apart_from_unreached(served: Served) -> None:
    served.service.list_hold = asyncio.Event()  # never set: the call times out
    with pytest.raises(OrchestratorTimedOut):
        await served.client.status(timeout_s=0.05)


# -- AdmitStream ------------------------------------------------------------------------------
async def test_admits_share_one_stream_and_are_answered_by_call_id(streamed: Served) -> None:
    held = asyncio.Event()
    streamed.service.hold = held
    calls = [
        asyncio.ensure_future(streamed.client.admit(admission(request_id=f"r{i}"), timeout_s=5))
        for i in range(3)
    ]
    await wait_for(lambda: len(streamed.service.admits) == 3)
    held.set()
    leases = await asyncio.gather(*calls)
    assert sorted(lease.lease_id for lease in leases) == ["lease-10", "lease-11", "lease-9"]
    assert streamed.service.stream_calls == 1
    assert sorted(a.request_id for a in streamed.service.admits) == ["r0", "r1", "r2"]


@pytest.mark.parametrize("refusal", sorted(NOT_OFFERED, key=str))
async def test_an_orchestrator_refusing_the_stream_gets_admit_calls_for_a_while(
    streamed: Served, refusal: grpc.StatusCode
) -> None:
    streamed.service.streams = False
    streamed.service.stream_refusal = refusal
    first = await streamed.client.admit(admission(request_id="a"), timeout_s=5.0)
    second = await streamed.client.admit(admission(request_id="b"), timeout_s=5.0)
    assert (first.lease_id, second.lease_id) == ("lease-9", "lease-10")
    assert streamed.service.stream_calls == 1  # refused once, not tried again yet
    assert [a.request_id for a in streamed.service.admits] == ["a", "b"]
    streamed.service.streams = True  # e.g. the mesh's policy now allows it
    streamed.clock.t += NOT_OFFERED_RETRY_S
    third = await streamed.client.admit(admission(request_id="c"), timeout_s=5.0)
    assert third.lease_id == "lease-11"
    assert streamed.service.stream_calls == 2  # tried again, and answered on the stream
    assert streamed.service.held == []  # no stream was taken before: nothing to list
    stream = streamed.client._stream
    assert stream is not None
    assert stream.ended is None
    assert [a.request_id for a in streamed.service.admits] == ["a", "b", "c"]


async def test_a_stream_reopened_for_a_held_lease_and_refused_is_not_opened_again(
    streamed: Served,
) -> None:
    """A stream opened again for a held lease, refused as such with no Admit on it, stops
    streams for a while too: no reopening every `STREAM_REOPEN_S`, Admits go as calls."""
    client, service = streamed.client, streamed.service
    lease = await client.admit(admission(request_id="a"), timeout_s=5.0)
    service.streams = False  # e.g. a mesh policy rolled out without AdmitStream
    service.end_status = grpc.StatusCode.UNAVAILABLE
    service.end_streams.set()
    await wait_for(lambda: service.stream_calls == 2)  # opened again for the held lease
    await wait_for(lambda: client._stream is not None and client._stream.ended is not None)
    assert client._reopen is None  # refused: not opened again
    service.end_streams.clear()
    second = await client.admit(admission(request_id="b"), timeout_s=5.0)
    assert service.stream_calls == 2  # a call, not a stream
    assert [a.request_id for a in service.admits] == ["a", "b"]
    client.complete(LeaseReport.unused(lease.lease_id))
    client.complete(LeaseReport.unused(second.lease_id))


async def test_a_cancelled_admit_is_withdrawn(streamed: Served) -> None:
    streamed.service.hold = asyncio.Event()
    call = asyncio.ensure_future(streamed.client.admit(admission(), timeout_s=5.0))
    await streamed.service.holding.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await wait_for(lambda: streamed.service.cancels == [1])


async def test_an_expired_admit_fails_as_a_deadline_and_is_withdrawn(streamed: Served) -> None:
    streamed.service.hold = asyncio.Event()
    with pytest.raises(DeadlineExceeded) as info:
        await streamed.client.admit(admission(), timeout_s=0.05)
    assert info.value.reason is None  # the client's deadline, not the queue's (QUEUE_TIMEOUT)
    await wait_for(lambda: streamed.service.cancels == [1])


async def test_a_lease_answered_after_the_admit_was_given_up_is_released(
    streamed: Served,
) -> None:
    held = asyncio.Event()
    streamed.service.hold = held
    streamed.service.ignore_cancels = True
    call = asyncio.ensure_future(streamed.client.admit(admission(), timeout_s=5.0))
    await streamed.service.holding.wait()
    call.cancel()
    await wait_for(lambda: streamed.service.cancels == [1])
    held.set()
    await wait_for(lambda: bool(streamed.service.completes))
    [report] = streamed.service.completes
    assert (report.lease_id, report.outcome) == ("lease-9", pb.OUTCOME_CANCELLED)


async def test_an_admit_unanswered_when_the_stream_ends_is_not_reached_and_the_next_reopens(
    streamed: Served,
) -> None:
    held = asyncio.Event()
    streamed.service.hold = held
    call = asyncio.ensure_future(streamed.client.admit(admission(), timeout_s=5.0))
    await streamed.service.holding.wait()
    streamed.service.end_streams.set()  # the orchestrator drains: it ends the stream (OK)
    with pytest.raises(OrchestratorUnavailable):
        await call  # the set sends it to another orchestrator
    streamed.service.end_streams = asyncio.Event()
    streamed.service.hold = None
    held.set()
    lease = await streamed.client.admit(admission(), timeout_s=5.0)
    assert lease.replica.id == "r-9"
    assert streamed.service.stream_calls == 2


async def wait_for(condition: Callable[[], bool]) -> None:
    async def check() -> bool:
        return condition()

    await eventually(check, what="the fake saw it")


async def test_with_a_hasher_a_stream_admit_sends_the_prompt_s_length_and_block_hashes() -> None:
    config = BlockConfig(block_size=4, hash_seed=9)
    prompt = list(range(100, 150))  # 50 tokens: 12 full blocks
    async with serve(admit_stream=True, hasher=ChunkedHashes(config)) as s:
        await s.client.admit(admission(prompt_token_ids=prompt), timeout_s=5.0)
    async with serve(admit_stream=True, hasher=ChunkedHashes(config)) as refusing:
        refusing.service.streams = False  # the fallback's Admit call sends the prompt itself
        await refusing.client.admit(admission(prompt_token_ids=prompt), timeout_s=5.0)
    [on_stream], [by_call] = s.service.admits, refusing.service.admits
    assert not on_stream.prompt_tokens_le32
    assert (on_stream.prompt_tokens, on_stream.hash_block_size, on_stream.hash_seed) == (50, 4, 9)
    sent = hashes_from_le64(on_stream.prompt_block_hashes_le64)
    assert list(sent) == block_hashes(prompt, config)
    assert list(tokens_from_bytes(by_call.prompt_tokens_le32)) == prompt
    assert not by_call.prompt_block_hashes_le64


async def test_a_stream_that_ends_while_a_lease_is_held_is_opened_again(streamed: Served) -> None:
    """The orchestrator releases a caller's leases once it has held no stream open for a
    while: a stream that ends while one is held opens again, one that ends holding none not."""
    client, service = streamed.client, streamed.service
    lease = await client.admit(admission(request_id="a"), timeout_s=5.0)
    assert service.stream_calls == 1
    service.end_status = grpc.StatusCode.UNAVAILABLE
    service.end_streams.set()  # e.g. the orchestrator's proxy restarted
    await wait_for(lambda: client._stream is not None and client._stream.ended is not None)
    service.end_streams.clear()
    await wait_for(lambda: service.stream_calls == 2)  # opened again, with no Admit to send
    client.complete(LeaseReport.unused(lease.lease_id))
    service.end_streams.set()
    await wait_for(lambda: client._stream is not None and client._stream.ended is not None)
    assert client._reopen is None  # nothing held: it opens with the next Admit
    service.end_streams.clear()


async def test_each_stream_lists_first_the_leases_held_and_those_being_reported() -> None:
    """The orchestrator releases the leases answered over a caller's earlier streams that its
    new one does not list: a lease whose report is still being sent is listed (released, its
    report's outcome would be lost), one whose answer never arrived is not. The report is
    retried for a minute: on a busy machine the stream may take longer than the default
    window to open again, and a report given up on is listed no more."""
    async with serve(admit_stream=True, complete_retry_s=60.0) as streamed:
        await _lists_held_and_reported(streamed)


async def _lists_held_and_reported(streamed: Served) -> None:
    client, service = streamed.client, streamed.service
    a = await client.admit(admission(request_id="a"), timeout_s=5.0)
    b = await client.admit(admission(request_id="b"), timeout_s=5.0)
    service.complete_failure_code = grpc.StatusCode.UNAVAILABLE
    service.complete_failures = 10**6  # b's report is being tried meanwhile
    client.complete(LeaseReport.unused(b.lease_id))
    await wait_for(lambda: bool(service.complete_calls))
    service.end_status = grpc.StatusCode.UNAVAILABLE
    service.end_streams.set()
    await wait_for(lambda: client._stream is not None and client._stream.ended is not None)
    service.end_streams.clear()
    await wait_for(lambda: service.stream_calls == 2)  # opened again: a is held
    assert service.held == [(2, sorted([a.lease_id, b.lease_id]))]  # none on the first
    service.complete_failures = 0


async def test_a_stream_the_orchestrator_ended_is_not_opened_again(streamed: Served) -> None:
    """It ends its streams (OK) when it drains: the leases it granted end with it."""
    client, service = streamed.client, streamed.service
    await client.admit(admission(request_id="a"), timeout_s=5.0)
    service.end_streams.set()
    await wait_for(lambda: client._stream is not None and client._stream.ended is not None)
    assert client._reopen is None
    service.end_streams.clear()


def _ended(code: grpc.StatusCode, details: str = "x") -> StreamEnded:
    return StreamEnded(
        grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)
    )


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.RESOURCE_EXHAUSTED],
)
def test_an_admit_stream_ended_by_any_other_status_goes_to_another_orchestrator(
    code: grpc.StatusCode,
) -> None:
    """A stream's refusals are answer fields, so a status that ends it is the call failing:
    grpc reports a write cut by the orchestrator's dropped connection as INTERNAL ("Internal
    error from Core"), which was read as this request's error and failed it instead of
    failing it over."""
    err = _ended(code, "Internal error from Core").as_admission_error()
    assert isinstance(err, OrchestratorUnavailable)


def test_an_admit_stream_ended_unavailable_or_dropped_reads_as_a_unary_call_would() -> None:
    assert isinstance(
        _ended(grpc.StatusCode.UNAVAILABLE).as_admission_error(), OrchestratorUnavailable
    )
    dropped = _ended(grpc.StatusCode.CANCELLED).as_admission_error()
    assert dropped.reason is Reason.DROPPED


class AnsweredCall:
    """A unary Admit call the test answers (`answer`) at a moment of its choosing."""

    def __init__(self) -> None:
        self._answer: asyncio.Future[pb.AdmitResponse] = asyncio.get_running_loop().create_future()

    def answer(self, response: pb.AdmitResponse) -> None:
        self._answer.set_result(response)

    def done(self) -> bool:
        return self._answer.done()

    def cancelled(self) -> bool:
        return False  # answered: grpc's cancel of a finished call does nothing

    def __await__(self):  # type: ignore[no-untyped-def]
        return self._answer.__await__()


class UnaryStub:
    """Admit calls handed to the test; CompleteBatch reports recorded."""

    def __init__(self) -> None:
        self.calls: list[AnsweredCall] = []
        self.reported: list[pb.CompleteRequest] = []

    def Admit(self, request: pb.AdmitRequest, **kw: object) -> AnsweredCall:
        call = AnsweredCall()
        self.calls.append(call)
        return call

    async def CompleteBatch(self, request: pb.CompleteBatchRequest, **kw: object) -> None:
        self.reported.extend(request.reports)


async def test_a_unary_admit_answered_in_the_tick_it_was_cancelled_releases_its_lease() -> None:
    stub = UnaryStub()
    client = OrchestratorClient(stub, admit_stream=False)  # type: ignore[arg-type]
    admitting = asyncio.ensure_future(client.admit(admission(), timeout_s=5.0))

    async def called() -> bool:
        return bool(stub.calls)

    await eventually(called, what="the Admit call made")
    stub.calls[0].answer(pb.AdmitResponse(lease_id="lease-1", replica=REPLICA))
    admitting.cancel()  # in the same tick: the request never sees its lease
    with pytest.raises(asyncio.CancelledError):
        await admitting

    async def released() -> bool:
        return [r.lease_id for r in stub.reported] == ["lease-1"]

    await eventually(released, what="the lease given back")
    await client.close()


class BreakingStream:
    """An AdmitStream call: records what is written; the first answers Admit 1 (`lease`),
    then breaks in the same read, after letting `go` run; later ones never answer."""

    def __init__(self, answers: bool, lease: pb.AdmitResponse, go: asyncio.Event) -> None:
        self.written: list[pb.AdmitStreamRequest] = []
        self._answers, self._lease, self._go = answers, lease, go
        self._ended = False
        self._admitted = asyncio.Event()

    async def write(self, msg: pb.AdmitStreamRequest) -> None:
        self.written.append(msg)
        if msg.HasField("admit"):
            self._admitted.set()

    def __aiter__(self) -> AsyncIterator[pb.AdmitStreamResponse]:
        return self._read()

    async def _read(self) -> AsyncIterator[pb.AdmitStreamResponse]:
        if not self._answers:
            await asyncio.Event().wait()
        await self._admitted.wait()
        self._go.set()  # the next request's task runs before the Admit answered here resumes
        yield pb.AdmitStreamResponse(call_id=1, lease=self._lease)
        raise RuntimeError("connection reset")  # read at once: no turn in between

    def cancel(self) -> bool:
        self._ended = True
        return True

    def done(self) -> bool:
        return self._ended


async def test_a_stream_opened_before_an_answered_admit_resumes_lists_its_lease() -> None:
    """A lease is held from its answer on: a stream opened in between (by another request)
    lists it, else the orchestrator would release a lease in use."""
    go = asyncio.Event()
    lease = pb.AdmitResponse(lease_id="x", replica=REPLICA)
    calls: list[BreakingStream] = []

    class Stub:
        def AdmitStream(self, _: None, **kw: object) -> BreakingStream:
            calls.append(BreakingStream(not calls, lease, go))
            return calls[-1]

    client = OrchestratorClient(Stub(), complete_retry_s=0.0)  # type: ignore[arg-type]

    async def next_request() -> None:
        await go.wait()
        with contextlib.suppress(Exception):
            await client.admit(admission(request_id="next"), timeout_s=0.01)

    other = asyncio.ensure_future(next_request())
    granted = await client.admit(admission(), timeout_s=5.0)
    await other
    assert granted.lease_id == "x"
    assert len(calls) == 2
    assert calls[1].written[0].held.lease_ids == ["x"]
    client._held.clear()  # no report to send on close
    await client.close()


async def test_only_a_stream_an_admit_was_written_on_makes_the_next_ones_list_held() -> None:
    """One that failed before any Admit reached the orchestrator (not up yet, the call dropped)
    got nothing granted: the next stream sends nothing before its first Admit (a write racing
    a refusal of the method would hide the refusal)."""
    calls: list[BreakingStream] = []

    class Stub:
        def AdmitStream(self, _: None, **kw: object) -> BreakingStream:
            calls.append(BreakingStream(False, pb.AdmitResponse(), asyncio.Event()))
            return calls[-1]

    client = OrchestratorClient(Stub())  # type: ignore[arg-type]
    unavailable = StreamEnded(RuntimeError("connection refused"), admitted=False)
    for admitted in (False, True, False):
        stream = client._open_stream()
        await asyncio.sleep(0)  # one turn: the writer writes what it has
        stream._end(unavailable.error)
        client._stream_ended(StreamEnded(unavailable.error, admitted=admitted))
    client._open_stream()
    await asyncio.sleep(0)
    # Nothing on the first two; `held` first on each after the second (an Admit written).
    assert [c.written[0].HasField("held") if c.written else None for c in calls] == [
        None,
        None,
        True,
        True,
    ]
    await client.close()
