"""gRPC client channel options shared by every llmmesh client of another llmmesh process or of a
Triton replica (one home: the gateway's channels to orchestrators and replicas, the
orchestrator's readiness probes and registry reads, the engines' registry publishers).

Reconnect: gRPC's default reconnect backoff grows to 120 s, so a peer that was down for a few
seconds (a restarted replica, orchestrator or registry on the same address) would stay unreached
long after it serves again. Every client redials within `MAX_RECONNECT_BACKOFF_MS`.

Keepalive (callers that wait on a peer's answer, e.g. an Admit queued in an orchestrator): a
stopped peer whose kernel still holds the connection answers nothing; an HTTP/2 ping unanswered
within `KEEPALIVE_TIMEOUT_MS` closes the transport and its calls fail UNAVAILABLE, which callers
retry elsewhere. Servers accept pings that often (`llmmesh.common.server.SERVER_OPTIONS`). Behind
an Istio sidecar the ping is answered by the local Envoy, so there a hung peer is caught by its
liveness probe instead.
"""

from __future__ import annotations

from typing import Final

MAX_RECONNECT_BACKOFF_MS: Final = 1000
RECONNECT_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
)

KEEPALIVE_TIME_MS: Final = 2000
KEEPALIVE_TIMEOUT_MS: Final = 2000
KEEPALIVE_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.max_pings_without_data", 0),
)
