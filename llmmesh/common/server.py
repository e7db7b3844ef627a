"""Canonical grpc.aio server lifecycle shared by every service.

start: register servicers, health (SERVING for "" and each service name) and reflection (both
`grpc.reflection.v1` and `v1alpha`, see `llmmesh.common.reflection`), bind.
stop (SIGTERM/SIGINT): health NOT_SERVING first so balancers stop sending, then `server.stop`
with a grace period so in-flight RPCs (token streams included) finish, then the service's own
shutdown hook.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmmesh.common.channels import KEEPALIVE_TIME_MS
from llmmesh.common.reflection import enable_server_reflection

log = logging.getLogger(__name__)

# Generous message size: prompt token ids for long contexts travel in Admit/Lookup.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Clients ping as often as `llmmesh.common.channels.KEEPALIVE_TIME_MS` on calls without data:
# accepted, and never answered with GOAWAY for pinging.
SERVER_KEEPALIVE_TIME_MS = 20_000
SERVER_KEEPALIVE_TIMEOUT_MS = 10_000
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
    # The server pings its peers too: a client lost without a reset (its node gone) ends its
    # calls within ~30 s (e.g. an orchestrator then releases a dead gateway's leases).
    ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
)


# gRPC core's bound on a call's wait for the application to take it (whole seconds; 30 unset).
MAX_UNACCEPTED_OPTION: Final = "grpc.server_max_unrequested_time_in_server"


@dataclass(frozen=True)
class ServiceRegistration:
    """One gRPC service: its full name (for health and reflection) and how to add it."""

    full_name: str
    add_to_server: Callable[[grpc.aio.Server], None]


class ManagedServer:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        services: Sequence[ServiceRegistration],
        drain_seconds: float,
        max_receive_bytes: int = MAX_MESSAGE_BYTES,
        max_unaccepted_s: float | None = None,
    ) -> None:
        """`max_receive_bytes`: the largest request message; a larger one is refused with
        RESOURCE_EXHAUSTED before it is parsed (a public port sets it to what a request may
        need; internal ports carry long prompts' token ids).

        `max_unaccepted_s` (whole seconds, rounded up; None: gRPC's default): how long a call
        may wait in gRPC for this server's event loop to take it; gRPC ends one still untaken
        then CANCELLED, unseen by the service (no refusal, no retry-after). grpc.aio takes one
        call per turn or two of the loop, so a loop busy relaying streams takes a burst's calls
        slowly. The public port sets it to the longest deadline it allows, so such a call is
        taken and admitted or refused like any other, or ends at its own deadline (one with
        none waits up to the bound). Internal ports keep the default: their callers set short
        deadlines, and a call dropped so is a shed signal the gateway acts on
        (`services.gateway.orchestrator_client.admission_error`)."""
        self._host = host
        self._requested_port = port
        self._services = services
        self._drain_seconds = drain_seconds
        options = dict(SERVER_OPTIONS) | {"grpc.max_receive_message_length": max_receive_bytes}
        if max_unaccepted_s is not None:
            options[MAX_UNACCEPTED_OPTION] = max(1, math.ceil(max_unaccepted_s))
        self._server = grpc.aio.server(options=tuple(options.items()))
        self._health = health_aio.HealthServicer()
        self.port = 0

    async def start(self) -> int:
        for svc in self._services:
            svc.add_to_server(self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        names = [s.full_name for s in self._services]
        enable_server_reflection(
            (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), self._server
        )
        self.port = self._server.add_insecure_port(f"{self._host}:{self._requested_port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind {self._host}:{self._requested_port}")
        await self._server.start()
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def _set_all(
        self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        await self._health.set("", status)
        for svc in self._services:
            await self._health.set(svc.full_name, status)

    async def stop(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.stop(self._drain_seconds)

    async def stop_now(self) -> None:
        """Cancel every call still running and wait for their handlers (a `stop` in progress
        ends with it)."""
        await self._server.stop(None)

    async def wait(self) -> None:
        await self._server.wait_for_termination()


# A signal this soon after the first repeats it (a terminal's Ctrl-C reaches the whole process
# group, and a supervisor forwards it too): only a later one cuts the drain short.
REPEAT_SIGNAL_S = 1.0
# After a second signal has cut the calls, how long the drains may take to finish their cleanup.
HURRIED_CLEANUP_S = 5.0


async def run_until_signal(
    server: ManagedServer,
    *,
    service: str,
    metrics_port: int,
    ready_file: Path | None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    extra_ports: Mapping[str, int] | None = None,
    drain_with: Sequence[Callable[[], Awaitable[None]]] = (),
    hurry_with: Sequence[Callable[[], Awaitable[None]]] = (),
) -> None:
    """Run a started server until SIGTERM/SIGINT, then drain and stop.

    `extra_ports` (e.g. an HTTP front's) join the ready file and the log; `drain_with` are other
    fronts' stop functions, drained in parallel with the gRPC server before `on_stop` runs. A
    drain that fails is logged and the others go on; `on_stop` runs however the drain ended. A
    second signal during the drain (one at least `REPEAT_SIGNAL_S` after the first: a terminal's
    Ctrl-C and a supervisor's forward of it are one request) ends it at once: the gRPC calls
    still running are cancelled and their handlers end, and so do the other fronts' (each
    `hurry_with`: cancel what is running and wait for it), then `on_stop` runs.

    Before it reports ready, everything the service built at startup (modules, protobuf
    descriptors, tokenizers, settings, the core) moves to the collector's permanent generation
    (`gc.freeze`): a full collection then walks only what requests allocate, instead of the
    whole startup heap each time (it was 7% of the gateway's CPU under load, py-spy --native).
    A startup object that later becomes cyclic garbage is never collected: they are built once."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:  # before anything slow: a signal from now on drains
        loop.add_signal_handler(sig, stop_requested.set)
    try:
        gc.collect()
        gc.freeze()
        ports = {"grpc_port": server.port, **(extra_ports or {}), "metrics_port": metrics_port}
        if ready_file is not None:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(ports))
            tmp.replace(ready_file)
        log.info("serving", extra=ports)
        await stop_requested.wait()
        log.info("draining", extra={"service": service})
        again = asyncio.Event()
        first_at = loop.time()

        def repeated() -> None:
            if loop.time() - first_at >= REPEAT_SIGNAL_S:
                again.set()

        for sig in signals:
            loop.add_signal_handler(sig, repeated)
        drains: list[asyncio.Future[object]] = [
            asyncio.ensure_future(d) for d in (server.stop(), *(stop() for stop in drain_with))
        ]
        hurry: asyncio.Future[object] = asyncio.ensure_future(again.wait())
        pending: set[asyncio.Future[object]] = set(drains)
        try:
            while pending and not again.is_set():
                _, left = await asyncio.wait({*pending, hurry}, return_when=asyncio.FIRST_COMPLETED)
                pending = left - {hurry}
            if pending:
                log.warning("second signal: drain cut short", extra={"service": service})
                hurried = await asyncio.gather(
                    server.stop_now(), *(now() for now in hurry_with), return_exceptions=True
                )
                for failed in hurried:
                    if isinstance(failed, Exception):
                        log.error("cutting a drain short failed", exc_info=failed)
                # With nothing left to wait for, the drains end their own cleanup (closing
                # idle connections) unless that hangs.
                await asyncio.wait(pending, timeout=HURRIED_CLEANUP_S)
        finally:  # also when this task is cancelled: nothing left running unawaited
            hurry.cancel()
            for d in drains:
                if not d.done():
                    d.cancel()
            results = await asyncio.gather(*drains, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.error("a drain failed", exc_info=result)
        if on_stop is not None:
            await on_stop()
        log.info("stopped")
    finally:  # the loop's signals as they were (a test's loop runs on)
        for sig in signals:
            loop.remove_signal_handler(sig)
