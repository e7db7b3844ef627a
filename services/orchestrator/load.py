"""Live load accounting per replica: the work this orchestrator granted and has not seen end,
current at every decision (the engines' gauges are a scrape old).

Per lease: its replica, its prompt's uncached tokens (the registry's match on that replica at
grant time), its prompt and max tokens. Per replica, a FIFO prefill server on the cost model
(`scheduling/work.py`): a grant's prefill starts when the replica's earlier prefills are done
(`busy_until`) and takes its work, stretched by the decoding batch riding along; its first token
is due then. The orchestrator is not told of first tokens (the gateway reports only completion),
so the first token is this estimate unless `first_token` is called (a simulator, or a future
first-token report, may); at completion the lease leaves whatever its phase.

Invariants:
- Each lease is accounted from `grant` to `complete` (or `drop_replica`), once.
- `busy_until` never lies in the past of the last update and equals the estimated first-token
  time of the replica's last lease still in prefill.
- A lease that ends before its estimated first token gives back its remaining prefill work: the
  later leases' first tokens move earlier by it.

Correction by the engine's gauges (`observe`, once per fresh sample): the engine's `waiting`
requests have not started; when they outnumber the leases this ledger still has in prefill at the
sample's time, the model ran ahead of the engine and the backlog is stretched to cover them at the
mean prefill work of recent grants; requests the engine holds beyond this orchestrator's leases
(other orchestrators') count as decoding sequences of the mean context until the next sample.
The sample's KV use is carried forward by `kv_scale`: the tokens (prompt + max tokens) of the
leases live now over those live when the sample was applied, others' counted at the mean context.

KV admission (`ReplicaLoad.kv_free_tokens`, `kv_return_per_s`): an engine starts a request only
once its whole sequence fits its KV cache (TensorRT-LLM's `guaranteed_no_evict` reserves prompt +
max tokens at admission), so on a replica whose cache the running sequences have reserved, a
request waits for some of them to end however little prefill is queued. The capacity is the
sample's KV blocks (`kv_max`) times the block size; the live leases reserve their uncached prompt
and max tokens each in whole blocks (the match is prorated in tokens: within a block of the
engine's count), plus the cached prefixes they pin, once per prefix (leases by their prompt's
first block): the smallest part of a match the engine's cache held at grant (kv_registry's) among
the prefix's leases. The smallest, because a later lease's registered match also holds the
prompts of earlier live leases once their blocks are registered, which those leases reserve;
prompts that share a first block and part later count the shared part only. Others' requests
reserve the mean prompt + max tokens each. What they reserve comes back at that amount over the
replica's mean lease duration (grant to completion, observed: it holds the decode steps slowed by
the prefills riding along and outputs that end before max tokens, which a step-time model of the
decode would not). Nothing of this enters the FIFO prefill server: a lease that ends gives its
tokens back at once, and no later estimate keeps a wait it no longer has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from services.orchestrator.domain import Clock
from services.orchestrator.scheduling.contracts import ReplicaLoad
from services.orchestrator.scheduling.work import WorkModel

# EWMA weight of the newest value in the means per replica (prefill work, context, reserve
# per grant; lease duration per completion).
_MEAN_ALPHA = 0.1
_NO_LOAD = ReplicaLoad()


def _ewma(mean: float, value: float) -> float:
    """`mean` moved `_MEAN_ALPHA` of the way to `value`; `value` itself while the mean is 0
    (nothing recorded yet)."""
    return mean + (_MEAN_ALPHA if mean else 1.0) * (value - mean)


class Stamps:
    """Every replica's accounting stamps, process-wide: a replica dropped and accounted again
    never repeats a stamp it had, and `last` moves with every change to any replica's."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = 0

    def next(self) -> int:
        self.last += 1
        return self.last


_STAMPS = Stamps()


@dataclass(slots=True)
class _Lease:
    replica: str
    uncached: int
    prompt: int
    max_tokens: int
    held: int  # of its cached prompt tokens, those the engine's cache held at grant
    prefix_key: int | None  # its prompt's first block (leases sharing it share a prefix)
    reserve: int  # KV tokens it reserves beyond its cached prefix (whole blocks)
    work_s: float  # prefill work, stretched by the decode batch at grant time
    granted_at: float
    first_token_at: float
    started_at: float  # when its prefill starts on the FIFO server


@dataclass(slots=True)
class _Replica:
    busy_until: float = 0.0
    leases: dict[str, _Lease] = field(default_factory=dict)  # grant order
    mean_work_s: float = 0.0
    mean_context: float = 0.0
    sample_at: float | None = None  # the engine sample already applied
    others: int = 0  # the engine's requests beyond this orchestrator's leases
    kv_tokens: int = 0  # prompt + max tokens of the live leases
    prompts: int = 0  # prompt tokens of the live leases
    unique_tokens: int = 0  # uncached prompt + max tokens of the live leases
    kv_tokens_at_sample: int = 0
    kv_capacity: int | None = None  # KV tokens of the engine (its last sample's blocks)
    reserved: int = 0  # `reserve` of the live leases
    mean_reserve: float = 0.0  # EWMA of prompt + max tokens per grant (others' requests)
    mean_lease_s: float = 0.0  # EWMA of its leases' durations, grant to completion
    # `load` while the replica holds no lease and its backlog is over: it does not depend on
    # the time then. Reset by every change to the replica's accounting (`changed`).
    idle: ReplicaLoad | None = None
    # The last `load` with leases and when it was estimated: the same answer within one engine
    # step of it (`LoadLedger.resolution_s`). Reset by every change (`changed`).
    recent: ReplicaLoad | None = None
    recent_at: float = 0.0
    # `LoadLedger._kv_admission`'s answer: it does not depend on the time. Reset by every change.
    kv_admission: tuple[int | None, float | None] | None = None
    # Renewed by every change: equal stamps, the same accounting (`LoadLedger.stamp`).
    stamp: int = field(default_factory=_STAMPS.next)

    def changed(self) -> None:
        """The accounting changed: no earlier `load` answer stands."""
        self.idle = self.recent = self.kv_admission = None
        self.stamp = _STAMPS.next()


class LoadLedger:
    def __init__(self, clock: Clock, work: WorkModel, kv_block_size: int | None = None) -> None:
        """`kv_block_size`: tokens per KV block of the engines (None: KV admission is not
        modelled)."""
        self._clock = clock
        self._work = work
        self._kv_block_size = kv_block_size
        # How long a load estimate stands while nothing is granted, completed or observed on
        # its replica: one engine step at the least (the step's fixed cost, the weights pass).
        # An engine's state moves a step at a time, and a decision then costs one estimate per
        # changed replica rather than one per replica.
        self.resolution_s = work.fixed_step_s
        self._replicas: dict[str, _Replica] = {}
        self._leases: dict[str, _Lease] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def grant(
        self,
        lease_id: str,
        replica_id: str,
        prompt_tokens: int,
        cached_tokens: int,
        max_tokens: int,
        *,
        held_tokens: int | None = None,
        prefix_key: int | None = None,
    ) -> None:
        """`held_tokens`: of the cached tokens, those the engine's cache held at grant (the
        rest is live leases' prompts; default: all); `prefix_key`: the prompt's first block."""
        now = self._clock()
        rep = self._replica(replica_id)
        rep.changed()
        cached = max(0, min(cached_tokens, prompt_tokens - 1))
        uncached = prompt_tokens - cached
        held = cached if held_tokens is None else max(0, min(held_tokens, cached))
        reserve = uncached + max_tokens
        bs = self._kv_block_size
        if bs is not None:
            reserve = -(-reserve // bs) * bs
        seqs, ctx = self._decoding(rep, now)
        work = self._work.prefill_work_s(uncached, cached) * self._work.decode_slowdown(seqs, ctx)
        start = max(now, rep.busy_until)
        lease = _Lease(
            replica_id,
            uncached,
            prompt_tokens,
            max_tokens,
            held,
            prefix_key,
            reserve,
            work,
            now,
            start + work,
            start,
        )
        rep.busy_until = lease.first_token_at
        rep.leases[lease_id] = lease
        rep.kv_tokens += prompt_tokens + max_tokens
        rep.prompts += prompt_tokens
        rep.unique_tokens += uncached + max_tokens
        rep.reserved += reserve
        self._leases[lease_id] = lease
        rep.mean_work_s = _ewma(rep.mean_work_s, work)
        rep.mean_reserve = _ewma(rep.mean_reserve, prompt_tokens + max_tokens)
        rep.mean_context = _ewma(rep.mean_context, prompt_tokens + max_tokens / 2)

    def _replica(self, replica_id: str) -> _Replica:
        rep = self._replicas.get(replica_id)
        if rep is None:
            rep = self._replicas[replica_id] = _Replica()
        return rep

    def first_token(self, lease_id: str) -> None:
        """The lease's first token was seen now: it decodes from now on."""
        lease = self._leases.get(lease_id)
        if lease is None:
            return
        now = self._clock()
        rep = self._replicas[lease.replica]
        rep.changed()
        if lease.first_token_at > now:
            self._shift_after(rep, lease, lease.first_token_at - now, now)
        lease.first_token_at = now

    def saved_s(self, replica_id: str, prompt_tokens: int, cached_tokens: int) -> float:
        """Engine seconds a prompt's `cached_tokens` save on the replica now: the prefill work
        of the whole prompt less that of its uncached part (as `grant` would add it)."""
        cached = max(0, min(cached_tokens, prompt_tokens - 1))
        if cached == 0:
            return 0.0
        rep = self._replicas.get(replica_id)  # a query: no entry for a replica unknown
        seqs, ctx = (0, 0) if rep is None else self._decoding(rep, self._clock())
        saved = self._work.prefill_work_s(prompt_tokens, 0) - self._work.prefill_work_s(
            prompt_tokens - cached, cached
        )
        return max(0.0, saved) * self._work.decode_slowdown(seqs, ctx)

    def complete(self, lease_id: str) -> None:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        rep = self._replicas[lease.replica]
        rep.changed()
        now = self._clock()
        if lease.first_token_at > now:
            left = lease.first_token_at - max(now, lease.started_at)
            self._shift_after(rep, lease, min(left, lease.work_s), now)
        del rep.leases[lease_id]
        rep.mean_lease_s = _ewma(rep.mean_lease_s, max(0.0, now - lease.granted_at))
        rep.kv_tokens -= lease.prompt + lease.max_tokens
        rep.prompts -= lease.prompt
        rep.unique_tokens -= lease.uncached + lease.max_tokens
        rep.reserved -= lease.reserve

    def _shift_after(self, rep: _Replica, lease: _Lease, by_s: float, now: float) -> None:
        """Move the first tokens of the leases granted after `lease` (still in prefill) `by_s`
        earlier, and the backlog's end with them."""
        after = False
        for other in rep.leases.values():
            if other is lease:
                after = True
            elif after and other.first_token_at > now:
                other.first_token_at = max(now, other.first_token_at - by_s)
                other.started_at = max(now, other.started_at - by_s)
        rep.busy_until = max(now, rep.busy_until - by_s)

    def unique_share(self, replica_id: str) -> float:
        """The share of the replica's live leased tokens (prompt + max tokens) that are not
        cached prefix (the registry's match at grant time); 1 without leases."""
        rep = self._replicas.get(replica_id)
        if rep is None or rep.kv_tokens <= 0:
            return 1.0
        return rep.unique_tokens / rep.kv_tokens

    def drop_replica(self, replica_id: str) -> None:
        rep = self._replicas.pop(replica_id, None)
        if rep is not None:
            for lid in rep.leases:
                self._leases.pop(lid, None)

    def observe(
        self,
        replica_id: str,
        active: float,
        waiting: float,
        own_at_sample: int,
        sample_at: float,
        kv_max_blocks: float | None = None,
    ) -> None:
        """Apply an engine sample once (see the module docstring)."""
        rep = self._replica(replica_id)
        if rep.sample_at == sample_at:
            return
        rep.changed()
        rep.sample_at = sample_at
        bs = self._kv_block_size
        if bs is not None and kv_max_blocks is not None and kv_max_blocks > 0:
            rep.kv_capacity = round(kv_max_blocks * bs)
        rep.others = max(0, round(active + waiting) - own_at_sample)
        rep.kv_tokens_at_sample = rep.kv_tokens
        own_waiting = sum(1 for x in rep.leases.values() if x.started_at > sample_at)
        behind = round(waiting) - own_waiting - rep.others
        if behind > 0 and rep.mean_work_s > 0:
            floor = sample_at + behind * rep.mean_work_s
            if floor > rep.busy_until:
                stretch = floor - rep.busy_until
                for x in rep.leases.values():
                    if x.first_token_at > sample_at:
                        x.first_token_at += stretch
                rep.busy_until = floor

    def _decoding(self, rep: _Replica, now: float) -> tuple[int, int]:
        seqs, ctx = 0, 0
        step = None
        for x in rep.leases.values():
            if x.first_token_at <= now:
                if step is None:
                    step = max(self._work.decode_step_s(len(rep.leases), self._context(rep)), 1e-4)
                generated = min(x.max_tokens, int((now - x.first_token_at) / step))
                seqs += 1
                ctx += x.prompt + generated
        extra = rep.others
        return seqs + extra, ctx + round(extra * rep.mean_context)

    def _context(self, rep: _Replica) -> int:
        return rep.prompts + round(rep.others * rep.mean_context)

    def load(self, replica_id: str) -> ReplicaLoad:
        rep = self._replicas.get(replica_id)
        if rep is None:
            return _NO_LOAD
        now = self._clock()
        if not rep.leases and rep.busy_until <= now:
            if rep.idle is None:
                rep.idle, rep.recent = self._load(rep, now), None
            return rep.idle
        recent = rep.recent
        if recent is not None and 0.0 <= now - rep.recent_at < self.resolution_s:
            return recent
        rep.recent, rep.recent_at = self._load(rep, now), now
        return rep.recent

    def stamp(self, replica_id: str) -> int:
        """Equal for two calls between which the replica's accounting did not change (no grant,
        first token, completion, sample or drop): its `load` then differs only by the time."""
        rep = self._replicas.get(replica_id)
        return -1 if rep is None else rep.stamp

    @property
    def stamps(self) -> Stamps:
        """Its `last` moves with every change to a replica's accounting (a grant, a first
        token, a completion, an engine sample applied, a replica first accounted), in any
        ledger of the process: equal twice, no accounting changed between."""
        return _STAMPS

    def stands_until(self, replica_id: str) -> float:
        """Until when, with its accounting unchanged (`stamp`), the replica's `load` answers the
        same object (infinity for an answer that does not depend on the time: an idle replica's,
        or none yet)."""
        rep = self._replicas.get(replica_id)
        if rep is None or rep.recent is None:
            return math.inf
        return rep.recent_at + self.resolution_s

    def estimated_for_s(self, replica_id: str) -> float:
        """How much longer the replica's last timed `load` answer stands unchanged (0 when none
        does; an idle replica's answer does not change with time, and it has no backlog to wake
        for): a timer set from that answer fires no earlier, or it would read the same answer."""
        until = self.stands_until(replica_id)
        return 0.0 if until == math.inf else max(0.0, until - self._clock())

    def _load(self, rep: _Replica, now: float) -> ReplicaLoad:
        prefill = 0.0
        for x in rep.leases.values():
            if x.first_token_at > now:
                if x.started_at >= now or x.work_s <= 0:
                    prefill += x.uncached
                else:
                    prefill += x.uncached * min(1.0, (x.first_token_at - now) / x.work_s)
        seqs, ctx = self._decoding(rep, now)
        others = rep.others * rep.mean_context
        then = rep.kv_tokens_at_sample + others
        if rep.kv_admission is None:
            rep.kv_admission = self._kv_admission(rep)
        free, rate = rep.kv_admission
        return ReplicaLoad(
            prefill_tokens=round(prefill),
            prefill_s=max(0.0, rep.busy_until - now),
            decode_seqs=seqs,
            decode_tokens=ctx,
            kv_scale=(rep.kv_tokens + others) / then if then > 0 else 1.0,
            kv_free_tokens=free,
            kv_return_per_s=rate,
        )

    def _kv_admission(self, rep: _Replica) -> tuple[int | None, float | None]:
        """(KV tokens free for a further request now, tokens the live leases give back per
        second); see the module docstring."""
        capacity = rep.kv_capacity
        if capacity is None:
            return None, None
        pinned: dict[object, int] = {}  # per prefix: the cache's part every lease of it holds
        for lid, x in rep.leases.items():
            key = lid if x.prefix_key is None else x.prefix_key
            pinned[key] = min(pinned.get(key, x.held), x.held)
        reserved = rep.reserved + sum(pinned.values()) + round(rep.others * rep.mean_reserve)
        rate = reserved / rep.mean_lease_s if reserved > 0 and rep.mean_lease_s > 0 else None
        return capacity - reserved, rate
