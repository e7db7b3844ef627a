"""How long a call waited at its server before the server's handler started on it.

A grpc.aio process that cannot keep up does not queue the calls it has not started where the
service sees them: they wait in gRPC, per connection, before any handler runs (measured with a
saturated orchestrator, `bench-admit` at 1,000 Admit/s: handler starts 0.2-2.2 s after the send,
at most 2 handlers running, the event loop's lag under 1 ms, and a health check on another
connection answered within 15 ms throughout). Nothing in the process itself shows the wait; the
caller says when and with what timeout it sent the call (`call_metadata`), and the handler reads
the wait two ways:

- by the deadline: gRPC starts the server's deadline when the call's headers arrive, at the
  caller's timeout, so `sent timeout - time remaining` is the time used before the handler, on
  the server's clock alone. A proxy that cuts the deadline (Istio sets Envoy's
  `max_grpc_timeout` to the route's timeout and rewrites `grpc-timeout` to it) makes this read
  the cut as waiting, never less than the wait;
- by the wall clock: `server's time - caller's send time`, off by the two hosts' clock offset,
  either way.

The wait is the smaller of the two: a cut deadline is ignored (the wall clock reads the wait),
and a clock offset shows only where the deadline reading is larger too, so either error alone
can only make a wait read shorter, never invent one. Both include the network hop
(sub-millisecond within a cluster). The values are the caller's word: only trusted callers (the
gateways, by the mesh's authorization policy) reach a service that acts on them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Final, cast

TIMEOUT_KEY: Final = "x-llmmesh-timeout-s"  # the timeout the caller gave the call, seconds
SENT_AT_KEY: Final = "x-llmmesh-sent-at"  # the caller's wall clock when it sent it, Unix seconds


def call_metadata(timeout_s: float, wall_now: float) -> tuple[tuple[str, str], ...]:
    """The metadata a caller adds to a call it gives `timeout_s` at wall time `wall_now`."""
    return ((TIMEOUT_KEY, f"{timeout_s:.6f}"), (SENT_AT_KEY, f"{wall_now:.6f}"))


def server_sojourn(
    metadata: Iterable[object] | None, time_remaining: float | None, wall_now: float
) -> float | None:
    """The wait of a call whose handler starts at wall time `wall_now`: the smaller of the
    deadline's and the wall clock's reading, each where the call carries what it needs; None
    for a call that carries neither (or only unreadable values)."""
    sent_timeout = sent_at = None
    for item in metadata or ():
        key, value = cast(tuple[str, str | bytes], item)
        if key == TIMEOUT_KEY:
            sent_timeout = _seconds(value)
        elif key == SENT_AT_KEY:
            sent_at = _seconds(value)
    readings = []
    if sent_timeout is not None and time_remaining is not None:
        readings.append(sent_timeout - time_remaining)
    if sent_at is not None:
        readings.append(wall_now - sent_at)
    return max(min(readings), 0.0) if readings else None


def _seconds(value: str | bytes) -> float | None:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None
