"""Several orchestrators, active-active, as one `AdmissionClient`; and the degraded mode that
keeps the gateway serving when none of them answers.

Admit: each call starts at the next orchestrator in turn (round robin); one that is not reached
(`OrchestratorUnavailable`: UNAVAILABLE without a typed reason, i.e. no orchestrator answered)
is marked down for `retry_after_s` (tried after the others meanwhile) and the call goes on to the
next one. That retry is safe: nothing has streamed yet and no lease was granted. A typed refusal
(`NoReplica`, QUEUE_FULL with its retry-after, QUEUE_TIMEOUT, a bad request) is an answer, not a
failure, and is never retried on another orchestrator: every orchestrator sees the same replicas
and engines, so another would mostly say the same, and under overload a retry would double the
admission pressure instead of honouring the retry-after. The exceptions are reasons BUSY (that
orchestrator process is behind on its own calls: services/orchestrator/shedding.py) and DROPPED
(its gRPC ended the call unanswered: held unstarted too long, or the process is stopping), which
say nothing of the others: the call goes on to the next orchestrator, once per request, and the
refusing one is tried after the others until its retry-after, for requests of the refused class
and less urgent ones (it sheds those first; more urgent ones still go to it in turn). When that one refuses too, or
none is left, the refusal (with its retry-after, this set's when it had none) is the answer,
never degraded mode.

Complete: the set remembers which orchestrator granted each lease and reports it there (leases
are that orchestrator's load accounting). If that orchestrator is gone, so is the state the
report would correct: the report is dropped, and the other orchestrators see the stream's end in
the engines' own counts (services/orchestrator/director.py, `_others_load`).

Degraded mode (`degraded_mode`): when no orchestrator is reached, Admit leases a replica itself
from the last replica view an orchestrator gave (ListReplicas, refreshed every
`refresh_interval_s` and by readiness checks), if that view is at most `view_max_age_s` old: a
replica routable then, of the request's model version, not excluded by the request, not failed by
one of this gateway's own degraded leases in the last `LOCAL_EJECTION_S`, with the fewest of this
gateway's own outstanding degraded leases (ties in turn). Such lease ids start with
`LOCAL_LEASE_PREFIX`; their Complete stays here. What it gives up: no queue, no per-replica cap,
no prefix affinity, no pool by prompt length, no knowledge of other gateways' load (each gateway
balances only its own requests; the engines queue what exceeds their batch), no health probes
(only the gateway's own failures). The mode is entered when an Admit or a view refresh reaches
no orchestrator and left as soon as one answers anything; both are logged, and
`llmmesh_gateway_degraded` is 1 meanwhile (`llmmesh_gateway_degraded_admissions_total` counts its
leases). A listing that times out (`OrchestratorTimedOut`) at an orchestrator that answered
anything itself since it was sent (a lease, a typed refusal) is no such sign: that process is
behind on its work, not hung, and its waiting Admits stay with it (abandoned, they would be
leased here, past admission, exactly while it is overloaded); the listing answers with the
last view then, not degraded.

Membership: a fixed list of addresses, or `discover` (a headless Service's A records, resolved
each refresh). An orchestrator that leaves the list keeps receiving the reports of the leases it
granted, then its channel is closed.

Invariants:
- Every lease handed out is recorded with its owner (an orchestrator's address, or local) until
  its one Complete; the owner table holds live leases only.
- `degraded` is True from a call that reached no orchestrator and served (or listed) from the
  last-known view instead, until an orchestrator answers (a call its gRPC dropped, DROPPED, is
  no answer: degraded mode then stays as it was, and that call is refused).
- The set reads only its injected clock; its background refresh is the only timer (tests call
  `refresh` directly).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol

from llmmesh.common.errors import DeadlineExceeded, Reason, ServiceError
from llmmesh.common.topology import Priority
from services.gateway import metrics
from services.gateway.admission import (
    AdmissionRequest,
    AdmissionStatus,
    KnownReplica,
    Lease,
    LeaseReport,
    Outcome,
)
from services.gateway.errors import NoReplica, OrchestratorTimedOut, OrchestratorUnavailable

__all__ = ["LOCAL_EJECTION_S", "LOCAL_LEASE_PREFIX", "Member", "OrchestratorSet"]

log = logging.getLogger(__name__)

# Refusals that speak for one orchestrator process only: the call goes on to another.
_ANOTHER_MAY_ANSWER = frozenset({Reason.BUSY, Reason.DROPPED})


def _retrieved(call: asyncio.Future[AdmissionStatus]) -> None:
    """A listing's failure is read even when no one awaits it (no "never retrieved" log)."""
    if not call.cancelled():
        call.exception()


def _sign_of_life(err: ServiceError) -> bool:
    """Whether a refused Admit shows its orchestrator answering: not a call its gRPC dropped
    unstarted, nor one this client gave up on at its own deadline (no typed reason: a hung
    orchestrator behind a proxy that keeps the connection alive looks just like that; its own
    queue timeout carries QUEUE_TIMEOUT)."""
    if err.reason is Reason.DROPPED:
        return False
    return not (isinstance(err, DeadlineExceeded) and err.reason is None)


class _Waiting:
    """One request's Admit in flight to one orchestrator. The member's admit runs in the
    request's own task (a task of its own would cost the answer two more turns of a busy event
    loop: its wake-up, then its waiter's); giving up on that orchestrator cancels the request's
    task once (`abandon`), and `OrchestratorSet._admit_on` tells that cancel from the request's
    own by `abandoned` and the task's count of cancel requests, as `asyncio.timeout` does."""

    __slots__ = ("abandoned", "task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.abandoned = False

    def abandon(self) -> None:
        # The current task is not waiting on its Admit (it runs): nothing to give up.
        if not self.abandoned and self.task is not asyncio.current_task():
            self.abandoned = True
            self.task.cancel()


class _Abandoned(Exception):
    """The Admit's orchestrator was found unreachable while it waited (`_Waiting.abandon`)."""


LOCAL_LEASE_PREFIX: Final = "local-"
# A replica one of this gateway's degraded leases failed on is skipped this long.
LOCAL_EJECTION_S: Final = 10.0
_LOCAL: Final = ""  # owner of a degraded-mode lease


class Member(Protocol):
    """One orchestrator's client (`OrchestratorClient`)."""

    address: str

    async def admit(self, request: AdmissionRequest, *, timeout_s: float) -> Lease: ...

    def complete(self, report: LeaseReport) -> None: ...

    async def drain(self) -> None: ...

    async def status(self, *, timeout_s: float) -> AdmissionStatus: ...

    async def close(self) -> None: ...


class OrchestratorSet:
    """`AdmissionClient` over every orchestrator (module docstring)."""

    def __init__(
        self,
        factory: Callable[[str], Member],
        addresses: Sequence[str] = (),
        *,
        discover: Callable[[], Awaitable[list[str]]] | None = None,
        degraded_mode: bool = True,
        view_max_age_s: float = 300.0,
        retry_after_s: float = 1.0,
        refresh_interval_s: float = 2.0,
        status_timeout_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = factory
        self._discover = discover
        self._degraded_mode = degraded_mode
        self._view_max_age_s = view_max_age_s
        self._retry_after_s = retry_after_s
        self._refresh_interval_s = refresh_interval_s
        self._status_timeout_s = status_timeout_s
        self._clock = clock
        self._members: dict[str, Member] = {}
        self._retired: dict[str, Member] = {}  # left the list, still owning leases
        self._down_until: dict[str, float] = {}
        # When each last answered anything itself (a lease, a refusal with a typed reason, a
        # listing; not a proxy's refusal in its name).
        self._heard_at: dict[str, float] = {}
        # Those whose last listing timed out while they answered Admits (`_status_ended`).
        self._behind: set[str] = set()
        # Per orchestrator, per class it refused BUSY (or dropped a call of): until when. It
        # sheds that class and the less urgent ones first: for those it is tried after the
        # others meanwhile; more urgent requests still go to it in turn.
        self._busy_until: dict[str, dict[Priority, float]] = {}
        self._turn = 0
        self._owner: dict[str, str] = {}  # lease id -> orchestrator address, or _LOCAL
        self._owned: dict[str, int] = {}  # address -> live leases it granted
        # Last replica view an orchestrator gave, and when.
        self._view: tuple[KnownReplica, ...] = ()
        self._view_at: float | None = None
        # Degraded mode.
        self._degraded = False
        self._degraded_since = 0.0
        self._local_leases: dict[str, str] = {}  # lease id -> replica id
        self._outstanding: dict[str, int] = {}  # replica id -> live local leases
        self._local_failed: dict[str, float] = {}  # replica id -> skipped until
        self._local_turn = 0
        self._refresher: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        # The ListReplicas call out to each member, at most one (`_status_call`).
        self._status_calls: dict[str, tuple[Member, asyncio.Future[AdmissionStatus]]] = {}
        # Admit calls in flight per orchestrator: abandoned (and tried on another one) when that
        # orchestrator is found unreachable meanwhile, e.g. by a view refresh of a hung process.
        self._admitting: dict[str, set[_Waiting]] = {}
        self.set_addresses(addresses)
        metrics.record_degraded(False)

    # -- membership ---------------------------------------------------------------------------
    @property
    def addresses(self) -> list[str]:
        return list(self._members)

    @property
    def degraded(self) -> bool:
        return self._degraded

    def set_addresses(self, addresses: Sequence[str]) -> None:
        """Make the orchestrators exactly `addresses` (order kept): new ones get a client; one
        that left keeps its client until the reports of its leases are handed over."""
        wanted = list(dict.fromkeys(addresses))
        for addr in wanted:
            if addr not in self._members:
                member = self._retired.pop(addr, None) or self._factory(addr)
                self._members[addr] = member
                log.info("orchestrator added", extra={"orchestrator": addr})
        for addr in [a for a in self._members if a not in wanted]:
            member = self._members.pop(addr)
            self._down_until.pop(addr, None)
            self._busy_until.pop(addr, None)
            self._heard_at.pop(addr, None)
            self._behind.discard(addr)
            log.info("orchestrator removed", extra={"orchestrator": addr})
            if self._owned.get(addr, 0) or self._admitting.get(addr):
                # Leases to report, or Admits it may still grant: kept until they are done.
                self._retired[addr] = member
            else:
                self._close_later(member)
        self._members = {a: self._members[a] for a in wanted}

    def _status_call(
        self, addr: str, member: Member, timeout_s: float
    ) -> asyncio.Future[AdmissionStatus]:
        """The member's ListReplicas call: the one still out, or a new one. Its outcome marks
        the member (answered, behind, or down) once, before the call counts as done, whoever
        awaits it: one that does not answer within its timeout is marked down even after
        another answered the status() that asked it."""
        out = self._status_calls.get(addr)
        if out is not None and out[0] is member:
            return out[1]
        call = asyncio.ensure_future(self._listed(addr, member, timeout_s))
        self._status_calls[addr] = (member, call)
        call.add_done_callback(_retrieved)
        return call

    async def _listed(self, addr: str, member: Member, timeout_s: float) -> AdmissionStatus:
        sent_at = self._clock()
        try:
            status = await member.status(timeout_s=timeout_s)
        except asyncio.CancelledError:
            raise
        except BaseException as err:
            self._status_ended(addr, member, sent_at, err)
            raise
        else:
            self._status_ended(addr, member, sent_at, None)
            return status
        finally:
            out = self._status_calls.get(addr)
            if out is not None and out[1] is asyncio.current_task():
                del self._status_calls[addr]

    def _status_ended(
        self, addr: str, member: Member, sent_at: float, err: BaseException | None
    ) -> None:
        if self._members.get(addr) is not member:
            return  # it left the list (its client closed) meanwhile
        self._behind.discard(addr)
        if isinstance(err, OrchestratorTimedOut) and self._heard_at.get(addr, -math.inf) > sent_at:
            # It answered since the listing was sent: behind on its work, not hung (a hung
            # process answers nothing). Its Admits stay with it: abandoned, they would go to
            # degraded mode, past admission, exactly while it is overloaded.
            self._behind.add(addr)
            log.warning(
                "ListReplicas not answered in time by an orchestrator still answering Admits",
                extra={"orchestrator": addr, "error": str(err)},
            )
        elif isinstance(err, OrchestratorUnavailable):
            self._unreached(addr, err)
        elif err is not None:  # no answer, and not a sign it is down
            log.warning("ListReplicas failed", extra={"orchestrator": addr, "error": repr(err)})
        else:
            self._answered(addr)

    def _admit_done(self, addr: str, waiting: _Waiting) -> None:
        calls = self._admitting.get(addr)
        if calls is not None:
            calls.discard(waiting)
            if not calls:
                del self._admitting[addr]
        self._close_if_retired_and_done(addr)

    def _close_if_retired_and_done(self, addr: str) -> None:
        """A removed orchestrator kept for Admits in flight is closed once none is left and it
        holds no lease."""
        if addr in self._retired and not self._owned.get(addr) and not self._admitting.get(addr):
            self._close_later(self._retired.pop(addr))

    def _close_later(self, member: Member) -> None:
        task = asyncio.get_running_loop().create_task(member.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _order(self, priority: Priority | None = None) -> list[str]:
        """This call's try order: the next in turn first, those busy for a request of
        `priority` after them, those marked down last."""
        addrs = list(self._members)
        if not addrs:
            return []
        start = self._turn % len(addrs)
        self._turn += 1
        rotated = addrs[start:] + addrs[:start]
        now = self._clock()
        up = [a for a in rotated if self._down_until.get(a, 0.0) <= now]
        free = [a for a in up if priority is None or not self._busy_for(a, priority, now)]
        return free + [a for a in up if a not in free] + [a for a in rotated if a not in up]

    def _busy_for(self, addr: str, priority: Priority, now: float) -> bool:
        """It refused a request as urgent as `priority` or more within its retry-after."""
        marks = self._busy_until.get(addr, {})
        return any(until > now for p, until in marks.items() if p <= priority)

    def _unreached(self, addr: str, err: ServiceError) -> None:
        if addr not in self._members:
            return  # removed meanwhile: nothing to mark
        now = self._clock()
        if addr not in self._down_until:  # logged once per outage, not per call
            log.warning("orchestrator not reached", extra={"orchestrator": addr, "error": str(err)})
        self._down_until[addr] = now + self._retry_after_s
        for waiting in self._admitting.get(addr, ()):
            waiting.abandon()

    def _answered(self, addr: str, *, itself: bool = True) -> None:
        """`addr` answered; `itself`: the orchestrator did, not a proxy in its name."""
        self._down_until.pop(addr, None)
        if itself and addr in self._members:
            self._heard_at[addr] = self._clock()
        if self._degraded:
            self._degraded = False
            metrics.record_degraded(False)
            log.warning(
                "orchestrator answers again: leaving degraded mode",
                extra={
                    "orchestrator": addr,
                    "degraded_for_s": round(self._clock() - self._degraded_since, 3),
                    "local_leases_live": len(self._local_leases),
                },
            )

    def _enter_degraded(self, why: str) -> None:
        if self._degraded:
            return
        self._degraded = True
        self._degraded_since = self._clock()
        metrics.record_degraded(True)
        age = None if self._view_at is None else round(self._clock() - self._view_at, 3)
        log.warning(
            "no orchestrator answers: entering degraded mode (least outstanding over the "
            "last-known healthy replicas)",
            extra={
                "reason": why,
                "orchestrators": list(self._members),
                "view_age_s": age,
                "routable_replicas": [k.replica.id for k in self._view if k.routable],
            },
        )

    # -- AdmissionClient ----------------------------------------------------------------------
    async def admit(self, request: AdmissionRequest, *, timeout_s: float) -> Lease:
        deadline = self._clock() + timeout_s
        last: ServiceError | None = None
        busy: ServiceError | None = None
        for i, addr in enumerate(self._order(request.priority)):
            member = self._members.get(addr)
            if member is None:  # left the list while an earlier one was tried
                continue
            if i:
                metrics.record_admit_failover()
            try:
                lease = await self._admit_on(addr, member, request, deadline)
            except _Abandoned:
                # That orchestrator stopped answering (nothing has streamed yet; a lease it
                # might still grant ends by its lease timeout).
                last = OrchestratorUnavailable(f"orchestrator {addr} stopped answering")
                continue
            except OrchestratorUnavailable as err:
                self._unreached(addr, err)
                last = err
                continue
            except ServiceError as err:
                if _sign_of_life(err):
                    self._answered(addr, itself=err.reason is not None)
                if err.reason not in _ANOTHER_MAY_ANSWER:
                    raise  # any other typed refusal is an answer: not retried elsewhere
                # That process is behind on its calls (or stopping): another may not be. One
                # such failover per request: when the orchestrators are all behind, each try
                # adds to every one's backlog.
                if addr in self._members:  # not for one that left the list meanwhile
                    self._busy_until.setdefault(addr, {})[request.priority] = self._clock() + (
                        err.retry_after_s if err.retry_after_s is not None else self._retry_after_s
                    )
                second, busy = busy is not None, err
                if second:
                    break
                continue
            self._answered(addr)
            marks = self._busy_until.get(addr)
            if marks:  # it takes this class (and so every more urgent one) again
                for p in [p for p in marks if p <= request.priority]:
                    del marks[p]
            return lease
        if busy is not None:  # reached, and behind: degraded mode would skip admission then
            raise self._retry_later(busy)
        return self._admit_degraded(request, last)

    async def _admit_on(
        self, addr: str, member: Member, request: AdmissionRequest, deadline: float
    ) -> Lease:
        """The member's admit, in this task, counted in `_admitting` until it ends (a member
        that left the list is closed only after that); its lease is recorded as owned before
        (the member must not close in between). `_Abandoned` when `_unreached` gave up on that
        orchestrator meanwhile; a cancel of the request itself (alone or with that) stays one."""
        task = asyncio.current_task()
        assert task is not None
        cancels = task.cancelling()  # before this call's own
        waiting = _Waiting(task)
        self._admitting.setdefault(addr, set()).add(waiting)
        try:
            lease = await member.admit(request, timeout_s=deadline - self._clock())
        except asyncio.CancelledError:
            if waiting.abandoned and task.uncancel() <= cancels:
                raise _Abandoned from None
            raise
        except BaseException:
            if waiting.abandoned:
                task.uncancel()  # the member ended otherwise than by the abandon's cancel
            raise
        else:
            if waiting.abandoned:
                task.uncancel()  # the member answered through the cancel: not this task's any more
            self._owner[lease.lease_id] = addr
            self._owned[addr] = self._owned.get(addr, 0) + 1
            return lease
        finally:
            self._admit_done(addr, waiting)

    def complete(self, report: LeaseReport) -> None:
        lease_id = report.lease_id
        replica = self._local_leases.pop(lease_id, None)
        if replica is not None:
            self._owner.pop(lease_id, None)
            left = self._outstanding.get(replica, 1) - 1
            if left > 0:
                self._outstanding[replica] = left
            else:
                self._outstanding.pop(replica, None)
            if report.outcome is Outcome.REPLICA_ERROR:
                self._local_failed[replica] = self._clock() + LOCAL_EJECTION_S
            return
        addr = self._owner.pop(lease_id, None)
        if addr is None:
            log.warning("complete for an unknown lease", extra={"lease_id": lease_id})
            return
        self._owned[addr] = self._owned.get(addr, 1) - 1
        member = self._members.get(addr) or self._retired.get(addr)
        if member is None:
            log.info(
                "the lease's orchestrator is gone: report dropped",
                extra={"lease_id": lease_id, "orchestrator": addr},
            )
            if self._owned[addr] <= 0:
                del self._owned[addr]
            return
        member.complete(report)
        if self._owned[addr] <= 0:
            del self._owned[addr]
        # Its last report handed over (closing drains it first), no Admit in flight to it.
        self._close_if_retired_and_done(addr)

    async def drain(self) -> None:
        members = [*self._members.values(), *self._retired.values()]
        await asyncio.gather(*(m.drain() for m in members), return_exceptions=True)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def status(self, *, timeout_s: float) -> AdmissionStatus:
        """The first answering orchestrator's view (kept for degraded mode); with none, the
        last-known view marked `degraded` while degraded mode may use it. Every orchestrator
        is asked at once (one call out to each at most: a probe joins the call still out),
        each with the whole `timeout_s`: one that hangs neither spends the others' time nor
        gets them marked down, and is marked down itself when its call times out
        (`_status_call`), whether or not another answered first. `timeout_s` bounds the calls
        this one starts; a joined call keeps the deadline it was started with."""
        last: ServiceError | None = None
        refused: ServiceError | None = None  # an answer refusing the listing: it is up
        calls = {
            self._status_call(addr, member, timeout_s): addr
            for addr in self._order()
            if (member := self._members.get(addr)) is not None
        }
        pending = set(calls)
        behind = False  # one did not list in time, and answers Admits (`_status_ended`)
        while pending:
            # The calls go on when this returns or is cancelled (wait() never cancels them).
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            answered: AdmissionStatus | None = None
            for call in done:
                if call.cancelled():
                    continue
                err = call.exception()
                if isinstance(err, OrchestratorUnavailable):
                    last = err
                    behind |= calls[call] in self._behind
                elif isinstance(err, ServiceError):
                    refused = refused or err
                elif err is None:
                    answered = answered or call.result()
            if answered is not None:
                self._view, self._view_at = answered.known, self._clock()
                metrics.record_pools_known({k.replica.pool for k in answered.known})
                return answered
        if (behind or refused is not None) and self._view_fresh():
            # Admitting, only slow to list, or refusing the listing (a mesh policy, an older
            # version): no degraded mode while an orchestrator answers.
            return self._last_view(degraded=False)
        if refused is not None:
            raise refused
        if not self._usable_view():
            raise last or OrchestratorUnavailable("no orchestrator known")
        self._enter_degraded("no orchestrator answered ListReplicas")
        return self._last_view(degraded=True)

    def _last_view(self, *, degraded: bool) -> AdmissionStatus:
        return AdmissionStatus(
            replicas=len(self._view),
            ready_replicas=sum(1 for k in self._view if k.routable),
            queue_depth=0,
            known=self._view,
            degraded=degraded,
        )

    # -- degraded mode ------------------------------------------------------------------------
    def _view_fresh(self) -> bool:
        return self._view_at is not None and self._clock() - self._view_at <= self._view_max_age_s

    def _usable_view(self) -> bool:
        return self._degraded_mode and self._view_fresh()

    def _retry_later(self, err: ServiceError) -> ServiceError:
        """`err`, with the set's retry-after where it carries none."""
        if err.retry_after_s is None:
            err.retry_after_s = self._retry_after_s
        return err

    def _admit_degraded(self, request: AdmissionRequest, last: ServiceError | None) -> Lease:
        if not self._usable_view():
            # No orchestrator reached: the client tries again when this gateway tries the
            # first of them again (an HTTP client's 503 gets a Retry-After).
            raise self._retry_later(last or OrchestratorUnavailable("orchestrator: none known"))
        self._enter_degraded(str(last) if last is not None else "no orchestrator known")
        now = self._clock()
        candidates = [
            k.replica
            for k in self._view
            if k.routable
            and k.serves(request.model)
            and (not request.model_version or k.replica.model_version == request.model_version)
            and k.replica.id not in request.exclude_replicas
            and self._local_failed.get(k.replica.id, 0.0) <= now
        ]
        if not candidates:
            raise NoReplica(
                "degraded mode (no orchestrator answers): no last-known healthy replica of "
                f"model {request.model!r} for version {request.model_version!r}",
                reason=Reason.NO_REPLICA,
            )
        start = self._local_turn % len(candidates)
        self._local_turn += 1
        rotated = candidates[start:] + candidates[:start]
        replica = min(rotated, key=lambda r: self._outstanding.get(r.id, 0))
        lease_id = f"{LOCAL_LEASE_PREFIX}{uuid.uuid4().hex}"
        self._local_leases[lease_id] = replica.id
        self._owner[lease_id] = _LOCAL
        self._outstanding[replica.id] = self._outstanding.get(replica.id, 0) + 1
        metrics.record_degraded_admission()
        return Lease(lease_id=lease_id, replica=replica, queue_ms=0.0)

    # -- background refresh -------------------------------------------------------------------
    async def refresh(self) -> None:
        """One round: resolve the orchestrators (with `discover`), then refresh the replica
        view (entering or leaving degraded mode as the answers say)."""
        if self._discover is not None:
            try:
                found = await self._discover()
            except OSError as exc:  # keep the last list: those fail fast if really gone
                log.warning("orchestrator discovery failed", extra={"error": repr(exc)})
            else:
                if found or not self._members:
                    self.set_addresses(found)
        with contextlib.suppress(ServiceError):
            await self.status(timeout_s=self._status_timeout_s)

    async def start(self) -> None:
        """A first refresh now, then one every `refresh_interval_s` in the background."""
        await self.refresh()

        async def loop() -> None:
            while True:
                await asyncio.sleep(self._refresh_interval_s)
                try:
                    await self.refresh()
                except Exception:  # the refresh loop must outlive any one failure
                    log.exception("orchestrator refresh failed")

        self._refresher = asyncio.get_running_loop().create_task(loop())

    async def close(self) -> None:
        """Stop refreshing, hand over every report, close every channel."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        calls = [call for _, call in self._status_calls.values()]
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        members = [*self._members.values(), *self._retired.values()]
        self._members, self._retired = {}, {}
        await asyncio.gather(*(m.close() for m in members), return_exceptions=True)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
