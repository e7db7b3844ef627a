"""Tenant rate limits shared by every gateway, in Redis (setting `limits_redis_url`).

Each tenant's request and token buckets (limits.py semantics: capacity one minute's limit,
continuous refill at limit / 60 per second, completion tokens may overdraw) are one Redis hash,
`<prefix>{<tenant>}` with fields r (requests), t (tokens), at (time of the levels). Every change
is one Lua script run atomically by Redis (as Envoy's global rate-limit service keeps its
counters): refill to Redis's own clock (`TIME`, so gateways on different hosts agree), then, at
admission, take one request and the prompt's tokens only if both are there, else return the
wait. The key expires once the buckets would be full again (an absent key is a full bucket),
so Redis holds one small hash per active tenant.

Per request: one script call at admission (timeout `limits_redis_timeout_s`). Completion tokens
and refunds are summed per tenant in process and written every `limits_redis_flush_s` (one
script call per tenant with something to charge), off the per-token path; the tenants file
bounds that table.

Redis unreachable (connection error, timeout, script error): the call answers "unavailable" and
the tenant's local buckets decide (counted: `llmmesh_gateway_rate_limit_redis_errors_total{op}`
per failed call, `llmmesh_gateway_rate_limit_fallback_total{op}` per call the fallback answered),
which hold 1/`limits_gateways` of each limit (limits.py
`TenantLimits(share=...)`); for `limits_redis_retry_s` no request waits on Redis again. This
fails safe: with at most `limits_gateways` gateways all falling back, the local shares admit at
most the tenant's limit (fewer gateways: less), on top of what Redis admitted before it went
down (the local buckets are full then, so in the minute an outage begins a tenant may get up to
twice its limit). It never fails closed (refusing everyone because the limiter is down: a share
below one request lets one through whenever it is full) and never fails open (no limit at
all). Completion tokens go to the tenant's local buckets whenever Redis does not take them:
while the limiter is down at charge time, and when the write of a queued charge fails (the
charges a flush held when Redis went down) or finds the limiter down. Refunds that could not be
written are dropped (the buckets they would fill refill anyway). A write whose answer was lost
(Redis ran it, the reply timed out) is charged locally too: the tenant is over-limited for the
fallback window, never under-charged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.gateway import metrics, redis_pool
from services.gateway.errors import PromptOverTokenLimit, RateLimited
from services.gateway.limits import Clock, LimitState, RateLimitSnapshot

log = logging.getLogger(__name__)

__all__ = ["RedisLimiter", "RedisQuota"]

# KEYS[1]: the tenant's hash. ARGV: requests capacity (0: none), tokens capacity (0: none),
# requests to take, tokens to take, check (1: take only if both are there, else take anyway).
# Reply: {taken (0/1), wait requests s, wait tokens s, requests level, tokens level}; numbers
# as strings (Redis truncates Lua numbers to integers).
_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local rcap = tonumber(ARGV[1])
local tcap = tonumber(ARGV[2])
local nreq = tonumber(ARGV[3])
local ntok = tonumber(ARGV[4])
local check = ARGV[5] == '1'
local v = redis.call('HMGET', KEYS[1], 'r', 't', 'at')
local at = tonumber(v[3]) or now
local dt = math.max(now - at, 0)
local r = tonumber(v[1]) or rcap
local t = tonumber(v[2]) or tcap
if rcap > 0 then r = math.min(rcap, r + dt * rcap / 60) end
if tcap > 0 then t = math.min(tcap, t + dt * tcap / 60) end
local wr = 0
local wt = 0
if check then
  if rcap > 0 and r < nreq then wr = (nreq - r) * 60 / rcap end
  if tcap > 0 and t < ntok then wt = (ntok - t) * 60 / tcap end
end
local taken = 0
if wr <= 0 and wt <= 0 then
  taken = 1
  if rcap > 0 then r = math.min(rcap, r - nreq) end
  if tcap > 0 then t = math.min(tcap, t - ntok) end
end
local ttl = 1
if rcap > 0 then ttl = math.max(ttl, (rcap - r) * 60 / rcap) end
if tcap > 0 then ttl = math.max(ttl, (tcap - t) * 60 / tcap) end
redis.call('HSET', KEYS[1], 'r', tostring(r), 't', tostring(t), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(ttl) + 1)
return {taken, tostring(wr), tostring(wt), tostring(r), tostring(t)}
"""


@dataclass(frozen=True, slots=True)
class _Reply:
    taken: bool
    wait_requests_s: float
    wait_tokens_s: float
    requests: float
    tokens: float


class RedisLimiter:
    """The connection, the script, the fallback state and the background charge writer shared
    by every tenant's `RedisQuota`."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        retry_s: float = 1.0,
        flush_s: float = 0.1,
        prefix: str = "llmmesh:ratelimit:",
        clock: Clock = time.monotonic,
    ):
        self._client = client
        self._script = client.register_script(_SCRIPT)
        self._retry_s = retry_s
        self._flush_s = flush_s
        self._prefix = prefix
        self._clock = clock
        self._down_until = -math.inf
        self._pending: dict[str, _Charge] = {}  # by tenant
        self._flusher: asyncio.Task[None] | None = None
        self._writing: asyncio.Future[None] | None = None  # the flusher's flush in progress
        self.errors = 0  # failed calls (tests, logs)

    @classmethod
    def from_url(
        cls, url: str, *, timeout_s: float, retry_s: float, flush_s: float, max_connections: int
    ) -> RedisLimiter:
        client = redis_pool.client(url, max_connections=max_connections, timeout_s=timeout_s)
        return cls(client, retry_s=retry_s, flush_s=flush_s)

    def quota(
        self, tenant: str, requests_per_minute: int | None, tokens_per_minute: int | None
    ) -> RedisQuota:
        return RedisQuota(self, tenant, requests_per_minute, tokens_per_minute)

    @property
    def available(self) -> bool:
        """False while the last failure is less than `retry_s` old (the fallback decides)."""
        return self._clock() >= self._down_until

    async def _run(
        self, quota: RedisQuota, requests: int, tokens: int, check: bool
    ) -> _Reply | None:
        """One script call (`check`: an admission, else a charge); None when Redis failed (the
        fallback window starts)."""
        try:
            raw = await self._script(
                keys=[f"{self._prefix}{{{quota.tenant}}}"],
                args=[
                    quota.requests_per_minute or 0,
                    quota.tokens_per_minute or 0,
                    requests,
                    tokens,
                    1 if check else 0,
                ],
            )
            reply = _Reply(
                bool(int(raw[0])), float(raw[1]), float(raw[2]), float(raw[3]), float(raw[4])
            )
        except (RedisError, OSError, TimeoutError, ValueError, IndexError, TypeError) as err:
            self.errors += 1
            metrics.record_rate_limit_redis_error("admit" if check else "charge")
            if self.available:
                log.warning(
                    "shared rate limiter unreachable; local fallback share for %.1f s",
                    self._retry_s,
                    extra={"error": f"{type(err).__name__}: {err}"},
                )
            self._down_until = self._clock() + self._retry_s
            return None
        return reply

    async def admit(self, quota: RedisQuota, prompt_tokens: int) -> _Reply | None:
        """The script's answer; None when the local fallback share decides (counted)."""
        reply = await self._run(quota, 1, prompt_tokens, check=True) if self.available else None
        if reply is None:
            metrics.record_rate_limit_fallback("admit")
        return reply

    def charge(self, quota: RedisQuota, requests: int, tokens: int) -> bool:
        """Queue a charge (negative: a refund) for the next write; False while Redis is down
        (the caller charges its local buckets instead; counted)."""
        if not self.available:
            metrics.record_rate_limit_fallback("charge")
            return False
        pending = self._pending.get(quota.tenant)
        if pending is None:
            pending = self._pending[quota.tenant] = _Charge(quota)
        pending.requests += requests
        pending.tokens += tokens
        if tokens > 0:
            pending.charged += tokens
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())
        return True

    async def flush(self) -> None:
        """Write every queued charge now; the completion tokens of one that is not written (the
        write failed, or the limiter is down) go to its tenant's local buckets."""
        pending, self._pending = self._pending, {}
        for c in pending.values():
            if not (c.requests or c.tokens):
                continue
            written = self.available and (
                await self._run(c.quota, c.requests, c.tokens, check=False) is not None
            )
            if written:
                continue
            if c.charged:
                metrics.record_rate_limit_fallback("charge")
                c.quota.unwritten(c.charged)

    async def _flush_loop(self) -> None:
        """Runs while there are charges to write; exits once a period passed with none."""
        while self._pending:
            await asyncio.sleep(self._flush_s)
            # Shielded: stopping the writer mid-flush would lose the batch the flush took.
            self._writing = asyncio.ensure_future(self.flush())
            await asyncio.shield(self._writing)

    async def close(self) -> None:
        """Stop the writer, let a flush in progress end (each write is bounded by the socket
        timeout), write what is queued, close the connection."""
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        if self._writing is not None:
            await self._writing
        await self.flush()
        await self._client.aclose()


@dataclass(slots=True)
class _Charge:
    """What is queued for one tenant: net requests and tokens (refunds negative), and the
    completion tokens among them."""

    quota: RedisQuota
    requests: int = 0
    tokens: int = 0
    charged: int = 0


def _unbound(tokens: int) -> None:
    """A quota no local buckets were bound to (`RedisQuota.fall_back_to`)."""


class RedisQuota:
    """One tenant's shared buckets (limits.SharedQuota)."""

    def __init__(
        self,
        limiter: RedisLimiter,
        tenant: str,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
    ):
        self._limiter = limiter
        self.tenant = tenant
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.unwritten: Callable[[int], None] = _unbound

    def fall_back_to(self, charge: Callable[[int], None]) -> None:
        self.unwritten = charge

    async def admit(self, prompt_tokens: int) -> bool:
        tpm = self.tokens_per_minute
        if tpm is not None and prompt_tokens > tpm:
            raise PromptOverTokenLimit(
                f"tenant {self.tenant!r}: the prompt ({prompt_tokens} tokens) exceeds the "
                f"tokens-per-minute limit of {tpm}"
            )
        reply = await self._limiter.admit(self, prompt_tokens)
        if reply is None:
            return False
        if reply.taken:
            return True
        which = "requests" if reply.wait_requests_s >= reply.wait_tokens_s else "tokens"
        raise RateLimited(
            f"tenant {self.tenant!r}: {which} per minute limit reached",
            limit=which,
            retry_after_s=max(reply.wait_requests_s, reply.wait_tokens_s),
            snapshot=self._snapshot(reply),
        )

    def charge(self, tokens: int) -> bool:
        return self._limiter.charge(self, 0, tokens)

    def refund(self, prompt_tokens: int) -> bool:
        return self._limiter.charge(self, -1, -prompt_tokens)

    def _snapshot(self, reply: _Reply) -> RateLimitSnapshot:
        def state(limit: int | None, level: float) -> LimitState | None:
            if limit is None:
                return None
            rate = limit / 60.0
            return LimitState(limit, max(int(level), 0), max(limit - level, 0.0) / rate)

        return RateLimitSnapshot(
            state(self.requests_per_minute, reply.requests),
            state(self.tokens_per_minute, reply.tokens),
        )
