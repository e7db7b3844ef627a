"""The replica set: static, discovered and registered replicas, their drain flags and load.

Invariants:
- The set is the static list plus DNS discovery (`sync`) plus registered replicas (`register`);
  discovery never removes a registered replica, and only `deregister` does.
- A replica that leaves the set is marked `removed` at once (never routed to again) and forgotten
  once its last lease ends (`release`).
- A replica's `in_flight` equals the number of live leases on it (the lease table keeps it).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, KeysView, Sequence
from dataclasses import dataclass, field

from llmmesh.common.engine_metrics import EngineSample
from services.orchestrator import metrics
from services.orchestrator.errors import ReplicaConflict, UnknownReplica
from services.orchestrator.scheduling.contracts import ReplicaView
from services.orchestrator.settings import ReplicaSpec

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ReplicaState:
    spec: ReplicaSpec
    ready: bool = False  # last readiness probe passed
    probed: bool = False  # probed at least once by this orchestrator
    # A request granted since its last health round (at `round_at`) succeeded on it, and the
    # rounds in a row it went unprobed for that (`Orchestrator._probe_due`).
    served_since_round: bool = False
    unprobed_rounds: int = 0
    round_at: float = 0.0
    removed: bool = False  # left the replica set; forgotten once its last lease ends
    draining: bool = False  # DrainReplica: no new leases
    registered: bool = False  # added by RegisterReplica; discovery leaves it alone
    in_flight: int = 0
    # Grant times of this orchestrator's live leases on the replica, ascending.
    lease_starts: list[float] = field(default_factory=list)
    completed: int = 0
    failures: int = 0
    consecutive_errors: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    # Recent request outcomes (completion time, failed on the replica), oldest first: the
    # failure-share window of `Health`.
    outcomes: deque[tuple[float, bool]] = field(default_factory=deque)
    failed_outcomes: int = 0  # the failed entries of `outcomes`
    # Earlier values of `in_flight` that some later value is not at least, each with when it
    # ended: (end time, value), both decreasing front to back (`in_flight_peak`).
    ended_peaks: deque[tuple[float, int]] = field(default_factory=deque)
    sample: EngineSample | None = None
    sample_at: float = 0.0
    # This orchestrator's leases on the replica when `sample` was taken: the most it held
    # from the gauges' oldest possible time to the scrape's end (`EngineSampler`). The
    # sample's requests beyond them are other orchestrators' (or leases lost with an
    # orchestrator that died), never one of its own leases that ended since the gauges.
    sample_in_flight: int = 0
    # The last scheduling view of the replica and the spec and sample it was built from (the
    # director reuses it while nothing it shows changed).
    view: ReplicaView | None = None
    view_spec: ReplicaSpec | None = None
    view_sample: EngineSample | None = None
    # What `view` was built from (`Orchestrator._view`'s key), and the span of time it stands
    # for while that stays equal: from `view_at` to `view_until`.
    view_key: tuple[object, ...] | None = None
    view_at: float = 0.0
    view_until: float = 0.0
    # `view` without its load (`Orchestrator._candidates`), and the view it was made from.
    unloaded: ReplicaView | None = None
    unloaded_of: ReplicaView | None = None
    # `sample_at` of the sample the load ledger was last given (it applies each scrape once; a
    # scrape may store the same sample object again, with its own time and counts).
    observed_at: float | None = None
    # The configured cap, for the spec it was computed from.
    cap_spec: ReplicaSpec | None = None
    configured_cap: int = 0

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def set_in_flight(self, value: int, now: float) -> None:
        """`in_flight` becomes `value` at `now`; the value it had is kept while it may be a
        peak of a window still asked about (`in_flight_peak`). Kept: at most one per distinct
        value, so no more than the replica's most leases at once."""
        peaks = self.ended_peaks
        old = self.in_flight
        while peaks and peaks[-1][1] <= old:
            peaks.pop()  # ended no later and was no higher: never the peak again
        peaks.append((now, old))
        self.in_flight = value

    def in_flight_peak(self, since: float) -> int:
        """The most leases this orchestrator held on the replica at any time from `since` to
        now (an engine's gauges taken then count them)."""
        peaks = self.ended_peaks
        while peaks and peaks[0][0] <= since:
            peaks.popleft()  # ended by the window's start
        return max(self.in_flight, peaks[0][1]) if peaks else self.in_flight

    def healthy(self, now: float) -> bool:
        return self.ready and not self.removed and not self.ejected(now)

    def routable(self, now: float) -> bool:
        return self.healthy(now) and not self.draining


@dataclass(frozen=True, slots=True)
class Membership:
    """What a change to the set did, for the director's follow-up (index drops, gauges)."""

    dropped: tuple[str, ...] = ()  # replicas that left: their cached blocks no longer count


class ReplicaSet:
    def __init__(
        self, static: Sequence[ReplicaSpec], forgotten: Callable[[str], None] = lambda _: None
    ) -> None:
        """`forgotten(replica_id)`: called once a replica's state is gone (removed from the set
        with no lease left): an id that comes back later starts anew, one that comes back with
        leases still live keeps its state and what follows it."""
        self._forgotten = forgotten
        self._replicas: dict[str, ReplicaState] = {}
        self._idle: dict[str, asyncio.Event] = {}  # set when the replica's in_flight reaches 0
        for spec in static:
            self._add(ReplicaState(spec))

    def _add(self, st: ReplicaState) -> None:
        self._replicas[st.spec.id] = st
        metrics.record_replica_known(st.spec.id, st.spec.pool)

    @staticmethod
    def _respec(st: ReplicaState, spec: ReplicaSpec) -> None:
        """A known replica's spec changed (no lease live): unready until probed; its series move
        to its new pool."""
        if spec.pool != st.spec.pool:
            metrics.record_replica_forgotten(spec.id, st.spec.pool)
            metrics.record_replica_known(spec.id, spec.pool)
        st.spec, st.ready = spec, False

    def _forget(self, replica_id: str) -> None:
        st = self._replicas.pop(replica_id, None)
        if st is not None:
            metrics.record_replica_forgotten(replica_id, st.spec.pool)
            self._forgotten(replica_id)

    def get(self, replica_id: str) -> ReplicaState | None:
        return self._replicas.get(replica_id)

    def ids(self) -> KeysView[str]:
        """Every replica in the set, removed ones with live leases included (a view: no copy)."""
        return self._replicas.keys()

    def live(self) -> Iterator[ReplicaState]:
        """Replicas in the set (not removed)."""
        return (st for st in self._replicas.values() if not st.removed)

    def assignable(self) -> Iterator[ReplicaState]:
        """Replicas that may take new leases if healthy (not removed, not draining)."""
        return (st for st in self._replicas.values() if not st.removed and not st.draining)

    def known(self, replica_id: str) -> ReplicaState:
        st = self._replicas.get(replica_id)
        if st is None or st.removed:
            raise UnknownReplica(f"no replica {replica_id!r}", field="replica_id")
        return st

    def sync(self, specs: Sequence[ReplicaSpec]) -> Membership:
        """Make the non-registered set equal to `specs`: new replicas start unready until probed;
        vanished ones stop receiving work and are forgotten once their last lease ends.
        Registered replicas are left alone (an id both registered and discovered stays
        registered)."""
        wanted = {s.id: s for s in specs}
        for rid, spec in wanted.items():
            st = self._replicas.get(rid)
            if st is not None and st.registered and not st.removed:
                continue
            if st is None:
                self._add(ReplicaState(spec))
                log.info("replica added", extra={"replica": rid, "address": spec.grpc_address})
            else:
                if st.removed:  # back in the set (not one listed again, as every round does)
                    _back(st)
                st.removed = st.registered = st.draining = False
                if st.spec != spec and st.in_flight == 0:
                    self._respec(st, spec)
        dropped: list[str] = []
        for rid, st in list(self._replicas.items()):
            if rid not in wanted and not st.registered:
                if not st.removed:
                    dropped.append(rid)
                st.removed = True
                if st.in_flight == 0:
                    self._forget(rid)
                    log.info("replica removed", extra={"replica": rid})
        return Membership(tuple(dropped))

    def register(self, spec: ReplicaSpec) -> tuple[ReplicaState, bool]:
        """Add (or confirm) a registered replica; returns it and whether it is new. Registering a
        draining replica again cancels the drain."""
        st = self._replicas.get(spec.id)
        created = st is None or st.removed
        if st is None:
            st = ReplicaState(spec, registered=True)
            self._add(st)
        else:
            if not st.registered and not st.removed:
                raise ReplicaConflict(
                    f"{spec.id!r} is a static or discovered replica", field="replica.id"
                )
            if st.spec != spec:
                if st.in_flight:
                    raise ReplicaConflict(
                        f"replica {spec.id!r} has {st.in_flight} live leases; drain and "
                        "deregister it before changing its spec",
                        field="replica",
                    )
                self._respec(st, spec)
            if st.removed:
                _back(st)
            st.registered, st.removed, st.draining = True, False, False
        if created:
            log.info("replica registered", extra={"replica": spec.id, "address": spec.grpc_address})
        return st, created

    def start_drain(self, replica_id: str) -> tuple[ReplicaState, bool]:
        """Stop new leases on the replica; returns it and whether this call started the drain."""
        st = self.known(replica_id)
        if st.draining:
            return st, False
        st.draining = True
        log.info("replica draining", extra={"replica": replica_id, "in_flight": st.in_flight})
        return st, True

    async def wait_idle(self, st: ReplicaState, wait_s: float) -> None:
        """Wait up to `wait_s` for the replica's leases to end."""
        if st.in_flight > 0 and wait_s > 0:
            idle = self._idle.setdefault(st.spec.id, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(idle.wait(), wait_s)

    def deregister(self, replica_id: str) -> ReplicaState:
        """Forget a registered replica now; its live leases end normally."""
        st = self.known(replica_id)
        if not st.registered:
            raise ReplicaConflict(
                f"{replica_id!r} is a static or discovered replica; it leaves by configuration",
                field="replica_id",
            )
        st.removed = True
        if st.in_flight == 0:
            self._forget(replica_id)
        log.info("replica deregistered", extra={"replica": replica_id, "in_flight": st.in_flight})
        return st

    def acquire(self, st: ReplicaState, granted_at: float) -> None:
        st.set_in_flight(st.in_flight + 1, granted_at)
        bisect.insort(st.lease_starts, granted_at)
        metrics.record_in_flight(st.spec.id, st.spec.pool, st.in_flight)

    def release(self, replica_id: str, granted_at: float, now: float) -> ReplicaState | None:
        """A lease on the replica (granted at `granted_at`) ended at `now`; wakes drain waiters
        at zero. Returns the replica, or None when it was already forgotten."""
        st = self._replicas.get(replica_id)
        if st is None:
            return None
        st.set_in_flight(st.in_flight - 1, now)
        starts = st.lease_starts
        i = bisect.bisect_left(starts, granted_at)
        if i < len(starts) and starts[i] == granted_at:
            del starts[i]
        st.completed += 1
        metrics.record_in_flight(st.spec.id, st.spec.pool, st.in_flight)
        if st.in_flight == 0 and (idle := self._idle.pop(st.spec.id, None)) is not None:
            idle.set()
        return st

    def forget_if_gone(self, st: ReplicaState) -> None:
        if st.removed and st.in_flight == 0:
            self._forget(st.spec.id)


def _back(st: ReplicaState) -> None:
    """A replica that left the set and comes back is probed at the next round: its leases
    from before say nothing of its readiness now (none counts until that round)."""
    st.served_since_round = False
    st.unprobed_rounds = 0
    st.round_at = math.inf
