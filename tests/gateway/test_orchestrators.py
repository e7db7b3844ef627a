"""OrchestratorSet: Admit spread over orchestrators, failover only when one is not reached,
Complete to the granting orchestrator, and degraded mode on a fake clock."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from prometheus_client import REGISTRY

from llmmesh.common import metric_names as names
from llmmesh.common.errors import DeadlineExceeded, Reason, ResourceExhausted, ServiceError
from llmmesh.common.topology import Priority, ReplicaAddress
from services.gateway import metrics as gateway_metrics
from services.gateway.admission import (
    AdmissionRequest,
    AdmissionStatus,
    KnownReplica,
    Lease,
    LeaseReport,
    Outcome,
)
from services.gateway.errors import NoReplica, OrchestratorTimedOut, OrchestratorUnavailable
from services.gateway.orchestrators import LOCAL_EJECTION_S, LOCAL_LEASE_PREFIX, OrchestratorSet
from tests.helpers import eventually

pytestmark = pytest.mark.asyncio


def replica(rid: str, version: str = "v1") -> ReplicaAddress:
    return ReplicaAddress(
        id=rid, grpc_address=f"{rid}:8001", pool="default", model_version=version, authority=""
    )


VIEW = (
    KnownReplica(replica("r0"), routable=True, in_flight=0),
    KnownReplica(replica("r1"), routable=True, in_flight=0),
    KnownReplica(replica("r2"), routable=False, in_flight=0),
)


class FakeOrchestrator:
    _ids = itertools.count()

    def __init__(self, address: str) -> None:
        self.address = address
        self.up = True
        self.refusal: Exception | None = None
        self.admits = 0
        self.completed: list[str] = []
        self.closed = False
        self.hung = False  # status() answers nothing until `times_out` is set, then fails
        self.times_out = asyncio.Event()
        self.hold: asyncio.Event | None = None
        self.status_error: BaseException | None = None
        self.status_timeouts: list[float] = []
        self.admit_tasks: list[asyncio.Task[object] | None] = []  # the task each admit ran in
        self.view: tuple[KnownReplica, ...] = VIEW  # the replicas status() lists

    async def admit(self, request: AdmissionRequest, *, timeout_s: float) -> Lease:
        self.admits += 1
        self.admit_tasks.append(asyncio.current_task())
        if self.hold is not None:
            await self.hold.wait()  # an Admit in flight until the test opens it
        if not self.up:
            raise OrchestratorUnavailable(f"orchestrator {self.address}: connection refused")
        if self.refusal is not None:
            raise self.refusal
        return Lease(f"{self.address}-lease-{next(self._ids)}", replica("r0"), 0.0)

    def complete(self, report: LeaseReport) -> None:
        self.completed.append(report.lease_id)

    async def drain(self) -> None:
        pass

    async def status(self, *, timeout_s: float) -> AdmissionStatus:
        self.status_timeouts.append(timeout_s)
        if self.status_error is not None:
            raise self.status_error
        if self.hung:
            await self.times_out.wait()  # as a call not answered, until its deadline
            raise OrchestratorTimedOut(f"orchestrator {self.address}: DEADLINE_EXCEEDED")
        if not self.up:
            raise OrchestratorUnavailable(f"orchestrator {self.address}: connection refused")
        return AdmissionStatus(3, 2, 0, known=self.view)

    async def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def request(**kw: object) -> AdmissionRequest:
    fields: dict[str, object] = {
        "request_id": "r",
        "model": "tensorrt_llm",
        "prompt_token_ids": [1, 2, 3],
        "max_tokens": 8,
        "priority": Priority.STANDARD,
        "tenant": "",
        "model_version": "",
        **kw,
    }
    return AdmissionRequest(**fields)  # type: ignore[arg-type]


def report(lease_id: str, outcome: Outcome = Outcome.SUCCESS) -> LeaseReport:
    return LeaseReport(lease_id, outcome, 3, 8, 0, 1.0)


def degraded(orchs: OrchestratorSet) -> bool:
    """Read through a call: mypy would keep the property narrowed across asserts."""
    return orchs.degraded


def make(n: int = 3, **kw: object) -> tuple[OrchestratorSet, dict[str, FakeOrchestrator], Clock]:
    fakes: dict[str, FakeOrchestrator] = {}
    clock = Clock()

    def factory(address: str) -> FakeOrchestrator:
        fakes[address] = FakeOrchestrator(address)
        return fakes[address]

    orchs = OrchestratorSet(factory, [f"o{i}" for i in range(n)], clock=clock, **kw)  # type: ignore[arg-type]
    return orchs, fakes, clock


async def admit_held_at_o0(
    orchs: OrchestratorSet, fakes: dict[str, FakeOrchestrator]
) -> tuple[asyncio.Future[Lease], asyncio.Event]:
    """An Admit in flight to o0 (first in turn), held there until the returned event is set."""
    hold = fakes["o0"].hold = asyncio.Event()
    admitting = asyncio.ensure_future(orchs.admit(request(), timeout_s=5.0))

    async def in_flight() -> bool:
        return fakes["o0"].admits == 1

    await eventually(in_flight, what="an Admit in flight to o0")
    return admitting, hold


async def listing_to_a_hung_o0(
    orchs: OrchestratorSet, fakes: dict[str, FakeOrchestrator]
) -> asyncio.Future[AdmissionStatus]:
    """A second listing sent to o0, which answers it only once `times_out` is set (then as
    a call whose deadline passed)."""
    fakes["o0"].hung = True
    listing = asyncio.ensure_future(orchs.status(timeout_s=1.0))

    async def listing_sent() -> bool:
        return len(fakes["o0"].status_timeouts) == 2

    await eventually(listing_sent, what="the listing sent")
    return listing


async def until_closed(fake: FakeOrchestrator, what: str) -> None:
    async def closed() -> bool:
        return fake.closed

    await eventually(closed, what=what)


async def test_admit_is_spread_round_robin() -> None:
    orchs, fakes, _ = make(3)
    for _ in range(9):
        await orchs.admit(request(), timeout_s=1.0)
    assert [f.admits for f in fakes.values()] == [3, 3, 3]


async def test_unreached_orchestrator_fails_over_and_is_tried_last() -> None:
    orchs, fakes, clock = make(2, retry_after_s=5.0)
    fakes["o0"].up = False
    leases = [await orchs.admit(request(), timeout_s=1.0) for _ in range(4)]
    assert all(lease.lease_id.startswith("o1-") for lease in leases)
    assert fakes["o0"].admits == 1  # tried once, then last while marked down
    assert not degraded(orchs)
    clock.now += 5.0  # its down mark expired: tried in turn again
    fakes["o0"].up = True
    leases = [await orchs.admit(request(), timeout_s=1.0) for _ in range(2)]
    assert {lease.lease_id[:2] for lease in leases} == {"o0", "o1"}


@pytest.mark.parametrize(
    "refusal",
    [
        NoReplica("no ready replica", reason=Reason.NO_REPLICA),
        ResourceExhausted("queue full", retry_after_s=2.0, reason=Reason.QUEUE_FULL),
    ],
)
async def test_typed_refusal_is_an_answer_not_retried(refusal: Exception) -> None:
    orchs, fakes, _ = make(2)
    for f in fakes.values():
        f.refusal = refusal
    with pytest.raises(type(refusal)):
        await orchs.admit(request(), timeout_s=1.0)
    assert sum(f.admits for f in fakes.values()) == 1


def busy(retry_after_s: float | None = 1.0, reason: Reason = Reason.BUSY) -> ResourceExhausted:
    return ResourceExhausted("behind", retry_after_s=retry_after_s, reason=reason)


@pytest.mark.parametrize("reason", [Reason.BUSY, Reason.DROPPED])
async def test_a_busy_orchestrator_is_passed_over_then_tried_last_until_its_retry_after(
    reason: Reason,
) -> None:
    orchs, fakes, clock = make(3)
    fakes["o0"].refusal = busy(retry_after_s=2.0, reason=reason)
    leases = [await orchs.admit(request(), timeout_s=1.0) for _ in range(6)]
    assert all(not lease.lease_id.startswith("o0-") for lease in leases)
    assert fakes["o0"].admits == 1  # refused once, then tried after the others
    assert not degraded(orchs)
    fakes["o0"].refusal = None
    clock.now += 2.0  # its retry-after passed: in turn again
    leases = [await orchs.admit(request(), timeout_s=1.0) for _ in range(3)]
    assert {lease.lease_id[:2] for lease in leases} == {"o0", "o1", "o2"}


async def test_a_busy_mark_holds_for_its_class_and_less_urgent_ones_only() -> None:
    orchs, fakes, _ = make(2)
    fakes["o0"].refusal = busy(retry_after_s=5.0)
    await orchs.admit(request(priority=Priority.STANDARD), timeout_s=1.0)  # o0 BUSY, o1 grants
    fakes["o0"].refusal = None
    fakes["o0"].admits = 0
    for _ in range(4):
        await orchs.admit(request(priority=Priority.BATCH), timeout_s=1.0)
    assert fakes["o0"].admits == 0  # it sheds batch too: tried after o1, which grants
    for _ in range(4):
        await orchs.admit(request(priority=Priority.INTERACTIVE), timeout_s=1.0)
    assert fakes["o0"].admits == 2  # interactive requests still go to it in turn
    for _ in range(2):
        await orchs.admit(request(priority=Priority.STANDARD), timeout_s=1.0)
    assert fakes["o0"].admits == 2  # standard ones not, until its retry-after


async def test_one_busy_failover_per_request_then_the_refusal_not_degraded_mode() -> None:
    orchs, fakes, _ = make(3)
    await orchs.status(timeout_s=1.0)  # a usable view: degraded mode could serve
    for i, f in enumerate(fakes.values()):
        f.refusal = busy(retry_after_s=1.0 + i)
    with pytest.raises(ResourceExhausted) as info:
        await orchs.admit(request(), timeout_s=1.0)
    assert info.value.reason is Reason.BUSY
    tried = [i for i, f in enumerate(fakes.values()) if f.admits]
    assert len(tried) == 2  # two tried, not all three, once each
    assert sum(f.admits for f in fakes.values()) == 2
    assert info.value.retry_after_s in {1.0 + i for i in tried}  # a refusal's own
    assert not degraded(orchs)


async def test_a_busy_refusal_then_unreachable_ones_is_the_refusal() -> None:
    orchs, fakes, _ = make(3)
    await orchs.status(timeout_s=1.0)
    fakes["o0"].refusal = busy()
    fakes["o1"].up = fakes["o2"].up = False
    with pytest.raises(ResourceExhausted):
        await orchs.admit(request(), timeout_s=1.0)
    assert not degraded(orchs)


async def test_a_refusal_without_a_retry_after_gets_the_set_s() -> None:
    orchs, fakes, _ = make(1, retry_after_s=3.0)
    fakes["o0"].refusal = busy(retry_after_s=None, reason=Reason.DROPPED)
    with pytest.raises(ResourceExhausted) as info:
        await orchs.admit(request(), timeout_s=1.0)
    assert info.value.retry_after_s == 3.0


async def test_a_dropped_call_is_no_sign_of_life() -> None:
    orchs, fakes, _ = make(2)
    await orchs.status(timeout_s=1.0)
    for f in fakes.values():
        f.up = False
    await orchs.admit(request(), timeout_s=1.0)  # none answers: degraded mode
    assert degraded(orchs)
    fakes["o0"].up = True
    fakes["o0"].refusal = busy(reason=Reason.DROPPED)
    with pytest.raises(ResourceExhausted):
        await orchs.admit(request(), timeout_s=1.0)
    assert degraded(orchs)  # a stopping orchestrator's dropped call does not end it
    fakes["o0"].refusal = busy(reason=Reason.BUSY)
    with pytest.raises(ResourceExhausted):
        await orchs.admit(request(), timeout_s=1.0)
    assert not degraded(orchs)  # a BUSY answer does


async def test_complete_goes_to_the_granting_orchestrator() -> None:
    orchs, fakes, _ = make(3)
    leases = [await orchs.admit(request(), timeout_s=1.0) for _ in range(6)]
    for lease in leases:
        orchs.complete(report(lease.lease_id))
    for addr, fake in fakes.items():
        assert fake.completed == [x.lease_id for x in leases if x.lease_id.startswith(addr)]
        assert len(fake.completed) == 2


async def test_complete_of_a_gone_orchestrator_is_delivered_then_its_channel_closed() -> None:
    orchs, fakes, _ = make(2)
    first = await orchs.admit(request(), timeout_s=1.0)
    owner = first.lease_id[:2]
    orchs.set_addresses([a for a in ("o0", "o1") if a != owner])  # it left the list
    assert not fakes[owner].closed  # still owns a lease
    orchs.complete(report(first.lease_id))
    assert fakes[owner].completed == [first.lease_id]
    await orchs.drain()
    assert fakes[owner].closed


async def test_no_orchestrator_and_no_view_is_unavailable() -> None:
    """With the set's retry-after (an HTTP client's 503 gets a Retry-After)."""
    orchs, fakes, _ = make(2, retry_after_s=3.0)
    for f in fakes.values():
        f.up = False
    with pytest.raises(OrchestratorUnavailable) as info:
        await orchs.admit(request(), timeout_s=1.0)
    assert info.value.retry_after_s == 3.0
    assert not degraded(orchs)
    none = make(0, retry_after_s=3.0)[0]
    with pytest.raises(OrchestratorUnavailable) as info:
        await none.admit(request(), timeout_s=1.0)
    assert info.value.retry_after_s == 3.0


async def test_degraded_mode_enter_serve_and_leave() -> None:
    orchs, fakes, clock = make(2, view_max_age_s=60.0)
    await orchs.refresh()  # keeps the view
    for f in fakes.values():
        f.up = False
    clock.now += 30.0
    leases = [await orchs.admit(request(), timeout_s=1.0) for _ in range(4)]
    assert degraded(orchs)
    assert all(lease.lease_id.startswith(LOCAL_LEASE_PREFIX) for lease in leases)
    # Least outstanding over the routable replicas (r2 was not routable).
    assert sorted(lease.replica.id for lease in leases) == ["r0", "r0", "r1", "r1"]
    # Readiness still answers, from the last-known view.
    status = await orchs.status(timeout_s=1.0)
    assert status.degraded
    assert status.ready_replicas == 2
    # Releasing r0's leases makes it the least outstanding.
    for lease in leases:
        if lease.replica.id == "r0":
            orchs.complete(report(lease.lease_id))
    nxt = await orchs.admit(request(), timeout_s=1.0)
    assert nxt.replica.id == "r0"
    # Local leases' reports stay local.
    assert not any(f.completed for f in fakes.values())
    # An orchestrator is back: the next refresh leaves degraded mode.
    fakes["o1"].up = True
    clock.now += 10.0
    await orchs.refresh()
    assert not degraded(orchs)
    lease = await orchs.admit(request(), timeout_s=1.0)
    assert lease.lease_id.startswith("o1-")


async def test_degraded_mode_respects_version_exclusions_and_local_failures() -> None:
    orchs, fakes, clock = make(1)
    await orchs.refresh()
    fakes["o0"].up = False
    with pytest.raises(NoReplica):
        await orchs.admit(request(model_version="v2"), timeout_s=1.0)
    lease = await orchs.admit(request(exclude_replicas=frozenset({"r0"})), timeout_s=1.0)
    assert lease.replica.id == "r1"
    orchs.complete(report(lease.lease_id, Outcome.REPLICA_ERROR))
    for _ in range(3):
        assert (await orchs.admit(request(), timeout_s=1.0)).replica.id == "r0"
    clock.now += LOCAL_EJECTION_S  # back, and the least outstanding
    assert (await orchs.admit(request(), timeout_s=1.0)).replica.id == "r1"


async def test_degraded_mode_sends_a_model_only_to_replicas_that_serve_it() -> None:
    """A replica asked for a model it does not serve answers "unknown model", a fault that
    would trip every stream on it; one listed without models (an older orchestrator's) may
    serve any."""
    orchs, fakes, _ = make(1)
    fakes["o0"].view = (
        KnownReplica(replica("r0"), routable=True, in_flight=0, models=frozenset({"a"})),
        KnownReplica(replica("r1"), routable=True, in_flight=0, models=frozenset({"b"})),
    )
    await orchs.refresh()
    fakes["o0"].up = False
    for _ in range(6):
        assert (await orchs.admit(request(model="b"), timeout_s=1.0)).replica.id == "r1"
    with pytest.raises(NoReplica, match="'c'"):
        await orchs.admit(request(model="c"), timeout_s=1.0)
    assert KnownReplica(replica("r2"), routable=True, in_flight=0).serves("c")


async def test_degraded_mode_needs_a_fresh_view_and_can_be_off() -> None:
    orchs, fakes, clock = make(1, view_max_age_s=60.0)
    await orchs.refresh()
    fakes["o0"].up = False
    clock.now += 61.0
    with pytest.raises(OrchestratorUnavailable):
        await orchs.admit(request(), timeout_s=1.0)
    assert not degraded(orchs)
    off, off_fakes, _ = make(1, degraded_mode=False)
    await off.refresh()
    off_fakes["o0"].up = False
    with pytest.raises(OrchestratorUnavailable):
        await off.admit(request(), timeout_s=1.0)


async def test_the_clients_own_deadline_is_no_sign_of_life() -> None:
    orchs, fakes, _ = make(2)
    await orchs.status(timeout_s=1.0)
    for f in fakes.values():
        f.up = False
    await orchs.refresh()
    assert degraded(orchs)
    fakes["o0"].up = True  # connected, and silent: the Admit's deadline runs out here
    fakes["o0"].refusal = DeadlineExceeded("admission: Deadline Exceeded")
    with pytest.raises(DeadlineExceeded):
        await orchs.admit(request(), timeout_s=1.0)
    assert degraded(orchs)
    fakes["o0"].refusal = DeadlineExceeded("queued too long", reason=Reason.QUEUE_TIMEOUT)
    with pytest.raises(DeadlineExceeded):
        await orchs.admit(request(), timeout_s=1.0)
    assert not degraded(orchs)  # its own queue timeout is an answer


async def test_a_failed_refresh_enters_degraded_mode() -> None:
    orchs, fakes, _ = make(2)
    await orchs.refresh()
    for f in fakes.values():
        f.up = False
    await orchs.refresh()
    assert degraded(orchs)


async def test_discovery_replaces_members_and_keeps_them_when_resolution_fails() -> None:
    found: list[str] | OSError = ["a:1", "b:1"]

    async def discover() -> list[str]:
        if isinstance(found, OSError):
            raise found
        return list(found)

    orchs = OrchestratorSet(FakeOrchestrator, discover=discover)
    await orchs.refresh()
    assert orchs.addresses == ["a:1", "b:1"]
    found = OSError("NXDOMAIN")
    await orchs.refresh()
    assert orchs.addresses == ["a:1", "b:1"]
    found = ["b:1", "c:1"]
    await orchs.refresh()
    assert orchs.addresses == ["b:1", "c:1"]
    await orchs.close()


async def test_the_members_admit_runs_in_the_requests_own_task() -> None:
    # No task of its own: its answer reaches the request in one turn of the event loop, not
    # three (that task's wake-up, then its waiter's, then the request's).
    orchs, fakes, _ = make(2)
    admitting = asyncio.ensure_future(orchs.admit(request(), timeout_s=1.0))
    await admitting
    assert fakes["o0"].admit_tasks == [admitting]


async def test_an_admit_waiting_on_an_orchestrator_found_unreachable_goes_to_the_next() -> None:
    orchs, fakes, _ = make(2)
    fakes["o0"].hold = asyncio.Event()  # never set: o0 hangs

    async def admit() -> tuple[Lease, int]:
        lease = await orchs.admit(request(), timeout_s=5.0)
        task = asyncio.current_task()
        assert task is not None
        return lease, task.cancelling()

    admitting = asyncio.ensure_future(admit())

    async def in_flight() -> bool:
        return fakes["o0"].admits == 1

    await eventually(in_flight, what="an Admit in flight to o0")
    # Found unreachable meanwhile (a view refresh of a hung process, say).
    orchs._unreached("o0", OrchestratorUnavailable("o0: keepalive timeout"))
    lease, cancelling = await admitting
    assert lease.lease_id.startswith("o1-")
    assert cancelling == 0  # the abandon's cancel was taken back: the request is not cancelled
    assert not orchs._admitting


async def test_a_hung_orchestrator_neither_spends_the_others_time_nor_gets_them_marked_down() -> (
    None
):
    orchs, fakes, _ = make(3, retry_after_s=5.0)
    fakes["o0"].hung = True  # first in turn
    status = await asyncio.wait_for(orchs.status(timeout_s=1.0), 10.0)  # a bound, no sync
    assert status.known == VIEW
    assert not degraded(orchs)
    # Each was asked with the whole timeout, and none is marked down (tried last).
    assert [f.status_timeouts for f in fakes.values()] == [[1.0], [1.0], [1.0]]
    lease = await orchs.admit(request(), timeout_s=1.0)
    assert lease.lease_id.startswith("o1-")  # the next in turn, not passed over
    await orchs.status(timeout_s=1.0)  # another probe joins the hung one's call still out
    assert [len(f.status_timeouts) for f in fakes.values()] == [1, 2, 2]
    # Its own call goes on: once its deadline passes unanswered, the hung one is marked down.
    fakes["o0"].times_out.set()

    async def marked_down() -> bool:
        return "o0" in orchs._down_until

    await eventually(marked_down, what="the hung orchestrator marked down")
    await orchs.close()


async def test_a_lease_granted_as_its_orchestrator_is_removed_is_still_reported_to_it() -> None:
    orchs, fakes, _ = make(2)
    admitting, hold = await admit_held_at_o0(orchs, fakes)
    orchs.set_addresses(["o1"])  # o0 leaves the list while it may still grant
    assert not fakes["o0"].closed
    hold.set()
    lease = await admitting
    assert lease.lease_id.startswith("o0-")
    orchs.complete(report(lease.lease_id))
    assert fakes["o0"].completed == [lease.lease_id]  # reported, not dropped

    await until_closed(fakes["o0"], "o0 closed once its last report was handed over")


async def test_a_request_cancelled_as_its_orchestrator_is_abandoned_stays_cancelled() -> None:
    orchs, fakes, _ = make(2)
    admitting, _ = await admit_held_at_o0(orchs, fakes)
    # In one tick: o0 found unreachable (its Admits abandoned) and the request cancelled.
    orchs._unreached("o0", OrchestratorUnavailable("o0: connection reset"))
    admitting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await admitting
    assert fakes["o1"].admits == 0  # not sent on to another orchestrator


@pytest.mark.parametrize("meanwhile", ["lease", "untyped refusal", None])
async def test_a_listing_not_answered_in_time_abandons_admits_only_of_a_silent_orchestrator(
    meanwhile: str | None,
) -> None:
    """An orchestrator that answered anything itself after a listing was sent, and does not
    answer the listing in time, is behind on its work: its waiting Admits stay with it
    (abandoned, they would be leased in degraded mode, past admission, while it is overloaded)
    and the listing gives the last view; one silent meanwhile is hung: they are abandoned. A
    refusal without a typed reason may be a proxy's in its name: no answer of its own."""
    orchs, fakes, clock = make(1)
    await orchs.status(timeout_s=1.0)  # a view for degraded mode
    admitting, hold = await admit_held_at_o0(orchs, fakes)
    listing = await listing_to_a_hung_o0(orchs, fakes)
    clock.now += 0.5
    fakes["o0"].hold = None  # the held Admit still waits on its own event
    if meanwhile == "lease":
        await orchs.admit(request(), timeout_s=1.0)
    elif meanwhile == "untyped refusal":
        fakes["o0"].refusal = ResourceExhausted("upstream overflow")
        with pytest.raises(ResourceExhausted):
            await orchs.admit(request(), timeout_s=1.0)
        fakes["o0"].refusal = None
    answers_meanwhile = meanwhile == "lease"
    fakes["o0"].times_out.set()  # the listing's deadline passes unanswered
    status = await listing
    assert status.known == VIEW
    assert status.degraded is not answers_meanwhile
    assert degraded(orchs) is not answers_meanwhile
    hold.set()
    lease = await admitting
    assert lease.lease_id.startswith("o0-" if answers_meanwhile else LOCAL_LEASE_PREFIX)
    assert ("o0" in orchs._down_until) is not answers_meanwhile
    await orchs.close()


async def test_an_orchestrator_behind_with_a_view_too_old_is_not_ready() -> None:
    orchs, fakes, clock = make(1, view_max_age_s=60.0)
    await orchs.status(timeout_s=1.0)
    clock.now += 61.0
    listing = await listing_to_a_hung_o0(orchs, fakes)
    clock.now += 0.5
    await orchs.admit(request(), timeout_s=1.0)  # answered meanwhile
    fakes["o0"].times_out.set()
    with pytest.raises(OrchestratorTimedOut):
        await listing
    assert "o0" in orchs._behind  # behind, not hung: but its view is too old to answer
    await orchs.close()


@pytest.mark.parametrize("error", [RuntimeError("a bug"), asyncio.CancelledError()])
async def test_a_member_failing_status_otherwise_than_unreached_is_no_answer(
    error: BaseException,
) -> None:
    orchs, fakes, _ = make(2)
    fakes["o0"].status_error = error
    status = await orchs.status(timeout_s=1.0)
    assert status.known == VIEW  # o1's answer
    assert not degraded(orchs)


async def test_a_listing_refused_by_every_orchestrator_is_no_degraded_mode() -> None:
    """A refusal (a mesh policy without ListReplicas) is an answer: the last view stands, not
    degraded; with none fresh, the refusal is what readiness reports."""
    orchs, fakes, clock = make(1, view_max_age_s=60.0)
    await orchs.refresh()
    refusal = ServiceError("orchestrator: PERMISSION_DENIED: RBAC: access denied")
    fakes["o0"].status_error = refusal
    status = await orchs.status(timeout_s=1.0)
    assert (status.known, status.degraded) == (VIEW, False)
    assert not degraded(orchs)
    clock.now += 61.0
    with pytest.raises(ServiceError, match="PERMISSION_DENIED"):
        await orchs.status(timeout_s=1.0)
    assert not degraded(orchs)


async def test_a_removed_orchestrator_closes_once_its_last_admit_in_flight_ends() -> None:
    orchs, fakes, _ = make(2)
    fakes["o0"].up = False  # its Admit fails once let go
    admitting, hold = await admit_held_at_o0(orchs, fakes)
    orchs.set_addresses(["o1"])
    assert not fakes["o0"].closed  # kept while its Admit is in flight
    hold.set()
    lease = await admitting  # failed over to o1
    assert lease.lease_id.startswith("o1-")

    await until_closed(fakes["o0"], "o0 closed once its Admit ended")


async def test_the_pools_an_orchestrator_lists_get_latency_series_from_zero() -> None:
    """Each served model's TTFT series for a pool the orchestrators list exists (at 0) before
    its first observation, which a rate over the scrapes would otherwise lose."""
    gateway_metrics.StreamMetrics("model-of-listed-pools", "another-pool", None)  # served
    orchs, fakes, _ = make(1)
    listed = ReplicaAddress(id="q0", grpc_address="q0:8001", pool="pool-only-listed-here")
    fakes["o0"].view = (KnownReplica(listed, routable=True, in_flight=0),)
    labels = {"model": "model-of-listed-pools", "pool": "pool-only-listed-here"}
    count = f"{names.GATEWAY_TTFT}_count"
    assert REGISTRY.get_sample_value(count, labels) is None
    await orchs.status(timeout_s=1.0)
    assert REGISTRY.get_sample_value(count, labels) == 0.0
