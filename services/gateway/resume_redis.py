"""The idempotency store shared by every gateway, in Redis (setting `resume_redis_url`).

The semantics of `resume.py` (read its docstring), across gateway processes: a retry or a resume
that lands on any gateway attaches to the one generation under its key, and a generation whose
gateway died is continued by the gateway the client comes back through.

Redis layout per key (tenant, request id), under one hash tag (one cluster slot):
- `<prefix>{h}:meta`: hash {digest, gen (generation id), done, created (the wall-clock time the
  key was first opened, Unix seconds: every gateway answers with it), billed (set by a gateway
  that drained and released the generation: the tokens its usage record billed, with the
  prompt), owner (the gateway that claimed it last), rel:<gateway> (that gateway released it),
  logged (events in the log so far)}; exists while the key is known.
- `<prefix>{h}:claim`: the id of the gateway running the generation, with a TTL of `lease_s`
  that its writes renew.
- `<prefix>{h}:log:<gen>`: a Stream, one entry per batch of events (JSON); the last entry holds
  the `Completion`, or the error the generation ended with.
- `<prefix>{h}:watch`: set by gateways that follow the generation from Redis (TTL lease + grace),
  from the attach on and every third of a lease while the client stays (reading or not): a
  client attached elsewhere keeps the running gateway from abandoning the generation.

The gateway that runs a generation (the key was new there, or it took it over) runs it as a
`resume.Generation`; its own clients follow it in process, with no Redis on their path. The
per-token path only appends to that in-process log (bounded by the request's max_tokens); one
flusher task per generation writes what is new as one stream entry every `flush_interval_s`, or
as soon as `flush_tokens` tokens wait, and at the end. Each write is one Lua call that also
renews the claim and the TTLs, fenced by the claim, and appends only the batch's events past
meta's `logged` (a write retried after its answer was lost appends nothing twice); a gateway
that lost its claim to another writes nothing more and ends its clients' streams with
UNAVAILABLE; one whose claim expired with nobody taking it since (Redis away longer than the
lease; meta's `owner` is still this gateway) takes it again with its next write; one whose key
is gone, or holds a newer generation, serves its clients here to the end and writes nothing
more. Gateways of a version that does not record
`owner` (before it) must not share a Redis with this one: a takeover by one of them would read
as no takeover. Other gateways read the stream:
XRANGE for a finished generation, then XREAD BLOCK while it runs.

Offsets: as in resume.py, a resume offset must be the end of a delta. A running generation may
have sent a client more than Redis holds yet, so an offset beyond the tokens logged so far waits
for them rather than failing at once (InvalidRequest when the generation passes it mid-delta or
finishes short of it).

Lifetimes (TTLs, refreshed by every write of the running gateway):
- running: meta and log live `lease_s + grace_s` after the last write, the claim `lease_s`;
- finished: meta and log live `retention_s`, the claim is deleted;
- failed, cancelled or abandoned: meta and claim are deleted at once (a retry starts afresh);
  the log keeps the error entry a few seconds for gateways still following it.
A running generation is abandoned `grace_s` after its last client left, wherever that client
was (followers elsewhere keep `watch` alive while attached and for `grace_s` after).

Takeover: when the claim has expired with no completion written (the gateway was killed, or
lost Redis for longer than the lease), the next gateway the client reaches (a retry, or a
gateway following the generation for it) claims the key atomically and continues it:
`source(prior)` with the deltas in Redis, which is the core's migration continuation (prompt
plus those tokens, the rest of max_tokens, detokenizer and stop matcher restored). Tokens the
dead gateway had sent but not yet written (at most one flush interval's) are generated again:
the same tokens for greedy decoding and for engines whose next token is a function of seed and
context (the emulator); at temperature > 0 on a sampling engine, a client that had received
them sees a continuation that may differ from them. A gateway that drains (SIGTERM) writes
what it has and releases its claims, so another takes over at the client's next retry.
A takeover is not admitted again: the tenant's request and token rates were charged where the
generation began (a drain does not refund them), and its concurrency slot is taken even over
the limit (a refusal would end the generation and lose the client's id). Usage: each gateway's
record bills what the records before it did not: a release writes what they billed (`billed`,
`resume.Billing`); a killed gateway wrote none, so the next bills everything from the prompt
on; a gateway that lost its claim bills nothing (the taker bills from the last release on): a
record is held until the generation's last write answered (`resume.Billing.settle`), so this
holds when its engine finished before the refused write told it so. A drain whose release never
reached Redis, or an end given up on (Redis away past the keys' TTL) when another gateway
continued the generation meanwhile, leaves a taker an older `billed`: what was billed since is
billed twice.

Redis unreachable: a keyed request is refused with UNAVAILABLE and a retry-after. It is never
served unkeyed, and there is no per-process fallback: a retry landing on another gateway would
generate a second time, which is what the client's id is there to prevent. Counted in
`llmmesh_gateway_resume_redis_errors_total{op}` and `..._resume_requests_total{result=
"unavailable"}`, logged. A generation already running keeps serving its clients from memory and
retries its writes (backing off up to a third of the lease) until it ends; its end is given up
on once its keys would have expired.

Bounds: in this process, as resume.py's, over the generations it runs (`ResumeStoreFull` beyond
`max_entries` / `max_tokens`; finished ones are not held in process). In Redis: one entry per
batch, at most max_tokens tokens per generation, a TTL on every key; bound the whole with
`maxmemory` and `maxmemory-policy volatile-lru` (mesh/base/redis.yaml).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import grpc
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from llmmesh.common.errors import Cancelled, NotFound, ServiceError, Unavailable, from_fields
from services.gateway import metrics, redis_pool
from services.gateway.errors import InvalidRequest, RequestIdConflict, ResumeStoreFull
from services.gateway.events import Completion, Delta, Event, FinishReason
from services.gateway.resume import (
    FULL_RETRY_AFTER_S,
    Billing,
    Clock,
    ContinuableSource,
    Generation,
    Key,
    Subscription,
    Takeover,
)
from services.gateway.settings import GatewaySettings

__all__ = ["RedisResumeStore", "decode_batch", "encode_items"]

log = logging.getLogger(__name__)

T = TypeVar("T")

UNAVAILABLE_RETRY_AFTER_S = 1.0
# How long a forgotten generation's log (its error entry) stays for gateways still following it.
ERROR_LOG_TTL_MS = 5000

# KEYS meta, claim. ARGV digest, owner, lease_ms, ttl_ms, has_offset, new_gen, may_create,
# created. Every open of a known key answers with the meta's `created`; a meta without one gets
# this open's, so every gateway answers with the same time from then on.
_OPEN = """
local m = redis.call('HMGET', KEYS[1], 'digest', 'gen', 'done', 'created')
if not m[1] then
  if ARGV[5] == '1' then return {'not_found'} end
  if ARGV[7] ~= '1' then return {'full'} end
  redis.call('DEL', KEYS[1])  -- what a write left of an evicted meta (a `billed`) is not this one's
  redis.call('HSET', KEYS[1], 'digest', ARGV[1], 'gen', ARGV[6], 'done', '0', 'created', ARGV[8],
    'owner', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  return {'new', ARGV[6]}
end
if not m[4] then
  redis.call('HSET', KEYS[1], 'created', ARGV[8])
  m[4] = ARGV[8]
end
return {'exists', m[1], m[2], m[3], redis.call('EXISTS', KEYS[2]), m[4]}
"""

# KEYS meta, claim, log. ARGV owner, lease_ms, ttl_ms, gen. Answers {1, billed} (billed: ''
# when no gateway that ran it billed it) or {0}. Drops meta's `logged`: the taker counts the
# events in the log as it reads them after its claim (a log evicted under its meta holds none).
_TAKEOVER = """
local m = redis.call('HMGET', KEYS[1], 'gen', 'done', 'billed')
if m[1] ~= ARGV[4] or m[2] == '1' then return {0} end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {0} end
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
redis.call('HDEL', KEYS[1], 'logged')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
return {1, m[3] or ''}
"""

# KEYS meta. ARGV gen. Forgets a finished generation whose log is gone (evicted), as one past
# its retention.
_FORGET_FINISHED = """
local m = redis.call('HMGET', KEYS[1], 'gen', 'done')
if m[1] == ARGV[1] and m[2] == '1' then redis.call('DEL', KEYS[1]) end
return 1
"""

# KEYS meta, claim, log, watch. ARGV owner, mode, lease_ms, ttl_ms, retention_ms, error_ttl_ms,
# billed (the completion tokens usage records billed with the prompt, '' for none; kept by a
# release for the gateway taking over), gen, first (the position in the generation of the
# batch's first event), events (how many of the items are events), then the batch's items
# (`encode_items`: its events, then its error). Appends one entry of the items past meta's
# `logged` (events already in the log: a write retried after its answer was lost, possibly
# with more events since, appends each event once) and any error item. It answers
# `_ORPHANED` when the key is gone or holds another generation (nobody continues this one,
# also when this gateway holds the claim: it is the newer generation's). Fenced: only the
# claim's holder writes. Without the claim, it answers `_WRITTEN` for this gateway's own
# release or end already recorded (a retried write whose first answer was lost:
# `rel:<owner>`, `done`); `_TAKEN` when another gateway holds the claim or claimed it since
# (meta's `owner`, set by every claim); and when the claim expired with nobody taking it, the
# write goes on (a `run` write takes the claim again).
_WRITE = """
local mode = ARGV[2]
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[8] then return 2 end
local holder = redis.call('GET', KEYS[2])
if holder ~= ARGV[1] then
  local m = redis.call('HMGET', KEYS[1], 'done', 'owner', 'rel:' .. ARGV[1])
  if mode == 'release' and m[3] then return 1 end
  if holder or m[2] ~= ARGV[1] then return 0 end
  if m[1] == '1' then return 1 end
  if mode == 'run' then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3]) end
end
local first = tonumber(ARGV[9])
local events = tonumber(ARGV[10])
local logged = tonumber(redis.call('HGET', KEYS[1], 'logged') or first)
local skip = math.min(math.max(logged - first, 0), events)
if #ARGV > 10 + skip then
  redis.call('XADD', KEYS[3], '*', 'e', '[' .. table.concat(ARGV, ',', 11 + skip) .. ']')
end
if first + events > logged and mode ~= 'forget' then
  redis.call('HSET', KEYS[1], 'logged', first + events)
end
if mode == 'run' then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
elseif mode == 'done' then
  redis.call('HSET', KEYS[1], 'done', '1')
  redis.call('DEL', KEYS[2], KEYS[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
elseif mode == 'forget' then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[4])
  redis.call('PEXPIRE', KEYS[3], ARGV[6])
else
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'rel:' .. ARGV[1], '1')
  if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'billed', ARGV[7]) end
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
end
return 1
"""


_TAKEN: Final = 0
_WRITTEN: Final = 1
_ORPHANED: Final = 2


# -- stream entries ---------------------------------------------------------------------------
def _item(value: dict[str, Any]) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8", "surrogatepass"
    )


def encode_items(events: Sequence[Event], error: ServiceError | None = None) -> list[bytes]:
    """A stream entry's items, each a JSON value: the events, then the error the generation
    ended with, if any. `_WRITE` appends them as one JSON array (`decode_batch` reads it)."""
    out: list[bytes] = []
    for ev in events:
        if isinstance(ev, Delta):
            fr = None if ev.finish_reason is None else ev.finish_reason.value
            out.append(_item({"d": [ev.text, ev.token_ids, ev.offset, fr]}))
        else:
            out.append(
                _item(
                    {
                        "c": [
                            ev.finish_reason.value,
                            ev.prompt_tokens,
                            ev.completion_tokens,
                            ev.cached_prompt_tokens,
                            ev.queue_ms,
                            ev.ttft_ms,
                            ev.total_ms,
                            ev.mean_itl_ms,
                            ev.replica_id,
                        ]
                    }
                )
            )
    if error is not None:
        reason = "" if error.reason is None else error.reason.value
        out.append(_item({"x": [error.code.name, str(error), reason, error.retry_after_s]}))
    return out


def decode_batch(data: bytes) -> tuple[list[Event], ServiceError | None]:
    events: list[Event] = []
    error: ServiceError | None = None
    for item in json.loads(data.decode("utf-8", "surrogatepass")):
        if "d" in item:
            text, ids, offset, fr = item["d"]
            events.append(Delta(text, ids, offset, None if fr is None else FinishReason(fr)))
        elif "c" in item:
            fr, prompt, completion, cached, queue, ttft, total, itl, replica = item["c"]
            events.append(
                Completion(
                    FinishReason(fr), prompt, completion, cached, queue, ttft, total, itl, replica
                )
            )
        else:
            code, message, *refusal = item["x"]  # (reason, retry-after): newer writers
            if code == "CANCELLED":
                error = Cancelled(message)
            elif code in _PASSED_ON and refusal:
                # The request's own failure (its input, its tenant's limits, its deadline): a
                # follower gets it as the caller there did, not a retry that fails again.
                reason, retry_after_s = refusal
                error = from_fields(grpc.StatusCode[code], message, reason, retry_after_s)
            else:
                error = Unavailable(
                    f"the generation failed on the gateway running it: {message}",
                    retry_after_s=UNAVAILABLE_RETRY_AFTER_S,
                )
    return events, error


# Statuses of a generation's failure that are the request's own, passed on as such to callers
# following it from another gateway; any other reads UNAVAILABLE there (the gateway running it,
# or its replica, failed: a retry may succeed).
_PASSED_ON: Final = frozenset(
    code.name
    for code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.FAILED_PRECONDITION,
    )
)


class _NoRoom(Exception):
    """A takeover that does not fit this gateway's bounds (`RedisResumeStore._try_takeover`)."""


def _tokens(events: Sequence[Event]) -> int:
    return sum(len(e.token_ids) for e in events if isinstance(e, Delta))


@dataclass(frozen=True, slots=True)
class _Keys:
    meta: str
    claim: str
    watch: str
    base: str

    def log(self, gen: str) -> str:
        return f"{self.base}:log:{gen}"


class _Gate:
    """Passes the events after token offset `resume_from`: opens after the delta that ends
    there; a delta that passes it, or the end of the generation before it, is InvalidRequest."""

    __slots__ = ("is_open", "offset")

    def __init__(self, resume_from: int | None):
        self.offset = resume_from or 0
        self.is_open = not resume_from

    def admit(self, ev: Event) -> bool:
        if self.is_open:
            return True
        if isinstance(ev, Delta):
            if ev.end == self.offset:
                self.is_open = True
            elif ev.end > self.offset:
                raise InvalidRequest(
                    f"{self.offset} is not the end of a delta of this generation",
                    field="resume_from",
                )
            return False
        raise InvalidRequest(
            f"{self.offset} is beyond the {ev.completion_tokens} tokens of this generation",
            field="resume_from",
        )


class _Owned(Generation):
    """A generation this gateway runs: its in-process log is what the flusher writes."""

    def __init__(
        self,
        store: RedisResumeStore,
        key: Key,
        keys: _Keys,
        digest: str,
        reserved: int,
        created: float,
        gen_id: str,
        prior: Sequence[Event],
    ):
        super().__init__(store, key, digest, reserved, created)
        self.keys = keys
        self.gen_id = gen_id
        self.events.extend(prior)
        self.tokens = _tokens(prior)
        self.flushed = len(prior)  # events written to Redis
        self.flushed_tokens = self.tokens
        self.pending_since: float | None = None  # monotonic time of the oldest unwritten event
        self.wake = asyncio.Event()
        self.closing = False  # the gateway drains: write what there is, release the claim
        self.billing = Billing()
        self.lost = False  # another gateway holds the claim (or this one was killed)
        self.dropped = False
        self.flusher: asyncio.Task[None] | None = None
        self._rstore = store

    def _notify(self) -> None:
        super()._notify()
        if self.pending_since is None:
            self.pending_since = time.monotonic()
            self.wake.set()  # the flusher now has a batch deadline
        elif self.done or self.tokens - self.flushed_tokens >= self._rstore.flush_tokens:
            self.wake.set()

    def _end(self, error: ServiceError | None) -> None:
        if self.lost and isinstance(error, Cancelled):
            error = Unavailable(
                "another gateway continues this generation; resume with your offset",
                retry_after_s=UNAVAILABLE_RETRY_AFTER_S,
            )
        super()._end(error)

    def _abandon(self) -> None:
        self._grace = None
        if self.subscribers == 0 and not self.done:
            self._rstore._spawn(self._abandon_unless_watched())

    async def _abandon_unless_watched(self) -> None:
        """Abandon it unless a gateway following it from Redis has a client attached (or had,
        within the grace): then look again when that runs out."""
        try:
            ttl_ms = await self._rstore._watch_ttl_ms(self.keys)
        except RedisError:
            metrics.record_resume_redis_error("watch")
            # Redis unreachable from here: no gateway can be following what this one cannot
            # write there, and kept, it would hold its lease and slots with nobody reading.
            ttl_ms = 0
        if self.subscribers or self.done or self._grace is not None:
            return
        if ttl_ms > 0:
            self._grace = asyncio.get_running_loop().call_later(ttl_ms / 1000, self._abandon)
            return
        super()._abandon()


class RedisResumeStore:
    """Keyed generations shared by the gateways through Redis (module docstring)."""

    def __init__(
        self,
        client: aioredis.Redis,
        blocking: aioredis.Redis,
        *,
        retention_s: float,
        grace_s: float,
        max_entries: int,
        max_tokens: int,
        lease_s: float,
        flush_interval_s: float,
        flush_tokens: int,
        prefix: str = "llmmesh:resume:",
        owner: str | None = None,
        wall_clock: Clock = time.time,
    ):
        """`client` for short calls, `blocking` (a longer socket timeout) for XREAD BLOCK;
        `wall_clock` stamps the creation of the generations first opened here."""
        self.retention_s = retention_s
        self.grace_s = grace_s
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self.lease_s = lease_s
        self.flush_interval_s = flush_interval_s
        self.flush_tokens = flush_tokens
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._prefix = prefix
        self._wall_clock = wall_clock
        self._redis = client
        self._blocking = blocking
        self._open = client.register_script(_OPEN)
        self._takeover = client.register_script(_TAKEOVER)
        self._write_script = client.register_script(_WRITE)
        self._forget_finished = client.register_script(_FORGET_FINISHED)
        self._owned: dict[Key, _Owned] = {}
        # Generations whose flusher still runs (their end not yet written), by key.
        self._flushing: dict[Key, _Owned] = {}
        # Every generation whose flusher runs, also one whose key a newer generation took in
        # `_flushing` (drain and kill stop each).
        self._writers: set[_Owned] = set()
        self._tokens = 0
        # Room taken by opens and takeovers still awaiting Redis (`_room`).
        self._held_entries = 0
        self._held_tokens = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def from_settings(cls, s: GatewaySettings, wall_clock: Clock = time.time) -> RedisResumeStore:
        assert s.resume_redis_url is not None
        timeout = s.resume_redis_timeout_s

        def client(read_timeout: float) -> aioredis.Redis:
            return redis_pool.client(
                s.resume_redis_url or "",
                max_connections=s.redis_max_connections,
                timeout_s=timeout,
                read_timeout_s=read_timeout,
                wait_s=read_timeout,
                health_check_interval_s=30,
            )

        return cls(
            client(timeout),
            # One blocking read (up to a third of the lease) per client following a generation
            # of another gateway: past the pool, a follower waits up to a lease for one to end.
            client(timeout + s.resume_redis_lease_s),
            retention_s=s.resume_retention_s,
            grace_s=s.resume_grace_s,
            max_entries=s.resume_max_entries,
            max_tokens=s.resume_max_tokens,
            lease_s=s.resume_redis_lease_s,
            flush_interval_s=s.resume_redis_flush_interval_s,
            flush_tokens=s.resume_redis_flush_tokens,
            wall_clock=wall_clock,
        )

    # -- bookkeeping ------------------------------------------------------------------------
    @property
    def entries(self) -> int:
        """Generations this process runs."""
        return len(self._owned)

    @property
    def tokens(self) -> int:
        """Completion tokens reserved by the generations this process runs."""
        return self._tokens

    def _keys(self, key: Key) -> _Keys:
        raw = f"{key.tenant}\0{key.request_id}".encode("utf-8", "surrogatepass")
        base = f"{self._prefix}{{{hashlib.sha256(raw).hexdigest()[:32]}}}"
        return _Keys(meta=f"{base}:meta", claim=f"{base}:claim", watch=f"{base}:watch", base=base)

    def _ms(self, seconds: float) -> int:
        return max(1, int(seconds * 1000))

    def _running_ttl_ms(self) -> int:
        return self._ms(self.lease_s + self.grace_s)

    def _fits(self, tokens: int) -> bool:
        return (
            len(self._owned) + self._held_entries < self.max_entries
            and self._tokens + self._held_tokens + tokens <= self.max_tokens
        )

    @contextlib.contextmanager
    def _room(self, tokens: int) -> Iterator[bool]:
        """Whether a generation reserving `tokens` fits (`_fits`); if so, its room stays taken
        until the block ends, so the opens awaiting Redis meanwhile cannot all take the same
        room. A generation started within the block (`_start`) holds its own reservation."""
        if not self._fits(tokens):
            yield False
            return
        self._held_entries += 1
        self._held_tokens += tokens
        try:
            yield True
        finally:
            self._held_entries -= 1
            self._held_tokens -= tokens

    def _publish(self) -> None:
        metrics.record_resume_store(len(self._owned), self._tokens)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _unavailable(self, op: str, err: Exception) -> Unavailable:
        metrics.record_resume_redis_error(op)
        metrics.record_resume_request("unavailable")
        log.warning("idempotency store (Redis) unreachable", extra={"op": op, "error": str(err)})
        return Unavailable(
            "the idempotency store is unreachable; retry with the same request id",
            retry_after_s=UNAVAILABLE_RETRY_AFTER_S,
        )

    def _lost_midway(self, op: str) -> Unavailable:
        """Redis failed while a generation was being followed: the client resumes elsewhere."""
        metrics.record_resume_redis_error(op)
        return Unavailable(
            "the idempotency store became unreachable; resume with your offset",
            retry_after_s=UNAVAILABLE_RETRY_AFTER_S,
        )

    async def _or_lost(self, op: str, step: Awaitable[T]) -> T:
        """`step`'s result; a Redis failure is `_lost_midway(op)`."""
        try:
            return await step
        except RedisError as err:
            raise self._lost_midway(op) from err

    async def _gen_state(self, keys: _Keys) -> Any:
        """(generation id, done) of the key and whether a gateway claims it."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hmget(keys.meta, "gen", "done")
            pipe.exists(keys.claim)
            return await pipe.execute()

    # -- Generation's store side ------------------------------------------------------------
    def _ended(self, gen: Generation) -> None:
        if isinstance(gen, _Owned):
            gen.wake.set()  # the flusher writes the end

    def _forget(self, gen: Generation) -> None:
        if isinstance(gen, _Owned):
            self._drop(gen)  # abandoned: the flusher forgets it in Redis once it is cancelled

    def _drop(self, own: _Owned) -> None:
        if own.dropped:
            return
        own.dropped = True
        if self._owned.get(own.key) is own:
            del self._owned[own.key]
        self._tokens -= own.reserved
        self._publish()

    # -- subscribe ----------------------------------------------------------------------------
    async def subscribe(
        self,
        key: Key,
        digest: str,
        resume_from: int | None,
        reserve_tokens: int,
        source: ContinuableSource,
        *,
        again: bool = True,
    ) -> Subscription:
        """`resume.ResumeBackend.subscribe`, across gateways (module docstring). `again`: open
        once more after forgetting a finished generation whose log is gone."""
        ending = self._flushing.get(key)
        if (
            ending is not None
            and not ending.closing
            and (ending.dropped or (ending.done and ending.error is not None))
        ):
            # Failed or abandoned here, its keys not yet forgotten in Redis: a retry starts
            # afresh once they are (as resume.py's), instead of getting that end.
            flusher = ending.flusher
            if flusher is not None:
                await asyncio.wait({flusher}, timeout=self.lease_s)
        own = self._owned.get(key)
        if own is not None:
            return self._attach_local(own, digest, resume_from)
        keys = self._keys(key)
        now = self._wall_clock()  # the creation time if the key is new
        with self._room(reserve_tokens) as fits:
            try:
                r = await self._open(
                    keys=[keys.meta, keys.claim],
                    args=[
                        digest,
                        self.owner,
                        self._ms(self.lease_s),
                        self._running_ttl_ms(),
                        "1" if resume_from else "0",
                        uuid.uuid4().hex,
                        "1" if fits else "0",
                        repr(now),
                    ],
                )
            except RedisError as err:
                raise self._unavailable("open", err) from err
            kind = _s(r[0])
            if kind == "new":
                new = self._start(key, keys, digest, reserve_tokens, now, _s(r[1]), None, source)
                metrics.record_resume_request("new")
                return Subscription(new.follow(0), new.created)
        if kind == "not_found":
            raise _not_found()
        if kind == "full":
            raise self._full()
        stored, gen_id, done, claimed = _s(r[1]), _s(r[2]), _s(r[3]) == "1", int(r[4]) == 1
        created = float(_s(r[5]))
        if not hmac.compare_digest(stored, digest):
            metrics.record_resume_request("conflict")
            raise RequestIdConflict(
                "already used for a different request (model, prompt or sampling differ); "
                "use a new id for a new request",
                field="request_id",
            )
        own = self._owned.get(key)
        if own is not None and own.gen_id == gen_id:  # started here while we asked
            return self._attach_local(own, digest, resume_from)
        try:
            seen, error, last_id = await self._read_log(keys.log(gen_id), "-")
        except RedisError as err:
            raise self._unavailable("open", err) from err
        # A log evicted while its generation ran starts again with the next write: it has
        # lost its start (its first delta is not at offset 0).
        headless = next((ev.offset > 0 for ev in seen if isinstance(ev, Delta)), False)
        if headless and not done:
            raise Unavailable(
                "the stored generation lost its start; resume through the gateway running it, "
                "or retry once it finished",
                retry_after_s=UNAVAILABLE_RETRY_AFTER_S,
            )
        if done and (headless or not any(isinstance(ev, Completion) for ev in seen)):
            # Finished, but its log is gone or lost its start (evicted under Redis' maxmemory
            # policy, or expired since the open): as a generation past its retention, a resume
            # is NOT_FOUND and a plain retry generates again.
            try:
                await self._forget_finished(keys=[keys.meta], args=[gen_id])
            except RedisError as err:
                raise self._unavailable("open", err) from err
            if resume_from or not again:
                raise _not_found()
            return await self.subscribe(
                key, digest, resume_from, reserve_tokens, source, again=False
            )
        gate = _Gate(resume_from)
        ready = [ev for ev in seen if gate.admit(ev)]  # a bad offset fails here, up front
        if done:
            metrics.record_resume_request("replayed")
            if not gate.is_open:
                raise InvalidRequest(
                    f"{gate.offset} is beyond the tokens of this generation", field="resume_from"
                )
            return Subscription(_replay(ready, error), created)
        if not claimed:
            try:
                taken = await self._try_takeover(
                    key, keys, digest, reserve_tokens, created, gen_id, seen, last_id, source
                )
            except _NoRoom:
                raise self._full() from None
            except RedisError as err:
                # A claim won before the failure lapses after `lease_s`: another try takes over.
                raise self._unavailable("takeover", err) from err
            if taken is not None:
                own, index = taken
                metrics.record_resume_request("taken_over")
                return Subscription(self._follow_owned(own, index, gate, ready), created)
        try:
            # Watched from now, not from the follower's first read: its owner's grace may end
            # while the client here takes the replay (`_abandon_unless_watched`).
            await self._redis.set(keys.watch, self.owner, px=self._running_ttl_ms())
        except RedisError as err:
            raise self._unavailable("attach", err) from err
        metrics.record_resume_request("attached")
        return Subscription(
            self._follow_remote(
                key,
                keys,
                digest,
                reserve_tokens,
                created,
                gen_id,
                seen,
                last_id,
                gate,
                ready,
                source,
            ),
            created,
        )

    def _full(self) -> ResumeStoreFull:
        metrics.record_resume_request("full")
        return ResumeStoreFull(
            f"this gateway's idempotency store is full ({len(self._owned)} generations, "
            f"{self._tokens} tokens reserved); retry later, or send no request id",
            retry_after_s=FULL_RETRY_AFTER_S,
        )

    def _attach_local(self, own: _Owned, digest: str, resume_from: int | None) -> Subscription:
        if not hmac.compare_digest(own.digest, digest):
            metrics.record_resume_request("conflict")
            raise RequestIdConflict(
                "already used for a different request (model, prompt or sampling differ); "
                "use a new id for a new request",
                field="request_id",
            )
        metrics.record_resume_request("replayed" if own.done else "attached")
        if resume_from and (resume_from <= own.tokens or own.done):
            # InvalidRequest up front
            return Subscription(own.follow(own.start_index(resume_from)), own.created)
        # Beyond what it produced: a taken-over generation's client may be ahead of it.
        return Subscription(self._follow_owned(own, 0, _Gate(resume_from), []), own.created)

    async def _follow_owned(
        self, own: _Owned, index: int, gate: _Gate, ready: list[Event]
    ) -> AsyncGenerator[Event, None]:
        # A subscriber from the first event on: a client gone while `ready` is written still
        # leaves the generation to its grace (follow() attaches only once it starts).
        own.attach()
        try:
            for ev in ready:
                yield ev
            async with contextlib.aclosing(own.follow(index)) as events:
                async for ev in events:
                    if gate.admit(ev):
                        yield ev
        finally:
            own.detach()

    async def _read_log(
        self, log_key: str, after: str
    ) -> tuple[list[Event], ServiceError | None, str]:
        """The log's events after entry id `after` ("-": all), its error entry, its last id."""
        raw: Any = await self._redis.xrange(log_key, min="-" if after == "-" else f"({after}")
        events: list[Event] = []
        error: ServiceError | None = None
        last = "0-0" if after == "-" else after
        for entry_id, payload in _entries(raw):
            last = entry_id
            evs, err = decode_batch(payload)
            events.extend(evs)
            error = err or error
        return events, error, last

    async def _try_takeover(
        self,
        key: Key,
        keys: _Keys,
        digest: str,
        reserve_tokens: int,
        created: float,
        gen_id: str,
        seen: list[Event],
        last_id: str,
        source: ContinuableSource,
    ) -> tuple[_Owned, int] | None:
        """Claim a generation whose gateway is gone and continue it here; the new generation
        and the log index its follower continues from (after `seen`). None: another gateway
        has it, or it finished. `_NoRoom` when it does not fit this gateway's bounds; the
        room it fits is held from the check to its start."""
        with self._room(reserve_tokens) as fits:
            if not fits:
                raise _NoRoom
            log_key = keys.log(gen_id)
            won = await self._takeover(
                keys=[keys.meta, keys.claim, log_key],
                args=[self.owner, self._ms(self.lease_s), self._running_ttl_ms(), gen_id],
            )
            if int(won[0]) != 1:
                return None
            metrics.record_resume_redis_write()
            billed = _s(won[1])
            # Entries the old owner wrote after `seen` was read (before its claim expired).
            more, _, _ = await self._read_log(log_key, last_id)
            prior = [ev for ev in [*seen, *more] if isinstance(ev, Delta)]
            log.warning(
                "taking over a generation whose gateway is gone",
                extra={"request_id": key.request_id, "tokens": _tokens(prior)},
            )
            takeover = Takeover(prior, int(billed) if billed else None)
            own = self._start(key, keys, digest, reserve_tokens, created, gen_id, takeover, source)
            return own, len(seen)

    def _start(
        self,
        key: Key,
        keys: _Keys,
        digest: str,
        reserve_tokens: int,
        created: float,
        gen_id: str,
        takeover: Takeover | None,
        source: ContinuableSource,
    ) -> _Owned:
        prior = () if takeover is None else takeover.prior
        own = _Owned(self, key, keys, digest, reserve_tokens, created, gen_id, prior)
        own.billing.tokens = None if takeover is None else takeover.billed
        own.billing.deferred = True
        self._owned[key] = own
        self._tokens += reserve_tokens
        self._publish()
        own.start(lambda: source(takeover, own.billing))
        own.flusher = asyncio.get_running_loop().create_task(self._flush(own))
        self._flushing[key] = own
        self._writers.add(own)
        return own

    async def _follow_remote(
        self,
        key: Key,
        keys: _Keys,
        digest: str,
        reserve_tokens: int,
        created: float,
        gen_id: str,
        seen: list[Event],
        last_id: str,
        gate: _Gate,
        ready: list[Event],
        source: ContinuableSource,
    ) -> AsyncGenerator[Event, None]:
        """A generation another gateway runs: what it logged, then XREAD BLOCK; when its
        claim expires without a completion, take it over and follow it here."""
        # Watched while it lives, reading or not (a client taking its events slowly).
        heartbeat = asyncio.get_running_loop().create_task(self._keep_watched(keys.watch))
        try:
            for ev in ready:
                yield ev
                if isinstance(ev, Completion):
                    return
            log_key = keys.log(gen_id)
            block_ms = max(10, self._ms(self.lease_s / 3))
            while True:
                resp: Any = await self._or_lost(
                    "follow", self._blocking.xread({log_key: last_id}, block=block_ms)
                )
                if resp:
                    for _, entries in resp:
                        for entry_id, payload in _entries(entries):
                            last_id = entry_id
                            evs, error = decode_batch(payload)
                            for ev in evs:
                                seen.append(ev)
                                if gate.admit(ev):
                                    yield ev
                                if isinstance(ev, Completion):
                                    return
                            if error is not None:
                                raise error
                    continue
                # Nothing new within the block: is its gateway still there?
                (gen_now, done), claimed = await self._or_lost("follow", self._gen_state(keys))
                if gen_now is None or _s(gen_now) != gen_id:
                    # Forgotten: its error entry, if written, comes with the next read.
                    more, error, _ = await self._or_lost("follow", self._read_log(log_key, last_id))
                    if more or error is not None:
                        continue
                    raise Unavailable(
                        "the generation was lost with its gateway; send the request again",
                        retry_after_s=UNAVAILABLE_RETRY_AFTER_S,
                    )
                if _s(done) == "1":
                    # Its end was written with its last batch: the next read has it, unless the
                    # log is gone (evicted, or expired).
                    more, error, _ = await self._or_lost("follow", self._read_log(log_key, last_id))
                    if more or error is not None:
                        continue
                    raise _not_found()
                if claimed:
                    continue
                takeover = self._try_takeover(
                    key, keys, digest, reserve_tokens, created, gen_id, seen, last_id, source
                )
                try:
                    taken = await self._or_lost("takeover", takeover)
                except _NoRoom:
                    continue  # no room to run it here; another gateway may
                if taken is None:
                    continue
                metrics.record_resume_request("taken_over")
                own, index = taken
                heartbeat.cancel()  # run here now: its own grace applies when the client leaves
                async with contextlib.aclosing(self._follow_owned(own, index, gate, [])) as events:
                    async for ev in events:
                        yield ev
                return
        finally:
            heartbeat.cancel()

    async def _keep_watched(self, watch: str) -> None:
        """Refresh `watch` every third of the lease until cancelled (set at the attach)."""
        while True:
            await asyncio.sleep(self.lease_s / 3)  # the refresh period, not a synchronisation
            try:
                await self._redis.set(watch, self.owner, px=self._running_ttl_ms())
            except RedisError:
                metrics.record_resume_redis_error("watch")  # the follower's reads notice

    # -- writing --------------------------------------------------------------------------------
    async def _write(
        self, own: _Owned, batch: Sequence[Event], mode: str, error: ServiceError | None
    ) -> int:
        """`_WRITTEN`, `_TAKEN` or `_ORPHANED` (`_WRITE`). `batch` is `own.events` from
        `own.flushed` on."""
        keys = own.keys
        done = await self._write_script(
            keys=[keys.meta, keys.claim, keys.log(own.gen_id), keys.watch],
            args=[
                self.owner,
                mode,
                self._ms(self.lease_s),
                self._running_ttl_ms(),
                self._ms(self.retention_s),
                ERROR_LOG_TTL_MS,
                "" if own.billing.tokens is None else own.billing.tokens,
                own.gen_id,
                own.flushed,
                len(batch),
                *encode_items(batch, error),
            ],
        )
        metrics.record_resume_redis_write()
        return int(done)

    async def _flush(self, own: _Owned) -> None:
        """Write `own`'s new events in batches until it ended and its end is written: a batch
        when `flush_tokens` tokens wait or the oldest waited `flush_interval_s`, a bare claim
        renewal when nothing was written for a third of the lease."""
        failing_since: float | None = None
        failures = 0  # writes failed in a row: the retries back off up to `renew_every`
        renew_every = self.lease_s / 3
        last_write = time.monotonic()
        try:
            while True:
                if not own.wake.is_set():
                    wake_at = last_write + renew_every
                    if own.pending_since is not None:
                        wake_at = min(wake_at, own.pending_since + self.flush_interval_s)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.0, wake_at - time.monotonic())):
                            await own.wake.wait()
                own.wake.clear()
                if own.lost:
                    return
                now = time.monotonic()
                done = own.done
                n = len(own.events)
                error: ServiceError | None = None
                if done and own.error is None:
                    mode = "done"
                elif done and own.closing:
                    mode = "release"  # the gateway drains: another one takes over
                elif done:
                    mode, error = "forget", own.error
                else:
                    mode = "run"
                    due = own.tokens - own.flushed_tokens >= self.flush_tokens or (
                        own.pending_since is not None
                        and now - own.pending_since >= self.flush_interval_s
                    )
                    if not due:
                        if now - last_write < renew_every:
                            continue
                        n = own.flushed  # a renewal only: the batch is not due yet
                batch = own.events[own.flushed : n]
                if n == len(own.events):
                    own.pending_since = None  # events from here on start the next batch
                try:
                    written = await self._write(own, batch, mode, error)
                except RedisError as err:
                    metrics.record_resume_redis_error("flush")
                    if own.pending_since is None and len(own.events) > own.flushed:
                        own.pending_since = now
                    if failing_since is None:
                        failing_since = now
                        log.warning(
                            "cannot write a keyed generation to Redis; retrying",
                            extra={"request_id": own.key.request_id, "error": str(err)},
                        )
                    if done and now - failing_since > self.lease_s + self.grace_s:
                        # Its keys have expired there: nothing is left to end. A generation
                        # still running keeps trying (it stays this gateway's: counted in
                        # the bounds, ended by `close`), served from memory meanwhile; once
                        # Redis answers, its write finds the keys gone (`_ORPHANED`) or
                        # another gateway's claim (`_TAKEN`), or takes the claim again.
                        log.error(
                            "gave up writing a keyed generation's end to Redis",
                            extra={"request_id": own.key.request_id},
                        )
                        return
                    failures += 1
                    await asyncio.sleep(
                        min(self.flush_interval_s * 2 ** min(failures - 1, 16), renew_every)
                    )
                    if done:
                        own.wake.set()
                    continue
                failing_since, failures = None, 0
                last_write = time.monotonic()
                own.flushed = n
                own.flushed_tokens += _tokens(batch)
                if written == _TAKEN:
                    # Another gateway took it over: it bills from the last release on, so this
                    # gateway's record bills nothing, also when its engine finished first (the
                    # record waits for this answer: `Billing.settle`).
                    own.billing.superseded = True
                    log.warning(
                        "lost the claim on a keyed generation; another gateway continues it",
                        extra={"request_id": own.key.request_id, "finished_here": done},
                    )
                    if not done:
                        own.lost = True
                        self._drop(own)
                        own.cancel()
                    return
                if written == _ORPHANED:
                    # Its key expired (Redis away longer than its TTL) or holds a newer
                    # generation: nobody continues this one; its clients here are served from
                    # memory, it stays this gateway's until it ends, and its record bills here.
                    log.warning(
                        "a keyed generation's Redis state is gone; served from memory only",
                        extra={"request_id": own.key.request_id, "finished_here": done},
                    )
                    while not own.done:
                        own.wake.clear()
                        await own.wake.wait()
                    return
                if done:
                    return
        finally:
            self._drop(own)
            if self._flushing.get(own.key) is own:
                del self._flushing[own.key]
            self._writers.discard(own)
            # Its record goes out once the end was written, the claim found lost, the end
            # given up on (Redis away past its keys' TTL: billed here, and by a taker too if
            # one continued it), or the flusher stopped (drain, kill).
            own.billing.settle()

    async def _watch_ttl_ms(self, keys: _Keys) -> int:
        return int(await self._redis.pttl(keys.watch))

    # -- lifecycle ------------------------------------------------------------------------------
    async def close(self) -> None:
        """After the fronts drained: end the generations running here, write what they have
        and release their claims (another gateway continues them at the next retry), then
        close the connections. Bounded by the lease when Redis does not answer."""
        owned = list(self._owned.values())
        for own in owned:
            own.closing = True
            own.billing.handing_off = True
        tasks = [t for t in (o.cancel() for o in owned) if t is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        # Every flusher still writing, those of generations already dropped here (abandoned,
        # forgotten) too: each holds its generation's usage record until it ends.
        flushers = [o.flusher for o in self._writers if o.flusher is not None]
        if flushers:
            _, pending = await asyncio.wait(flushers, timeout=self.lease_s)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()
        await self._redis.aclose()
        await self._blocking.aclose()

    async def kill(self) -> None:
        """For tests: stop as a killed process would, writing nothing more to Redis (no last
        batch, no claim released): its claims expire after the lease."""
        owned = list(self._owned.values())  # each has its flusher running: in `_writers`
        # Generations already dropped here whose flusher still writes stop writing too.
        writing = list(self._writers)
        for own in writing:
            own.lost = True
            own.billing.superseded = True  # a killed process writes no usage record
            if own.flusher is not None:
                own.flusher.cancel()
        tasks = [t for t in (o.cancel() for o in owned) if t is not None]
        tasks += [o.flusher for o in writing if o.flusher is not None]
        tasks += list(self._tasks)
        for t in self._tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._redis.aclose()
        await self._blocking.aclose()


def _not_found() -> NotFound:
    metrics.record_resume_request("not_found")
    return NotFound(
        "no generation with this id to resume (finished longer ago than the retention, "
        "evicted, or never started); send the request without a resume offset to generate "
        "again",
        field="resume_from",
    )


async def _replay(events: list[Event], error: ServiceError | None) -> AsyncGenerator[Event, None]:
    for ev in events:
        yield ev
    if error is not None:
        raise error


def _entries(raw: Any) -> list[tuple[str, bytes]]:
    """Stream entries as redis-py returns them (id, {field: value}): (id, batch payload)."""
    return [(_s(entry_id), fields[b"e"]) for entry_id, fields in raw or ()]


def _s(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
