"""Admission over a real channel: settings → core → server on port 0 → stub."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from llmmesh.common.discovery import DnsTarget
from llmmesh.common.engine_metrics import EngineSample
from llmmesh.common.errors import RETRY_AFTER_KEY, Reason, code_number, from_rpc_error
from llmmesh.common.sojourn import CALLER_KEY, call_metadata
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as pb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from llmmesh.kvblocks import BlockConfig, hash_bytes, token_bytes
from services.orchestrator.convert import MAX_PROMPT_TOKENS, admission_from_pb
from services.orchestrator.domain import AdmissionRequest, Lease
from services.orchestrator.errors import BadAdmission
from services.orchestrator.servicer import OrchestratorServicer
from tests.helpers import eventually
from tests.orchestrator.serving import dns_discovered, serve
from tests.orchestrator.test_core import ready_core


@pytest_asyncio.fixture
async def stub() -> AsyncIterator[pb_grpc.OrchestratorServiceAsyncStub]:
    core, _ = await ready_core(n=1, cap=1, queue=1)
    async with serve(core) as stub:
        yield stub


async def queue_depth_is(stub: pb_grpc.OrchestratorServiceAsyncStub, depth: int) -> bool:
    return (await stub.ListReplicas(pb.ListReplicasRequest(), timeout=5)).queue_depth == depth


def admit(rid: str) -> pb.AdmitRequest:
    return pb.AdmitRequest(
        request_id=rid, model="tensorrt_llm", prompt_token_ids=[1, 2, 3], max_tokens=4
    )


async def test_full_queue_is_resource_exhausted_with_retry_after(
    stub: pb_grpc.OrchestratorServiceAsyncStub,
) -> None:
    held = await stub.Admit(admit("a"), timeout=5)
    queued = asyncio.ensure_future(stub.Admit(admit("b"), timeout=10))

    await eventually(lambda: queue_depth_is(stub, 1), what="b waits in the one-slot queue")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Admit(admit("c"), timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers: dict[str, str] = dict(info.value.trailing_metadata() or ())  # type: ignore[arg-type]
    assert float(trailers[RETRY_AFTER_KEY]) > 0
    await stub.Complete(
        pb.CompleteRequest(lease_id=held.lease_id, outcome=pb.OUTCOME_SUCCESS), timeout=5
    )
    granted = await queued
    assert granted.replica.id == "r0"


async def test_complete_batch_releases_each_lease_in_order() -> None:
    core, _ = await ready_core(n=1, cap=2, queue=1)
    async with serve(core) as stub:
        a = await stub.Admit(admit("a"), timeout=5)
        b = await stub.Admit(admit("b"), timeout=5)
        queued = asyncio.ensure_future(stub.Admit(admit("c"), timeout=10))
        await eventually(lambda: queue_depth_is(stub, 1), what="c waits for a slot")
        reports = [
            pb.CompleteRequest(lease_id=a.lease_id, outcome=pb.OUTCOME_SUCCESS),
            pb.CompleteRequest(lease_id="never-granted", outcome=pb.OUTCOME_SUCCESS),
            pb.CompleteRequest(lease_id=b.lease_id, outcome=pb.OUTCOME_REPLICA_ERROR),
            # b again: the first report of a lease is the one that counts
            pb.CompleteRequest(lease_id=b.lease_id, outcome=pb.OUTCOME_SUCCESS),
        ]
        await stub.CompleteBatch(pb.CompleteBatchRequest(reports=reports), timeout=5)
        await queued  # a's slot went to c
        [status] = (await stub.ListReplicas(pb.ListReplicasRequest(), timeout=5)).replicas
        assert (status.in_flight, status.completed, status.failures) == (1, 2, 1)
        assert list(status.models) == ["tensorrt_llm"]  # what degraded gateways route by


async def test_deadline_in_queue_and_cancellation(
    stub: pb_grpc.OrchestratorServiceAsyncStub,
) -> None:
    await stub.Admit(admit("a"), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Admit(admit("late"), timeout=2.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Answered by the orchestrator before the deadline, not expired at the caller: a lease
    # granted as the caller gives up would be known to no one.
    assert from_rpc_error(info.value, "admit").reason is Reason.QUEUE_TIMEOUT
    call = stub.Admit(admit("gone"), timeout=10)
    await eventually(lambda: queue_depth_is(stub, 1), what="the request waits in the queue")
    call.cancel()
    await eventually(lambda: queue_depth_is(stub, 0), what="cancellation removed it from the queue")
    assert (await stub.ListReplicas(pb.ListReplicasRequest(), timeout=5)).replicas[0].in_flight == 1


async def test_rejections_carry_a_typed_reason(
    stub: pb_grpc.OrchestratorServiceAsyncStub,
) -> None:
    held = await stub.Admit(admit("a"), timeout=5)
    queued = asyncio.ensure_future(stub.Admit(admit("b"), timeout=10))
    await eventually(lambda: queue_depth_is(stub, 1), what="b waits in the one-slot queue")
    with pytest.raises(grpc.aio.AioRpcError) as full:
        await stub.Admit(admit("c"), timeout=5)
    assert from_rpc_error(full.value, "admit").reason is Reason.QUEUE_FULL
    unknown = pb.AdmitRequest(request_id="d", model="nope", prompt_token_ids=[1], max_tokens=1)
    with pytest.raises(grpc.aio.AioRpcError) as none:
        await stub.Admit(unknown, timeout=5)
    assert none.value.code() == grpc.StatusCode.UNAVAILABLE
    assert from_rpc_error(none.value, "admit").reason is Reason.NO_REPLICA
    await stub.Complete(
        pb.CompleteRequest(lease_id=held.lease_id, outcome=pb.OUTCOME_SUCCESS), timeout=5
    )
    await queued


async def test_admit_returns_every_field_of_a_dns_discovered_replica() -> None:
    """In Kubernetes the gateway must dial the headless Service's authority, not the bare pod
    IP (else the sidecar passes the stream through in plaintext and STRICT mTLS refuses it)."""
    target = DnsTarget(host="localhost", port=18001, pool="short", model_version="v7")
    core, spec = await dns_discovered(target)
    async with serve(core) as stub:
        lease = await stub.Admit(admit("x"), timeout=5)
    assert lease.replica == pb.Replica(
        id=spec.id,
        grpc_address="127.0.0.1:18001",
        pool="short",
        model_version="v7",
        authority="localhost:18001",
    )


async def test_excluded_replica_on_the_wire(stub: pb_grpc.OrchestratorServiceAsyncStub) -> None:
    """`exclude_replicas` reaches the director: excluding the only replica is NO_REPLICA."""
    req = admit("x")
    req.exclude_replicas.append("r0")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Admit(req, timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert from_rpc_error(info.value, "admit").reason is Reason.NO_REPLICA
    assert "excluding r0" in (info.value.details() or "")
    req.ClearField("exclude_replicas")
    req.exclude_replicas.append("r9")
    assert (await stub.Admit(req, timeout=5)).replica.id == "r0"


@pytest.mark.parametrize(
    ("prompt", "error"),
    [
        ({"prompt_tokens_le32": b"\x01\x00\x00\x00\x02"}, "no whole number"),
        (
            {"prompt_tokens_le32": b"\x01\x00\x00\x00", "prompt_token_ids": [1]},
            "set one of prompt_token_ids, prompt_tokens_le32",
        ),
    ],
)
async def test_a_malformed_packed_prompt_is_invalid_argument(
    stub: pb_grpc.OrchestratorServiceAsyncStub, prompt: dict[str, object], error: str
) -> None:
    req = pb.AdmitRequest(request_id="p", model="tensorrt_llm", max_tokens=4, **prompt)  # type: ignore[arg-type]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Admit(req, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error in (info.value.details() or "")
    assert "prompt_tokens_le32" in (info.value.details() or "")


async def test_a_packed_prompt_is_admitted_as_its_token_ids() -> None:
    core, _ = await ready_core(n=1, cap=4, clock=lambda: 10.0)  # no prefill progress
    ids = list(range(7, 7 + 300))
    async with serve(core) as stub:
        req = pb.AdmitRequest(
            request_id="packed",
            model="tensorrt_llm",
            max_tokens=4,
            prompt_tokens_le32=token_bytes(ids),
        )
        lease = await stub.Admit(req, timeout=5)
        assert lease.replica.id == "r0"
    [st] = core.replicas()
    assert st.in_flight == 1
    view = core._view(st, core.now())
    assert view.load is not None
    assert view.load.prefill_tokens == len(ids)  # the ledger counted every packed token


async def test_an_admit_s_wait_before_its_handler_reaches_the_shedder() -> None:
    core, _ = await ready_core(n=1, cap=1, queue=1)
    async with serve(core) as stub:
        now = time.time()
        lease = await stub.Admit(admit("a"), timeout=5, metadata=call_metadata("c", now))
        assert core._shedder.last_sojourn_s == 0.0  # the caller's first call: its baseline
        await stub.Complete(pb.CompleteRequest(lease_id=lease.lease_id), timeout=5)
        # Said to be sent 4 s before the first: it waited 4 s more than that one.
        lease = await stub.Admit(admit("b"), timeout=5, metadata=call_metadata("c", now - 4))
        assert 3.9 < core._shedder.last_sojourn_s < 4.5
        await stub.Complete(pb.CompleteRequest(lease_id=lease.lease_id), timeout=5)
        await stub.Admit(admit("c"), timeout=5)  # a caller that does not say: no sample
        assert 3.9 < core._shedder.last_sojourn_s < 4.5


# -- AdmitStream ------------------------------------------------------------------------------
Stream = grpc.aio.StreamStreamCall[pb.AdmitStreamRequest, pb.AdmitStreamResponse]
EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # not in the stubs


def streamed(call_id: int, rid: str, timeout_s: float = 10.0) -> pb.AdmitStreamRequest:
    return pb.AdmitStreamRequest(call_id=call_id, admit=admit(rid), timeout_s=timeout_s)


async def answers(call: Stream, n: int) -> dict[int, pb.AdmitStreamResponse]:
    out = {}
    for _ in range(n):
        answer = await call.read()
        assert isinstance(answer, pb.AdmitStreamResponse)
        out[answer.call_id] = answer
    return out


async def held_and_queued(
    stub: pb_grpc.OrchestratorServiceAsyncStub,
) -> tuple[Stream, pb.AdmitResponse]:
    """A stream on a one-slot replica: Admit 1 ("a") holds the slot (its lease returned), Admit
    2 ("b") waits in the queue."""
    call = stub.AdmitStream(None)
    await call.write(streamed(1, "a"))
    held = (await answers(call, 1))[1].lease
    await call.write(streamed(2, "b"))
    await eventually(lambda: queue_depth_is(stub, 1), what="b waits")
    return call, held


async def test_a_stream_answers_each_admit_by_call_id_grants_and_refusals_alike(
    stub: pb_grpc.OrchestratorServiceAsyncStub,
) -> None:
    call = stub.AdmitStream(None)
    await call.write(streamed(7, "a"))
    [granted] = (await answers(call, 1)).values()
    assert (granted.call_id, granted.lease.replica.id) == (7, "r0")
    await call.write(streamed(8, "b"))  # waits in the one-slot queue
    await eventually(lambda: queue_depth_is(stub, 1), what="b waits")
    await call.write(streamed(9, "c"))
    unknown = pb.AdmitRequest(request_id="d", model="nope", prompt_token_ids=[1], max_tokens=1)
    await call.write(pb.AdmitStreamRequest(call_id=10, admit=unknown))
    refused = await answers(call, 2)
    full, none = refused[9].refusal, refused[10].refusal
    assert (full.code, full.reason) == (
        code_number(grpc.StatusCode.RESOURCE_EXHAUSTED),
        "QUEUE_FULL",
    )
    assert full.HasField("retry_after_s")
    assert full.retry_after_s > 0
    assert (none.code, none.reason) == (code_number(grpc.StatusCode.UNAVAILABLE), "NO_REPLICA")
    await stub.Complete(pb.CompleteRequest(lease_id=granted.lease.lease_id), timeout=5)
    assert (await answers(call, 1))[8].lease.replica.id == "r0"  # b got a's slot
    await call.done_writing()
    assert await call.read() is EOF
    assert await call.code() == grpc.StatusCode.OK


@pytest.mark.parametrize("timeout_s", [-1.0, math.inf, math.nan])
async def test_a_stream_admit_with_a_timeout_that_is_no_duration_is_refused(
    stub: pb_grpc.OrchestratorServiceAsyncStub, timeout_s: float
) -> None:
    call = stub.AdmitStream(None)
    await call.write(streamed(1, "a", timeout_s=timeout_s))
    refusal = (await answers(call, 1))[1].refusal
    assert refusal.code == code_number(grpc.StatusCode.INVALID_ARGUMENT)
    assert "timeout_s" in refusal.message
    call.cancel()


async def test_a_stream_admit_is_answered_a_moment_before_its_callers_expiry() -> None:
    """As a unary Admit: the director gets the timeout less a margin (a tenth, at most 1 s),
    so a QUEUE_TIMEOUT reaches the gateway before its own expiry gives up on the call."""
    core, _ = await ready_core(n=1, cap=1, queue=4)
    given: list[float | None] = []
    admit_once = core.admit

    async def recorded(req: AdmissionRequest, timeout_s: float | None) -> Lease:
        given.append(timeout_s)
        return await admit_once(req, timeout_s)

    core.admit = recorded  # type: ignore[method-assign]
    async with serve(core) as stub:
        call = stub.AdmitStream(None)
        await call.write(streamed(1, "a", timeout_s=2.0))
        await answers(call, 1)
        call.cancel()
    [timeout_s] = given
    assert timeout_s is not None
    assert timeout_s <= 1.8


async def test_a_stream_admit_waits_for_its_timeout_and_a_cancel_withdraws_it(
    stub: pb_grpc.OrchestratorServiceAsyncStub,
) -> None:
    call = stub.AdmitStream(None)
    await call.write(streamed(1, "a"))
    await answers(call, 1)
    await call.write(streamed(2, "late", timeout_s=0.2))
    late = (await answers(call, 1))[2].refusal
    assert (late.code, late.reason) == (
        code_number(grpc.StatusCode.DEADLINE_EXCEEDED),
        "QUEUE_TIMEOUT",
    )
    await call.write(streamed(3, "gone"))
    await eventually(lambda: queue_depth_is(stub, 1), what="gone waits")
    await call.write(pb.AdmitStreamRequest(call_id=3, cancel=True))
    await eventually(lambda: queue_depth_is(stub, 0), what="the cancel withdrew it")
    await call.write(pb.AdmitStreamRequest(call_id=99, cancel=True))  # unknown: ignored
    await call.done_writing()
    assert await call.read() is EOF  # no answer for the withdrawn Admit


async def test_a_stream_refuses_a_message_without_admit_and_a_call_id_in_use(
    stub: pb_grpc.OrchestratorServiceAsyncStub,
) -> None:
    call, _ = await held_and_queued(stub)  # call id 2 is in use
    await call.write(streamed(2, "again"))
    await call.write(pb.AdmitStreamRequest(call_id=3))
    refused = await answers(call, 2)
    invalid = code_number(grpc.StatusCode.INVALID_ARGUMENT)
    assert refused[2].refusal.code == refused[3].refusal.code == invalid
    call.cancel()  # the whole stream: its queued Admit leaves the queue
    await eventually(lambda: queue_depth_is(stub, 0), what="the stream's Admit withdrawn")
    [status] = (await stub.ListReplicas(pb.ListReplicasRequest(), timeout=5)).replicas
    assert status.in_flight == 1  # a's lease only


async def test_a_draining_orchestrator_answers_what_it_read_then_ends_the_stream() -> None:
    core, _ = await ready_core(n=1, cap=1, queue=1)
    servicer = OrchestratorServicer(core)
    async with serve(core, servicer) as stub:
        call, held = await held_and_queued(stub)
        await servicer.drain()
        await stub.Complete(pb.CompleteRequest(lease_id=held.lease_id), timeout=5)
        assert (await answers(call, 1))[2].lease.replica.id == "r0"
        assert await call.read() is EOF
        assert await call.code() == grpc.StatusCode.OK
        later = stub.AdmitStream(None)  # one opened while draining ends unread
        assert await later.read() is EOF
        assert await later.code() == grpc.StatusCode.OK
        assert (await stub.ListReplicas(pb.ListReplicasRequest(), timeout=5)).queue_depth == 0


async def test_a_stream_admit_s_send_time_reaches_the_shedder() -> None:
    core, _ = await ready_core(n=1, cap=1, queue=1)
    async with serve(core) as stub:
        call = stub.AdmitStream(None, metadata=((CALLER_KEY, "c"),))
        now = time.time()
        first = streamed(1, "a")
        first.sent_at_unix_s = now
        await call.write(first)
        lease = (await answers(call, 1))[1].lease
        assert core._shedder.last_sojourn_s == 0.0  # the caller's first reading: its baseline
        await stub.Complete(pb.CompleteRequest(lease_id=lease.lease_id), timeout=5)
        second = streamed(2, "b")
        second.sent_at_unix_s = now - 4  # waited 4 s more than the first
        await call.write(second)
        await answers(call, 1)
        assert 3.9 < core._shedder.last_sojourn_s < 4.5
        call.cancel()


async def test_a_draining_stream_still_reads_cancels() -> None:
    core, _ = await ready_core(n=1, cap=1, queue=1)
    servicer = OrchestratorServicer(core)
    async with serve(core, servicer) as stub:
        call, _ = await held_and_queued(stub)
        await servicer.drain()
        await call.write(streamed(3, "c"))  # read after the drain: refused, not queued
        refused = (await answers(call, 1))[3].refusal
        assert (refused.code, refused.reason) == (code_number(grpc.StatusCode.UNAVAILABLE), "")
        await call.write(pb.AdmitStreamRequest(call_id=2, cancel=True))
        await eventually(lambda: queue_depth_is(stub, 0), what="the cancel withdrew b")
        assert await call.read() is EOF  # nothing left to answer: the stream ends


# -- a prompt sent as its length and block hashes ------------------------------------------------
def hashed(n_tokens: int, blocks: int, block_size: int = 32, **kw: object) -> pb.AdmitRequest:
    return pb.AdmitRequest(
        request_id="h",
        model="tensorrt_llm",
        max_tokens=4,
        prompt_tokens=n_tokens,
        hash_block_size=block_size,
        hash_seed=7,
        prompt_block_hashes_le64=hash_bytes(range(1, blocks + 1)),
        **kw,  # type: ignore[arg-type]
    )


def test_a_hashed_prompt_converts_to_its_length_and_hashes() -> None:
    req = admission_from_pb(hashed(100, 3))  # 100 tokens: three full blocks of 32
    assert (req.prompt_tokens, req.prompt_token_ids) == (100, [])
    assert req.prompt_hashes is not None
    assert req.prompt_hashes.config == BlockConfig(32, 7)
    assert list(req.prompt_hashes.hashes) == [1, 2, 3]
    short = admission_from_pb(hashed(20, 0))  # no full block: no hashes, a length all the same
    assert short.prompt_tokens == 20
    assert short.prompt_hashes is not None
    assert not short.prompt_hashes.hashes
    plain = admission_from_pb(admit("p"))
    assert (plain.prompt_tokens, plain.prompt_hashes) == (3, None)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (hashed(100, 4), "prompt_tokens"),  # 100 tokens hold 3 full blocks, not 4
        (hashed(100, 3, block_size=0), "hash_block_size"),
        (hashed(100, 3, prompt_token_ids=[1, 2]), "prompt_block_hashes_le64"),  # both ways
        (hashed(0, 1, prompt_tokens_le32=token_bytes([1])), "prompt_block_hashes_le64"),
        (hashed(MAX_PROMPT_TOKENS + 1, 0, block_size=2**31), "prompt_tokens"),  # a claim only
    ],
)
def test_a_hashed_prompt_that_does_not_add_up_is_invalid(
    request_: pb.AdmitRequest, field: str
) -> None:
    with pytest.raises(BadAdmission) as info:
        admission_from_pb(request_)
    assert info.value.field == field


def test_hash_bytes_that_are_no_whole_uint64s_are_invalid() -> None:
    req = hashed(100, 3)
    req.prompt_block_hashes_le64 += b"\x01"
    with pytest.raises(BadAdmission) as info:
        admission_from_pb(req)
    assert info.value.field == "prompt_block_hashes_le64"


async def test_a_hashed_prompt_is_admitted_and_counted_by_its_length() -> None:
    core, _ = await ready_core(n=1, cap=4, clock=lambda: 10.0)  # no prefill progress
    async with serve(core) as stub:
        lease = await stub.Admit(hashed(300, 9), timeout=5)
        assert lease.replica.id == "r0"
    [st] = core.replicas()
    view = core._view(st, core.now())
    assert view.load is not None
    assert view.load.prefill_tokens == 300  # the ledger counted the prompt it never saw


async def test_each_scrape_reaches_the_load_ledger_even_as_the_same_sample_object() -> None:
    core, _ = await ready_core(n=1, cap=4)
    [st] = core.replicas()
    sample = EngineSample(active=5.0, waiting=0.0, kv_used=10.0, kv_max=100.0)
    st.sample, st.sample_at, st.sample_in_flight = sample, core.now(), 0
    core._view(st, core.now())
    assert core._load._replicas["r0"].others == 5  # five requests the ledger has no lease for
    # The next scrape read the same gauges (a simulated engine hands back the same object):
    # taken while this orchestrator held 5 leases there, it shows none beyond them.
    st.sample_at, st.sample_in_flight = core.now() + 0.001, 5
    core._view(st, core.now() + 0.001)
    assert core._load._replicas["r0"].others == 0


class StuckWriter:
    """An AdmitStream context whose caller reads nothing: each write waits for `release`."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.written = 0

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def write(self, _: pb.AdmitStreamResponse) -> None:
        await self.release.wait()
        self.written += 1


async def test_a_caller_that_reads_no_answers_is_not_read_either(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Messages with neither admit nor cancel are refused at once: each is an answer to write.
    # With the writer stuck, the reader stops at the bound (8 here) before asking for more.
    monkeypatch.setattr("services.orchestrator.servicer.STREAM_MAX_OPEN", 8)
    core, _ = await ready_core()
    servicer = OrchestratorServicer(core)
    asked: list[int] = []

    async def requests() -> AsyncIterator[pb.AdmitStreamRequest]:
        for i in range(1, 21):
            asked.append(i)
            yield pb.AdmitStreamRequest(call_id=i)

    context = StuckWriter()
    call = asyncio.ensure_future(servicer.AdmitStream(requests(), context))  # type: ignore[arg-type]
    try:

        async def full() -> bool:
            return [len(stream.answers) for stream in servicer._streams] == [8]

        await eventually(full, what="eight answers waiting")
        assert asked == list(range(1, 9))  # the ninth was never asked for
        context.release.set()
        await asyncio.wait_for(call, 10)
        assert (asked[-1], context.written) == (20, 20)
    finally:
        call.cancel()


async def _granted_over_a_stream(
    stub: pb_grpc.OrchestratorServiceAsyncStub, caller: str
) -> tuple[Stream, pb.AdmitResponse]:
    call = stub.AdmitStream(None, metadata=((CALLER_KEY, caller),))
    await call.write(streamed(1, "a"))
    return call, (await answers(call, 1))[1].lease


async def in_flight_is(stub: pb_grpc.OrchestratorServiceAsyncStub, n: int) -> bool:
    [status] = (await stub.ListReplicas(pb.ListReplicasRequest(), timeout=5)).replicas
    return status.in_flight == n


async def test_the_leases_of_a_caller_whose_stream_is_gone_are_released_after_the_grace() -> None:
    core, _ = await ready_core(n=1, cap=1)
    core._settings.orphan_lease_grace_s = 0.05
    async with serve(core) as stub:
        call, lease = await _granted_over_a_stream(stub, "gateway-1")
        assert await in_flight_is(stub, 1)
        call.cancel()  # the gateway process died holding the lease
        await eventually(lambda: in_flight_is(stub, 0), what="the orphaned lease released")
        # Its Complete, had it come late after all, changes nothing.
        await stub.Complete(pb.CompleteRequest(lease_id=lease.lease_id), timeout=5)
        assert await in_flight_is(stub, 0)


async def test_a_caller_back_within_the_grace_keeps_its_leases() -> None:
    core, _ = await ready_core(n=1, cap=2)
    servicer = OrchestratorServicer(core)
    async with serve(core, servicer) as stub:
        call, _lease = await _granted_over_a_stream(stub, "gateway-1")
        other, _ = await _granted_over_a_stream(stub, "gateway-2")
        call.cancel()  # a broken connection...
        again = stub.AdmitStream(None, metadata=((CALLER_KEY, "gateway-1"),))
        await again.write(streamed(2, "b"))  # ...and the same process back on a new stream
        await eventually(lambda: queue_depth_is(stub, 1), what="b queued behind a full replica")
        servicer._orphaned("gateway-1")  # the grace ends (its timer was cancelled)
        assert await in_flight_is(stub, 2)
        again.cancel()
        other.cancel()


def held(*lease_ids: str, stream: int = 0) -> pb.AdmitStreamRequest:
    return pb.AdmitStreamRequest(held=pb.HeldLeases(lease_ids=lease_ids, stream=stream))


async def test_a_caller_s_new_stream_releases_the_leases_it_does_not_hold() -> None:
    """A lease answered over a stream whose connection broke before the caller read it: the
    caller is back at once (its Admit went to another orchestrator), so the orphan release
    never comes; the leases its new stream does not list end then, not at the lease timeout."""
    core, _ = await ready_core(n=1, cap=3)
    async with serve(core) as stub:
        call, read = await _granted_over_a_stream(stub, "gateway-1")
        lost = stub.AdmitStream(None, metadata=((CALLER_KEY, "gateway-1"),))
        await lost.write(held(read.lease_id))  # supersedes `call`: `read` is held
        await lost.write(streamed(1, "b"))
        await answers(lost, 1)  # granted, and its answer lost with the connection
        assert await in_flight_is(stub, 2)
        lost.cancel()
        again = stub.AdmitStream(None, metadata=((CALLER_KEY, "gateway-1"),))
        await again.write(held(read.lease_id))
        await eventually(lambda: in_flight_is(stub, 1), what="the lost lease released")
        # The held one stays the caller's: ended by its Complete.
        await stub.Complete(pb.CompleteRequest(lease_id=read.lease_id), timeout=5)
        assert await in_flight_is(stub, 0)
        again.cancel()
        call.cancel()


async def test_a_caller_s_new_stream_ends_the_admits_of_its_earlier_one() -> None:
    """An earlier stream this process has not seen end (behind a dead connection) decides no
    more of its Admits: one queued there is withdrawn, not granted to an answer no one reads."""
    core, _ = await ready_core(n=1, cap=1)
    async with serve(core) as stub:
        first, lease = await _granted_over_a_stream(stub, "gateway-1")
        await first.write(streamed(2, "queued"))
        await eventually(lambda: queue_depth_is(stub, 1), what="an Admit queued on the first")
        second = stub.AdmitStream(None, metadata=((CALLER_KEY, "gateway-1"),))
        await second.write(held(lease.lease_id))
        await eventually(lambda: queue_depth_is(stub, 0), what="the first stream's Admit withdrawn")
        assert await in_flight_is(stub, 1)  # the held lease, and nothing granted meanwhile
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(first.read(), 10)
        assert info.value.code() == grpc.StatusCode.ABORTED  # the first ended, replaced
        first.cancel()
        second.cancel()


async def test_held_later_than_first_on_a_stream_releases_nothing() -> None:
    core, _ = await ready_core(n=1, cap=2)
    async with serve(core) as stub:
        call, _lease = await _granted_over_a_stream(stub, "gateway-1")
        await call.write(held())  # not first: the lease answered over this stream stays
        await call.write(streamed(2, "b"))
        await answers(call, 1)
        assert await in_flight_is(stub, 2)
        call.cancel()


async def test_an_older_stream_s_held_read_after_a_newer_one_s_ends_only_itself() -> None:
    """Streams of one caller may reach the orchestrator out of order (a sidecar's upstream
    connections): a `held` numbered below one already read is stale, and replaces nothing."""
    core, _ = await ready_core(n=1, cap=3)
    async with serve(core) as stub:
        newer = stub.AdmitStream(None, metadata=((CALLER_KEY, "gateway-1"),))
        await newer.write(held(stream=3))
        await newer.write(streamed(1, "a"))
        await answers(newer, 1)
        older = stub.AdmitStream(None, metadata=((CALLER_KEY, "gateway-1"),))
        await older.write(held(stream=2))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(older.read(), 10)
        assert info.value.code() == grpc.StatusCode.ABORTED
        assert await in_flight_is(stub, 1)  # the newer stream's lease stays
        await newer.write(streamed(2, "b"))  # and the newer stream still serves
        assert (await answers(newer, 1))[2].HasField("lease")
        newer.cancel()
        older.cancel()
