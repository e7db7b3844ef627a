"""The registry: which replica holds which KV-cache blocks, exact or predicted.

It composes two `PrefixIndex`es and answers every lookup from both:
- `exact.ExactIndex`: replicas that publish KV events (`ingest`);
- `predicted.PredictedIndex`: replicas that publish nothing; the orchestrator's routing decisions
  (`record_routing`) become predicted entries, corrected by what the engine reports per request
  (`report_reuse`).
A replica is predicted until its event stream is first in sync, then exact: its predictions
are dropped and later ones ignored. So after a registry restart, predictions answer for a replica
until the engine's snapshot (requested through the sequence gap) arrives. A new epoch makes it
predicted again.

Invariants:
- every replica either index knows is in `replica_ids()`, and has entries in at most one index
  (the exact one exactly when `ExactIndex.is_exact`);
- `entries + garbage_entries <= max_entries` after every call: garbage is swept first, then the
  fullest replica's oldest blocks are dropped (first-stored order for exact replicas, least
  recently routed for predicted ones).

Requests are validated here; the indexes trust their arguments.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import xxhash

from llmmesh.common.errors import InvalidArgument
from llmmesh.kvblocks import BlockConfig, epoch_precedes, hashes_from_bytes, token_bytes
from services.kv_registry.contracts import (
    Cleared,
    Event,
    ExactChange,
    IngestResult,
    LookupResult,
    PrefixIndex,
    Ranked,
    ReuseResult,
    RoutingResult,
    Source,
)
from services.kv_registry.errors import BatchTooLarge, BlockConfigMismatch, SupersededEpoch
from services.kv_registry.exact import ExactIndex
from services.kv_registry.metrics import EvictionReason, RegistryMetrics, ReplicaMetrics
from services.kv_registry.predicted import PredictedIndex
from services.kv_registry.settings import KvRegistrySettings

log = logging.getLogger(__name__)

# Dropped replica ids remembered against late reuse reports (`KvRegistry._dropped`).
DROPPED_KEPT = 4096
# The largest uint64: no event may carry it (the sequence after it is answered back).
LAST_SEQUENCE = 2**64 - 1


def level_plan(counts: Sequence[tuple[str, int]], over: int) -> list[tuple[str, int]]:
    """Blocks each replica gives up so that `over` go, the fullest first, down to a common
    level: the counts that evicting one block at a time from whichever replica holds the most
    (ties: the first in `counts`) would leave, in one pass. `counts`: (replica, blocks) in
    first-seen order; returns (replica, blocks to evict) for the replicas that give any."""
    if over <= 0:
        return []
    order = sorted(range(len(counts)), key=lambda i: -counts[i][1])  # stable: first seen first
    total = k = 0
    for k in range(1, len(order) + 1):  # the fullest k come down to the next one's count
        total += counts[order[k - 1]][1]
        below = counts[order[k]][1] if k < len(order) else 0
        if total - k * below >= over:
            break
    else:
        return [(rid, n) for rid, n in counts if n > 0]  # fewer blocks than `over`: all go
    # The k fullest end at `level`, the last `extra` of them (first-seen order) one above it:
    # one at a time, the level's last round takes from the first seen.
    level, extra = divmod(total - over, k)
    group = sorted(order[:k])
    plan = []
    for j, i in enumerate(group):
        rid, n = counts[i]
        give = n - level - (1 if j >= k - extra else 0)
        if give > 0:
            plan.append((rid, give))
    return plan


class KvRegistry:
    def __init__(
        self,
        settings: KvRegistrySettings,
        block_config: BlockConfig,
        *,
        clock: Callable[[], float],
        metrics: RegistryMetrics,
    ) -> None:
        """`clock` (seconds, monotonic) times lookups and predicted entries' TTLs."""
        self.block_config = block_config
        self._max_entries = settings.max_entries
        self._max_events = settings.max_events_per_request
        self._max_blocks = settings.max_blocks_per_request
        self._max_prompt_blocks = settings.max_prompt_blocks
        self._silence_s = settings.exact_silence_s
        # A kept engine lifetime heard from within this refuses one that started before it
        # (three of the engines' default 5 s heartbeats; exact_silence_s is 60 s by default).
        self._superseded_s = settings.exact_silence_s / 4
        # When each replica last published (events or a heartbeat), and when silent ones were
        # last looked for (`maintain`, every tenth of the silence bound).
        self._heard: dict[str, float] = {}
        self._silence_checked = -math.inf
        # Since when no replica was heard within the bound, as seen by checks that ran on
        # time (None: one was heard, or a check came late).
        self._all_silent_since: float | None = None
        # Until when each predicted replica may hold entries (its last routing or report plus
        # the longest TTL it was given): one that nothing routed to or reported on since is
        # forgotten (`_drop_idle`), where a lost DropReplica would leave it listed for good.
        self._active_until: dict[str, float] = {}
        self._idle_checked = -math.inf
        self._clock = clock
        self._metrics = metrics
        self.exact = ExactIndex(metrics)
        self.predicted = PredictedIndex(
            ttl_s=settings.predicted_ttl_s,
            capacity=settings.predicted_capacity,
            shrink=settings.predicted_shrink,
            clock=clock,
            metrics=metrics,
        )
        self._indexes: tuple[PrefixIndex, ...] = (self.exact, self.predicted)
        self._replicas: dict[str, ReplicaMetrics] = {}  # known replicas, first seen first
        # Replicas dropped and not seen since (the newest DROPPED_KEPT): a reuse report that
        # comes after the drop (a lease that outlived its replica's removal) does not bring one
        # back, where it would stay for good (nothing drops it again), nor its metrics' series.
        self._dropped: OrderedDict[str, None] = OrderedDict()
        # xxh3-128 of a prompt's token bytes -> its block hashes: a client that sends the same
        # prompt as token ids to Lookup, RecordRouting and ReportReuse has it hashed once (the
        # orchestrator sends block hashes). Bounded by prompts and by the hashes they hold.
        self._hash_cache: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self._hash_cache_size = settings.hash_cache_size
        self._hash_cache_blocks = settings.hash_cache_blocks
        self._cached_blocks = 0
        self._on_changes: Callable[[list[ExactChange]], None] | None = None

    # -- watching the exact index -----------------------------------------------------------
    def on_exact_changes(self, listener: Callable[[list[ExactChange]], None] | None) -> None:
        """Call `listener` after each call that changed what exact replicas hold, with those
        changes in order (None: stop; nothing is collected while nobody listens)."""
        self._on_changes = listener
        self.exact.changes = None if listener is None else []

    def exact_replicas(self) -> list[str]:
        """Replicas in the exact index now."""
        return self.exact.exact_replicas()

    def exact_snapshot(self, replica_id: str) -> list[ExactChange]:
        """One replica's entry in the exact index now, as changes that rebuild it from nothing
        (none when it is not exact)."""
        return self.exact.snapshot(replica_id)

    def _changed(self) -> None:
        changes = self.exact.changes
        if changes and self._on_changes is not None:
            self.exact.changes = []
            self._on_changes(changes)  # must not raise: the call that changed the index succeeded

    # -- hashing ----------------------------------------------------------------------------
    def check_prompt(self, tokens: int, blocks: int) -> None:
        """A prompt given as `tokens` token ids or `blocks` block hashes is within
        max_prompt_blocks, or InvalidArgument."""
        most = self._max_prompt_blocks
        if blocks > most:
            raise InvalidArgument(
                f"{blocks} block hashes exceed max_prompt_blocks={most}", field="block_hashes"
            )
        if tokens // self.block_config.block_size > most:
            raise InvalidArgument(
                f"{tokens} tokens exceed max_prompt_blocks={most} blocks of "
                f"{self.block_config.block_size}",
                field="token_ids",
            )

    def hash_tokens(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        """The prompt's full-block hashes (llmmesh.kvblocks identity), cached per prompt."""
        body = token_bytes(token_ids)
        key = _xxh3_128(body)
        cache = self._hash_cache
        hashes = cache.get(key)
        if hashes is None:
            hashes = tuple(hashes_from_bytes(body, self.block_config))
            if self._hash_cache_size and len(hashes) <= self._hash_cache_blocks:
                cache[key] = hashes
                self._cached_blocks += len(hashes)
                while len(cache) > self._hash_cache_size or (
                    self._cached_blocks > self._hash_cache_blocks
                ):
                    self._cached_blocks -= len(cache.popitem(last=False)[1])
        else:
            cache.move_to_end(key)
        return hashes

    # -- exact mode -------------------------------------------------------------------------
    def ingest(
        self,
        replica_id: str,
        epoch: str,
        block_config: BlockConfig,
        events: Sequence[Event],
        next_sequence: int | None = None,
    ) -> IngestResult:
        if not replica_id:
            raise BlockConfigMismatch("must be non-empty", field="replica_id")
        if block_config != self.block_config:
            raise BlockConfigMismatch(
                f"engine publishes block_size={block_config.block_size} "
                f"hash_seed={block_config.hash_seed}, registry uses "
                f"block_size={self.block_config.block_size} hash_seed={self.block_config.hash_seed}",
                field="block_size",
            )
        self.check_batch(len(events))
        blocks = sum(len(ev.block_hashes) for ev in events if not isinstance(ev, Cleared))
        if blocks > self._max_blocks:
            raise BatchTooLarge(
                f"{blocks} block hashes > max_blocks_per_request={self._max_blocks}",
                field="events",
            )
        if any(ev.sequence >= LAST_SEQUENCE for ev in events):
            # Its successor (the next expected sequence, answered back) would not fit a uint64.
            raise InvalidArgument(f"a sequence must be below {LAST_SEQUENCE}", field="events")
        current = self.exact.epoch_of(replica_id)
        if (
            current is not None
            and epoch_precedes(epoch, current)
            and self._clock() - self._heard.get(replica_id, -math.inf) < self._superseded_s
        ):
            # Checked before it is heard from: a refused lifetime does not keep the kept one
            # alive. The kept one silent for `_superseded_s` (a dead engine whose start read
            # later, its host's clock ahead or stepped back since) no longer holds it off.
            raise SupersededEpoch(
                f"{epoch!r} started before {current!r}, the engine lifetime kept for "
                f"{replica_id!r}",
                field="epoch",
            )
        replica = self._replicas.get(replica_id) or self._add_replica(replica_id)
        self._heard[replica_id] = self._clock()
        applied = self.exact.ingest(replica_id, epoch, events, next_sequence)
        if applied.mode_changed:
            if self.exact.is_exact(replica_id):
                self.predicted.drop(replica_id)  # predictions give way to the engine's account
                replica.mode(Source.EXACT, 0)
            else:
                replica.mode(Source.PREDICTED, self.predicted.max_capacity)
        self._enforce_bound()
        self._housekeeping(applied.work)
        self._changed()
        return applied.result

    def check_batch(self, events: int) -> None:
        """A batch of `events` events is refused (BatchTooLarge) beyond max_events_per_request:
        the servicer asks before it converts them."""
        if events > self._max_events:
            raise BatchTooLarge(f"{events} events > {self._max_events}", field="events")

    # -- approximate mode -------------------------------------------------------------------
    def record_routing(
        self, replica_id: str, hashes: Sequence[int], *, ttl_s: float | None = None
    ) -> RoutingResult:
        """The orchestrator routed a prompt (its full-block hashes) to `replica_id`. For a
        predicted replica the blocks become predicted entries (TTL, capacity-bounded LRU);
        an exact replica records nothing. Returns the prior belief (`predicted_blocks`)."""
        if not replica_id:
            raise InvalidArgument("must be non-empty", field="replica_id")
        ttl = self.predicted.ttl_s if ttl_s is None else ttl_s
        if not 0 < ttl < math.inf:
            raise InvalidArgument(f"must be positive and finite, got {ttl_s}", field="ttl_s")
        if replica_id not in self._replicas:
            self._add_replica(replica_id)
        if self.exact.is_exact(replica_id):
            self._metrics.routing(replica_id, Source.EXACT)
            matched = self.exact.matched(replica_id, hashes)
            return RoutingResult(len(hashes), matched, Source.EXACT, 0)
        self._metrics.routing(replica_id, Source.PREDICTED)
        self._touch(replica_id, ttl)
        result = self.predicted.record(replica_id, hashes, ttl)
        self._enforce_bound()
        self._housekeeping(len(hashes))
        self._changed()  # the bound may have evicted exact entries
        return result

    def report_reuse(
        self,
        replica_id: str,
        hashes: Sequence[int],
        reported_reused_blocks: int,
        *,
        prompt_tokens: int | None = None,
        predicted_blocks: int | None = None,
    ) -> ReuseResult:
        """The engine reused `reported_reused_blocks` leading blocks of this prompt (reported on
        completion). Counts predicted vs reported; for a predicted replica, corrects the model
        (`PredictedIndex.correct`: its capacity, and the prompt's entries refreshed when
        `hashes` are given). `predicted_blocks` defaults to the current belief."""
        if not replica_id:
            raise InvalidArgument("must be non-empty", field="replica_id")
        if reported_reused_blocks < 0:
            raise InvalidArgument("must not be negative", field="reported_reused_blocks")
        # Without the prompt's hashes the belief cannot be read: the caller gives it, unless
        # the prompt holds no block that could be reused (a prompt shorter than one block).
        if not hashes and (
            prompt_tokens is None
            or (predicted_blocks is None and (prompt_tokens - 1) // self.block_config.block_size)
        ):
            raise InvalidArgument(
                "without the prompt, set prompt_tokens and predicted_blocks", field="block_hashes"
            )
        reusable = len(hashes)
        if prompt_tokens is not None:
            cap = max(0, (prompt_tokens - 1) // self.block_config.block_size)
            # No hashes: the report is counted from the prompt's length (an exact replica's
            # report needs nothing else; an approximate one's capacity is still corrected).
            reusable = min(reusable, cap) if hashes else cap
        exact = self.exact.is_exact(replica_id)
        if predicted_blocks is None:
            index = self.exact if exact else self.predicted
            predicted_blocks = index.matched(replica_id, hashes)
        p = min(predicted_blocks, reusable)
        r = min(reported_reused_blocks, reusable)
        source = Source.EXACT if exact else Source.PREDICTED
        if replica_id in self._dropped:  # applied to nothing, counted for no replica
            return ReuseResult(reusable, p, r, source, 0, 0)
        self._metrics.reuse(replica_id, source, reusable, p, r, min(p, r))
        if exact:
            return ReuseResult(reusable, p, r, Source.EXACT, 0, 0)
        if replica_id not in self._replicas:
            self._add_replica(replica_id)  # learnt from the report (e.g. after a restart)
        capacity, dropped = self.predicted.correct(replica_id, hashes, p, r)
        self._touch(replica_id, self.predicted.ttl_of(replica_id))
        self._enforce_bound()
        self._housekeeping(len(hashes))
        self._changed()  # the bound may have evicted exact entries
        return ReuseResult(reusable, p, r, Source.PREDICTED, capacity, dropped)

    # -- both modes -------------------------------------------------------------------------
    def drop_replica(self, replica_id: str) -> bool:
        """Forget a replica that disappeared or failed health. If its engine still publishes,
        its next batch (events, or a heartbeat) shows a gap and it is asked for a snapshot."""
        self._heard.pop(replica_id, None)
        # Remembered even when unknown here (a registry that restarted, or missed updates):
        # its leases' late reports must not bring it in either.
        self._dropped[replica_id] = None
        self._dropped.move_to_end(replica_id)
        if len(self._dropped) > DROPPED_KEPT:
            self._dropped.popitem(last=False)
        return self._forget(replica_id)

    def _forget(self, replica_id: str) -> bool:
        """The replica's entries, series and slot gone; False when it was not known."""
        replica = self._replicas.pop(replica_id, None)
        self._active_until.pop(replica_id, None)
        if replica is None:
            return False
        for index in self._indexes:
            index.drop(replica_id)
        replica.forgotten()
        self._housekeeping(0)
        self._changed()
        return True

    def lookup(self, token_ids: Sequence[int]) -> LookupResult:
        start = self._clock()
        result = self._lookup(self.hash_tokens(token_ids))
        self._metrics.lookup(self._clock() - start)
        return result

    def lookup_hashes(self, hashes: Sequence[int]) -> LookupResult:
        start = self._clock()
        result = self._lookup(hashes)
        self._metrics.lookup(self._clock() - start)
        return result

    def _lookup(self, hashes: Sequence[int]) -> LookupResult:
        n = len(hashes)
        if n == 0:
            return LookupResult(0, ())
        ranked: list[Ranked] = []
        self.exact.find_matches(hashes, ranked)
        self.predicted.find_matches(hashes, ranked)
        if not ranked:
            return LookupResult(n, ())
        ranked.sort()
        return LookupResult(n, tuple([r[2] for r in ranked]))

    def maintain(self, budget: int) -> int:
        """Background step (the servicer runs it periodically): sweep retired slots, compact
        exact logs, expire predictions. Returns the work done; 0 means idle."""
        done = self._sweep(budget)
        if done < budget:
            done += self.exact.compact(budget - done)
        self._drop_silent()
        done += self.predicted.maintain(budget - done)
        self._drop_idle()
        return done

    def _touch(self, replica_id: str, ttl_s: float) -> None:
        until = self._clock() + ttl_s
        if until > self._active_until.get(replica_id, -math.inf):
            self._active_until[replica_id] = until

    def _drop_idle(self) -> None:
        """Drop the predicted replicas nothing was routed to nor reported on for longer than
        their predictions live: they hold nothing (every entry expired) and their orchestrators
        no longer route there (a DropReplica lost, or sent to a registry that restarted). One
        routed to again is added again (not kept out like one dropped by DropReplica)."""
        now = self._clock()
        if now - self._idle_checked < self.predicted.ttl_s / 10 or not self._active_until:
            return
        self._idle_checked = now
        idle = [rid for rid, until in self._active_until.items() if until < now]
        for rid in idle:
            del self._active_until[rid]
            if self.exact.is_exact(rid) or rid in self._heard:
                continue  # its engine publishes: `_drop_silent` watches it
            log.info("predicted replica idle: forgotten", extra={"replica": rid})
            self._forget(rid)  # not kept out as dropped: its next routing brings it back

    def _drop_silent(self) -> None:
        """Drop the replicas that published (events or heartbeats) and then nothing for
        `exact_silence_s`: an engine that died after its orchestrators dropped it (a
        terminating pod publishes until it exits), or whose orchestrators are gone, would
        otherwise be listed for ever. When no replica was heard within the bound, this process
        may have been away (a stall: their calls are still queued), not every engine: they are
        dropped only once checks that ran on time (every tenth of the bound, none more than
        half the bound after the one before) found none heard for a further bound."""
        now = self._clock()
        if now - self._silence_checked < self._silence_s / 10 or not self._heard:
            return
        late = now - self._silence_checked > self._silence_s / 2
        self._silence_checked = now
        if now - max(self._heard.values()) > self._silence_s:
            if late or self._all_silent_since is None:
                self._all_silent_since = now
            if now - self._all_silent_since <= self._silence_s:
                return
        else:
            self._all_silent_since = None
        silent = [rid for rid, heard in self._heard.items() if now - heard > self._silence_s]
        for rid in silent:
            log.warning(
                "replica silent: dropped as gone",
                extra={"replica": rid, "silent_s": round(now - self._heard[rid], 1)},
            )
            self.drop_replica(rid)

    # -- bookkeeping ------------------------------------------------------------------------
    def _add_replica(self, replica_id: str) -> ReplicaMetrics:
        self._dropped.pop(replica_id, None)
        replica = self._replicas[replica_id] = self._metrics.replica(replica_id)
        replica.mode(Source.PREDICTED, self.predicted.max_capacity)
        return replica

    def _sweep(self, budget: int) -> int:
        done = 0
        for index in self._indexes:
            if done >= budget:
                break
            done += index.sweep(budget - done)
        return done

    def _housekeeping(self, work: int) -> None:
        """Amortized in every write: about twice the work the caller just did, on garbage and
        log compaction. (Predictions expire in the write that touches their replica, and in
        `maintain`.)"""
        exact = self.exact
        if exact.has_garbage or exact.compacting or self.predicted.has_garbage:
            budget = 2 * work + 256
            done = self._sweep(budget)
            if done < budget:
                exact.compact(budget - done)

    def _enforce_bound(self) -> None:
        exact, predicted = self.exact, self.predicted
        over = (
            exact.entries
            + predicted.entries
            + exact.garbage_entries
            + predicted.garbage_entries
            - self._max_entries
        )
        while over > 0 and (exact.has_garbage or predicted.has_garbage):
            self._sweep(max(over, 1024))
            over = self.entries + self.garbage_entries - self._max_entries
        if over > 0:
            counts = [(rid, self.block_count(rid)) for rid in self._replicas]
            for rid, n in level_plan(counts, over):
                evicted = self._evict(rid, n)
                self._metrics.evicted(EvictionReason.BOUND, evicted)
                over -= evicted
        while over > 0:  # what an index could not give as planned, a block at a time
            count = self.block_count
            ranked = sorted(self._replicas, key=count, reverse=True)[:2]
            top = count(ranked[0]) if ranked else 0
            if top == 0:
                break
            second = count(ranked[1]) if len(ranked) > 1 else 0
            evicted = self._evict(ranked[0], min(over, top - second + 1))
            self._metrics.evicted(EvictionReason.BOUND, evicted)
            over -= evicted

    def _evict(self, replica_id: str, n: int) -> int:
        for index in self._indexes:
            evicted = index.evict(replica_id, n)
            if evicted:
                return evicted
        return 0

    # -- introspection ----------------------------------------------------------------------
    def replica_ids(self) -> Iterable[str]:
        return self._replicas.keys()

    def block_count(self, replica_id: str) -> int:
        return self.exact.block_count(replica_id) + self.predicted.block_count(replica_id)

    def source(self, replica_id: str) -> Source | None:
        """The replica's mode, None when unknown."""
        if replica_id not in self._replicas:
            return None
        return Source.EXACT if self.exact.is_exact(replica_id) else Source.PREDICTED

    def predicted_capacity(self, replica_id: str) -> int:
        """The replica's adaptive capacity; 0 for an exact or unknown replica."""
        if replica_id not in self._replicas or self.exact.is_exact(replica_id):
            return 0
        return self.predicted.capacity(replica_id)

    @property
    def entries(self) -> int:
        """Live (block, replica) pairs."""
        return self.exact.entries + self.predicted.entries

    @property
    def garbage_entries(self) -> int:
        """Pairs of cleared or dropped replicas still to be swept (they count toward the bound)."""
        return self.exact.garbage_entries + self.predicted.garbage_entries

    @property
    def unique_blocks(self) -> int:
        """Index keys, summed over both indexes (a block both index hold counts twice)."""
        return self.exact.unique_blocks + self.predicted.unique_blocks


_xxh3_128 = xxhash.xxh3_128_intdigest
