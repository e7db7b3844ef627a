"""Local actuator: Triton replicas as processes on this machine (the local mesh, a dev box).

Scale-up launches `tritonserver` on free ports, waits until Triton reports its models ready, then
registers the replica with every orchestrator (RegisterReplica, repeated until the orchestrators
that answer report their own probe passed). Scale-down cancels replicas still starting first,
then drains the ready one with the fewest leases (DrainReplica on every orchestrator: no new
work, in-flight streams finish), SIGTERMs it, and deregisters it everywhere.

Several orchestrators run active-active and each keeps its own replica set, and a restarted one
knows only its static and discovered replicas: so every `reregister_interval_s` (checked at each
`observe`) the actuator registers each ready replica again with every orchestrator.
RegisterReplica is idempotent; one that did not know the replica logs `created`.

Invariants:
- Every replica is in exactly one phase: starting, ready, stopping (draining or torn down), and
  leaves the pool's list only once its process has exited.
- A replica counts as ready only after the orchestrator reported it routable.
- A failed start is logged, kept as the pool's `last_error`, and retried with backoff; the
  replica stays `starting` meanwhile, so a later scale-down cancels it instead of waiting.
- Every background task is tracked; `close` cancels starts, drains the rest, and waits for all.
- A replica is re-registered only while ready, under its lock; a drain takes the lock after the
  replica left the ready phase, so a re-registration never cancels a drain.
- Pools are reconciled under a per-pool lock, so concurrent `apply` calls never pick the same
  replica twice; a later `apply` supersedes an earlier one.
- Its Triton processes die with the autoscaler process, whatever ends it (SIGKILL included):
  `TritonServer` spawns them with `tied_to_parent`, from the event loop's thread (every launch
  runs in a task on it; never move one to a worker thread, whose exit would kill the replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import itertools
import logging
import tempfile
import time
from collections import deque
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import grpc

from llmmesh.common.topology import PoolKey
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2 as orch_pb
from llmmesh.generated.orchestrator.v1 import orchestrator_pb2_grpc as orch_grpc
from llmmesh.triton.launcher import (
    LOCAL_TRITON_LIVENESS,
    TritonPorts,
    TritonServer,
    start_on_free_ports,
)
from services.autoscaler.actuators.contracts import ReplicaCounts
from services.autoscaler.actuators.liveness import LivenessTracker
from services.autoscaler.actuators.local_settings import LocalActuatorSettings, ManagedPool

log = logging.getLogger(__name__)

# How long a scale-down waits for the orchestrators' lease counts (which only order which ready
# replicas drain first).
_IN_FLIGHT_TIMEOUT_S = 1.0

_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_POLL_S = 0.2  # between RegisterReplica attempts while the orchestrator's probe has not passed
_MAX_BACKOFF_S = 60.0
# A replica that exits within this of becoming ready crashed "quickly": its pool's replacements
# wait, twice as long after each such crash in a row (from `retry_backoff_s`, up to
# `_MAX_BACKOFF_S`); one that stayed up longer is replaced at once.
_STABLE_S = 60.0
_HISTORY = 256  # stopped replicas kept for `replicas()`


class ReplicaPhase(enum.Enum):
    """Where a replica this actuator started is in its process lifecycle (the orchestrator's
    routing view of a replica is its own `ReplicaState`)."""

    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"  # draining, or a cancelled start being torn down
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class ManagedReplica:
    """A snapshot of one replica this actuator started."""

    id: str
    key: PoolKey
    phase: ReplicaPhase
    grpc_address: str  # empty until its Triton process is up
    exit_code: int | None  # set once stopped
    metrics_url: str = ""  # Triton's /metrics; empty until its Triton process is up
    pid: int | None = None  # its tritonserver's, while it runs


class StartFailed(RuntimeError):
    pass


class _Replica:
    def __init__(self, replica_id: str, key: PoolKey, seq: int) -> None:
        self.id = replica_id
        self.key = key
        self.seq = seq
        self.phase = ReplicaPhase.STARTING
        self.server: TritonServer | None = None
        self.registered = False
        self.task: asyncio.Task[None] | None = None
        self.spec: orch_pb.ReplicaSpec | None = None  # as registered
        self.lock = asyncio.Lock()  # a re-registration vs the drain
        self.exit_code: int | None = None
        self.ready_at: float | None = None  # monotonic

    def snapshot(self) -> ManagedReplica:
        return ManagedReplica(
            id=self.id,
            key=self.key,
            phase=self.phase,
            grpc_address=self.server.grpc_address if self.server is not None else "",
            exit_code=self.exit_code,
            metrics_url=self.server.metrics_url if self.server is not None else "",
            pid=self.server.pid if self.server is not None and self.server.is_running else None,
        )


class _Pool:
    def __init__(self, spec: ManagedPool) -> None:
        self.spec = spec
        self.key = PoolKey(spec.pool, spec.model_version)
        self.replicas: list[_Replica] = []
        self.lock = asyncio.Lock()
        self.last_error: str | None = None
        # After quick crashes (`_STABLE_S`): the wait before a replacement's start, and the
        # monotonic time before which none starts.
        self.crash_delay_s = 0.0
        self.start_after = 0.0

    def crashed(self, up_s: float, first_delay_s: float) -> float:
        """A ready replica exited after `up_s` ready: the wait before its replacement starts."""
        if up_s >= _STABLE_S:
            self.crash_delay_s = 0.0
        else:
            self.crash_delay_s = min(max(self.crash_delay_s * 2, first_delay_s), _MAX_BACKOFF_S)
        self.start_after = time.monotonic() + self.crash_delay_s
        return self.crash_delay_s

    def counts(self) -> ReplicaCounts:
        by = [r.phase for r in self.replicas]
        return ReplicaCounts(
            ready=by.count(ReplicaPhase.READY),
            starting=by.count(ReplicaPhase.STARTING),
            draining=by.count(ReplicaPhase.STOPPING),
        )


class LocalActuator:
    TYPE: ClassVar[str] = "local"

    def __init__(self, settings: LocalActuatorSettings) -> None:
        self._settings = settings
        self._pools = {p.key: p for p in (_Pool(spec) for spec in settings.pools)}
        if len(self._pools) != len(settings.pools):
            raise ValueError("pools: each (pool, model_version) may be listed once")
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped: deque[ManagedReplica] = deque(maxlen=_HISTORY)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, orch_grpc.OrchestratorServiceAsyncStub] = {}
        self._last_reregister = time.monotonic()
        self._reregistering: asyncio.Task[None] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._started_initial = False
        self._closed = False
        self._liveness = (
            LivenessTracker(LOCAL_TRITON_LIVENESS, time.monotonic) if settings.liveness else None
        )

    # -- the Actuator contract ------------------------------------------------------------
    async def observe(self) -> Mapping[PoolKey, ReplicaCounts]:
        await self._start_initial()
        for pool in self._pools.values():
            for r in pool.replicas:
                if r.phase is not ReplicaPhase.READY or r.server is None:
                    continue
                if not r.server.is_running:
                    up_s = time.monotonic() - (r.ready_at or time.monotonic())
                    wait = pool.crashed(up_s, self._settings.retry_backoff_s)
                    pool.last_error = (
                        f"{r.id}: exited with {r.server.returncode} after {up_s:.0f} s ready"
                    )
                    log.warning(
                        "replica process exited",
                        extra={"replica": r.id, "up_s": round(up_s, 1), "replace_in_s": wait},
                    )
                    r.phase = ReplicaPhase.STOPPING
                    r.task = self._track(self._lost(pool, r))
                elif self._liveness is not None and self._liveness.due(r.id):
                    self._track(self._probe_liveness(r, r.server, self._liveness))
        self._maybe_reregister()
        return {key: pool.counts() for key, pool in self._pools.items()}

    async def apply(self, key: PoolKey, desired: int, reason: str) -> None:
        pool = self._pools.get(key)
        if pool is None:
            raise ValueError(f"pool {key.pool!r} version {key.model_version!r} is not managed here")
        if self._closed:
            return
        self._started_initial = True  # an explicit count supersedes the initial one
        async with pool.lock:
            await self._reconcile(pool, max(desired, 0), reason)

    async def close(self) -> None:
        self._closed = True
        for pool in self._pools.values():
            async with pool.lock:
                await self._reconcile(pool, 0, "actuator closing")
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in self._channels.values():
            await channel.close(None)
        self._channels, self._stubs = {}, {}
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- introspection ----------------------------------------------------------------------
    def replicas(self) -> list[ManagedReplica]:
        """Every replica this actuator started: live ones, then the most recent stopped ones."""
        live = [r.snapshot() for pool in self._pools.values() for r in pool.replicas]
        return live + list(self._stopped)

    def last_error(self, key: PoolKey) -> str | None:
        """The pool's most recent failed start, cleared by the next successful one."""
        return self._pools[key].last_error

    # -- reconciliation -------------------------------------------------------------------
    async def _start_initial(self) -> None:
        if self._started_initial or self._closed:
            return
        self._started_initial = True
        for pool in self._pools.values():
            if pool.spec.initial_replicas:
                async with pool.lock:
                    await self._reconcile(pool, pool.spec.initial_replicas, "initial replicas")

    async def _reconcile(self, pool: _Pool, desired: int, reason: str) -> None:
        active = [
            r for r in pool.replicas if r.phase in (ReplicaPhase.STARTING, ReplicaPhase.READY)
        ]
        if desired == len(active):
            return
        log.info(
            "scaling pool",
            extra={
                "pool": pool.key.pool,
                "model_version": pool.key.model_version,
                "from": len(active),
                "to": desired,
                "reason": reason,
            },
        )
        if desired > len(active):
            for _ in range(desired - len(active)):
                self._start(pool)
            return
        excess = len(active) - desired
        starting = sorted(
            (r for r in active if r.phase is ReplicaPhase.STARTING), key=lambda r: -r.seq
        )
        for r in starting[:excess]:
            r.phase = ReplicaPhase.STOPPING
            assert r.task is not None
            r.task.cancel()  # its task tears the process down and leaves the pool
            # A task cancelled before it ever ran has no process and never reaches its own
            # `except`: it leaves the pool here (leaving twice is harmless).
            r.task.add_done_callback(functools.partial(self._forget_cancelled, pool, r))
        excess -= min(excess, len(starting))
        if not excess:
            return
        in_flight = await self._in_flight()
        ready = sorted(
            (r for r in active if r.phase is ReplicaPhase.READY),
            key=lambda r: (in_flight.get(r.id, 0), -r.seq),
        )
        for r in ready[:excess]:
            r.phase = ReplicaPhase.STOPPING
            r.task = self._track(self._drain(pool, r))

    def _start(self, pool: _Pool) -> None:
        n = next(self._ids)
        rid = f"{pool.key.pool}-{pool.key.model_version}-{self._settings.replica_id_prefix}-{n}"
        r = _Replica(rid, pool.key, n)
        pool.replicas.append(r)
        r.task = self._track(self._run_start(pool, r))

    def _track(self, coro: Coroutine[object, object, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- one replica's life ---------------------------------------------------------------
    async def _run_start(self, pool: _Pool, r: _Replica) -> None:
        backoff = self._settings.retry_backoff_s
        try:
            wait = pool.start_after - time.monotonic()
            if wait > 0:  # replacing replicas that crashed quickly: not in a loop
                log.info("replica start waits", extra={"replica": r.id, "wait_s": round(wait, 1)})
                await asyncio.sleep(wait)
            while True:
                try:
                    await self._launch(pool, r)
                except (StartFailed, grpc.aio.AioRpcError, OSError) as exc:
                    pool.last_error = f"{r.id}: {exc}"
                    log.warning(
                        "replica start failed; retrying",
                        extra={"replica": r.id, "error": str(exc), "retry_in_s": backoff},
                    )
                    await _uncancellable(self._teardown(r))
                    r.server = None
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _MAX_BACKOFF_S)
                    continue
                pool.last_error = None
                r.phase = ReplicaPhase.READY
                r.ready_at = time.monotonic()
                log.info("replica ready", extra={"replica": r.id})
                return
        except asyncio.CancelledError:
            await _uncancellable(self._teardown(r))
            self._forget(pool, r)
            raise

    async def _launch(self, pool: _Pool, r: _Replica) -> None:
        s = self._settings
        try:
            r.server = await start_on_free_ports(
                lambda: self._triton(pool, r.id),
                attempts=s.port_attempts,
                ready_timeout_s=s.ready_timeout_s,
            )
        except RuntimeError as exc:  # TritonStartError: exited or not ready in time
            raise StartFailed(str(exc)) from exc
        spec = orch_pb.ReplicaSpec(
            id=r.id,
            grpc_address=r.server.grpc_address,
            metrics_url=r.server.metrics_url,
            pool=pool.key.pool,
            model_version=pool.key.model_version,
            models=pool.spec.models,
        )
        r.spec = spec
        # Before the first call: an orchestrator may record it before it answers (or before
        # this task is cancelled, or before another refuses it), and teardown deregisters only
        # a registered replica (NOT_FOUND there is fine).
        r.registered = True
        deadline = time.monotonic() + s.ready_timeout_s
        while True:
            answers = await self._register_everywhere(spec, raise_after=deadline)
            if answers and all(answers):
                return
            if not r.server.is_running:
                raise StartFailed(f"tritonserver exited; log tail:\n{r.server.log_tail()}")
            if time.monotonic() > deadline:
                raise StartFailed(
                    f"the orchestrator did not report it ready within {s.ready_timeout_s:g} s"
                )
            await asyncio.sleep(_POLL_S)

    async def _probe_liveness(
        self, r: _Replica, server: TritonServer, liveness: LivenessTracker
    ) -> None:
        """One liveness probe of a ready replica; kill it after `failure_threshold` failures in
        a row (the next `observe` finds its process gone and replaces it)."""
        reason = ""
        try:
            alive = await server.generate_probe(liveness.probe)
        except Exception as exc:  # a failed probe, whatever the cause (its reason is logged)
            alive, reason = False, str(exc)
        failures = liveness.result(r.id, alive)
        if failures is not None and r.phase is ReplicaPhase.READY and server.is_running:
            log.warning(
                "replica failed its liveness probe: killing it",
                extra={"replica": r.id, "failures": failures, "reason": reason},
            )
            server.kill()

    async def _drain(self, pool: _Pool, r: _Replica) -> None:
        try:
            async with r.lock:  # a re-registration in flight ends first; none starts after
                pass
            if r.registered:
                await self._drain_leases(r)
            await self._teardown(r)
        finally:
            self._forget(pool, r)

    async def _lost(self, pool: _Pool, r: _Replica) -> None:
        """A ready replica whose process died: nothing to drain, deregister it."""
        try:
            await self._teardown(r)
        finally:
            self._forget(pool, r)

    async def _drain_leases(self, r: _Replica) -> None:
        """DrainReplica on every orchestrator until none holds a lease on the replica or
        `drain_timeout_s` passes. An orchestrator that does not know the replica (NOT_FOUND)
        counts as drained; one not reached is asked again until the deadline (leases it granted
        before may still run there)."""
        deadline = time.monotonic() + self._settings.drain_timeout_s

        async def drain_on(address: str, stub: orch_grpc.OrchestratorServiceAsyncStub) -> bool:
            while (left := deadline - time.monotonic()) > 0:
                try:
                    resp = await stub.DrainReplica(
                        orch_pb.DrainReplicaRequest(replica_id=r.id), timeout=left
                    )
                except grpc.aio.AioRpcError as err:
                    if err.code() == grpc.StatusCode.NOT_FOUND:
                        return True
                    log.warning(
                        "drain call failed",
                        extra={"replica": r.id, "orchestrator": address, "error": err.details()},
                    )
                    await asyncio.sleep(min(_POLL_S, max(left, 0.0)))
                    continue
                if resp.drained:
                    return True
            return False

        done = await asyncio.gather(*(drain_on(a, st) for a, st in self._orchestrators()))
        if not all(done):
            log.warning("drain timed out; stopping with leases live", extra={"replica": r.id})

    async def _teardown(self, r: _Replica) -> None:
        """SIGTERM the process (Triton finishes what it runs), then deregister."""
        if r.server is not None:
            r.exit_code = await r.server.stop(grace_s=self._settings.stop_grace_s)
            log.info("replica stopped", extra={"replica": r.id, "exit_code": r.exit_code})
        if r.registered:
            for address, stub in self._orchestrators():
                try:
                    await stub.DeregisterReplica(
                        orch_pb.DeregisterReplicaRequest(replica_id=r.id),
                        timeout=self._settings.rpc_timeout_s,
                    )
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.NOT_FOUND:
                        # It keeps probing the replica and finds it gone; routing never resumes.
                        log.warning(
                            "deregister failed",
                            extra={
                                "replica": r.id,
                                "orchestrator": address,
                                "error": err.details(),
                            },
                        )
            r.registered = False

    def _forget_cancelled(self, pool: _Pool, r: _Replica, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            self._forget(pool, r)

    def _forget(self, pool: _Pool, r: _Replica) -> None:
        if self._liveness is not None:
            self._liveness.forget(r.id)
        r.phase = ReplicaPhase.STOPPED
        if r in pool.replicas:
            pool.replicas.remove(r)
            self._stopped.append(r.snapshot())

    # -- registration with every orchestrator ---------------------------------------------
    async def _register_everywhere(
        self, spec: orch_pb.ReplicaSpec, raise_after: float | None = None
    ) -> list[bool]:
        """RegisterReplica with every orchestrator at once: the `ready` of each that answered
        (none answered: empty). A refusal other than not reached is raised; so is not reached
        by all once `raise_after` (monotonic) has passed."""
        s = self._settings

        async def one(
            address: str, stub: orch_grpc.OrchestratorServiceAsyncStub
        ) -> orch_pb.RegisterReplicaResponse | grpc.aio.AioRpcError:
            try:
                resp = await stub.RegisterReplica(
                    orch_pb.RegisterReplicaRequest(replica=spec), timeout=s.rpc_timeout_s
                )
            except grpc.aio.AioRpcError as err:
                return err
            if resp.created and raise_after is None:
                log.info(
                    "replica registered again with an orchestrator that did not know it",
                    extra={"replica": spec.id, "orchestrator": address},
                )
            return resp

        results = await asyncio.gather(*(one(a, st) for a, st in self._orchestrators()))
        answers: list[bool] = []
        unreached: grpc.aio.AioRpcError | None = None
        for result in results:
            if isinstance(result, grpc.aio.AioRpcError):
                if result.code() not in _RETRYABLE:
                    raise result
                unreached = result
            else:
                answers.append(result.ready)
        if (
            not answers
            and unreached is not None
            and raise_after is not None
            and time.monotonic() > raise_after
        ):
            raise unreached
        return answers

    def _maybe_reregister(self) -> None:
        """Every `reregister_interval_s`: each ready replica registered again everywhere."""
        now = time.monotonic()
        if self._closed or now - self._last_reregister < self._settings.reregister_interval_s:
            return
        if self._reregistering is not None and not self._reregistering.done():
            return
        self._last_reregister = now
        self._reregistering = self._track(self._reregister())

    async def _reregister(self) -> None:
        for pool in self._pools.values():
            for r in list(pool.replicas):
                async with r.lock:
                    if r.phase is not ReplicaPhase.READY or r.spec is None:
                        continue
                    try:
                        await self._register_everywhere(r.spec)
                    except grpc.aio.AioRpcError as err:
                        log.warning(
                            "re-registration refused",
                            extra={"replica": r.id, "error": err.details()},
                        )

    # -- collaborators ----------------------------------------------------------------------
    def _orchestrators(self) -> list[tuple[str, orch_grpc.OrchestratorServiceAsyncStub]]:
        """(address, stub) of every orchestrator, channels opened on first use."""
        s = self._settings
        out = []
        for address in dict.fromkeys(s.orchestrator_addresses or [s.orchestrator_address]):
            stub = self._stubs.get(address)
            if stub is None:
                self._channels[address] = grpc.aio.insecure_channel(address)
                stub = self._stubs[address] = orch_grpc.OrchestratorServiceStub(
                    self._channels[address]
                )
            out.append((address, stub))
        return out

    async def _in_flight(self) -> dict[str, int]:
        """Leases per replica, summed over the orchestrators that answer within
        `_IN_FLIGHT_TIMEOUT_S`, asked at once: the figures only order which ready replicas
        drain first, and `apply` (the autoscaler's round) waits for them."""

        async def one(
            address: str, stub: orch_grpc.OrchestratorServiceAsyncStub
        ) -> orch_pb.ListReplicasResponse | None:
            try:
                return await stub.ListReplicas(
                    orch_pb.ListReplicasRequest(),
                    timeout=min(self._settings.rpc_timeout_s, _IN_FLIGHT_TIMEOUT_S),
                )
            except grpc.aio.AioRpcError as err:
                log.warning(
                    "ListReplicas failed", extra={"orchestrator": address, "error": err.details()}
                )
                return None

        total: dict[str, int] = {}
        for resp in await asyncio.gather(*(one(a, st) for a, st in self._orchestrators())):
            for st in resp.replicas if resp is not None else ():
                total[st.replica.id] = total.get(st.replica.id, 0) + st.in_flight
        return total

    def _log_dir(self) -> Path:
        if self._settings.log_dir is not None:
            self._settings.log_dir.mkdir(parents=True, exist_ok=True)
            return self._settings.log_dir
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="llmmesh-actuator-")
        return Path(self._tmp.name)

    def _triton(self, pool: _Pool, replica_id: str) -> TritonServer:
        s = self._settings
        env = {**s.engine_env, **pool.spec.engine_env, "LLMMESH_EMULATOR_REPLICA_ID": replica_id}
        if s.kv_registry_address:
            env["LLMMESH_EMULATOR_KV_REGISTRY_ADDRESS"] = s.kv_registry_address
        host = s.host
        return TritonServer(
            pool.spec.model_repository,
            TritonPorts.free(host),
            env=env,
            log_path=self._log_dir() / f"{replica_id}.triton.log",
            host=host,
        )


async def _uncancellable(coro: Coroutine[object, object, None]) -> None:
    """Run cleanup to its end even if the caller is cancelled meanwhile (then re-cancel)."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise
