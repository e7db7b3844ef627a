"""The gateway's Redis clients (the shared rate limiter's, the resume store's), each on a bounded
pool whose calls wait for a free connection.

redis-py's default pool fails a call at once (MaxConnectionsError) while 100 connections are in
use. A burst of admissions, or more than 100 clients following generations of other gateways
(each holds a blocking read), would then read as Redis being down: the limiter's fallback
share, keyed requests refused. Here a call beyond `max_connections` waits for one to be
returned, up to the client's timeout, and fails like an unreachable Redis only then; the
connections a gateway holds stay bounded (Redis's `maxclients` is shared by every gateway).
"""

from __future__ import annotations

import redis.asyncio as aioredis


def client(
    url: str,
    *,
    max_connections: int,
    timeout_s: float,
    read_timeout_s: float | None = None,
    wait_s: float | None = None,
    health_check_interval_s: float = 0,
) -> aioredis.Redis:
    """A client of `url` on its own pool of at most `max_connections`: connecting takes up to
    `timeout_s`, a reply up to `read_timeout_s`, waiting for a free connection up to `wait_s`
    (both default `timeout_s`). Closing the client closes its pool."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s if wait_s is None else wait_s,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s if read_timeout_s is None else read_timeout_s,
        health_check_interval=health_check_interval_s,
    )
    return aioredis.Redis.from_pool(pool)
