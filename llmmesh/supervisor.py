"""Restart dead child processes with exponential backoff, as a kubelet restarts containers.

A `Supervisor` watches named units. A unit is two coroutines: `wait()` returns when its process
exits (with the exit status), `restart()` starts it again and returns once it is ready (raising
when it cannot). When a unit exits while the supervisor runs, the supervisor waits the backoff
delay, restarts it, and watches it again; a failed restart counts as another failure.

The backoff policy (`RestartPolicy`, applied by `Backoff`):
- the first restart after `initial_backoff_s`, each further one `multiplier` times later, at most
  `max_backoff_s`;
- a unit that stayed up `reset_after_s` is healthy again: its next failure starts from the
  initial delay;
- more than `max_quick_failures` failures in a row, each before the unit stayed up
  `reset_after_s` (a crash loop), and the supervisor gives up on it: logged as an error and kept
  in `given_up`, the unit stays down.

Liveness (as a kubelet's livenessProbe): a unit watched with a `Liveness` is probed every
`period_s` from the moment it is watched, i.e. once it was ready (`watch()` takes a running,
ready unit and `restart()` returns once it is ready again: a unit still starting is never probed,
like a startupProbe); only `failure_threshold` failed probes in a row count, a success resets
them, except a failure of one of the `Liveness.fatal` exception types: an answer that says the
unit is dead for good (it does not heal) kills it at the first probe. Then the supervisor kills
the unit (`Liveness.kill`) and restarts it as any other exit, with the backoff; the restart's
reason ("liveness probe failed N times: <last error>", or "liveness probe found it dead:
<error>") is logged and kept in its `RestartEvent`. The check bounds its own duration (its timeout): the supervisor
does not time it, so a slow but successful check of a busy unit is a success.

Exits the supervisor caused itself do not count: `close()` (before a graceful shutdown) stops
every watch first. Clock and sleep are injected, so the policy is tested on a virtual clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class RestartPolicy:
    """How dead children are restarted (see the module docstring)."""

    initial_backoff_s: float = 0.1
    multiplier: float = 2.0
    max_backoff_s: float = 30.0
    reset_after_s: float = 60.0
    max_quick_failures: int = 5

    def __post_init__(self) -> None:
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("need 0 <= initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1:
            raise ValueError("multiplier must be >= 1")
        if self.reset_after_s <= 0 or self.max_quick_failures < 1:
            raise ValueError("need reset_after_s > 0 and max_quick_failures >= 1")


class Backoff:
    """The restart policy's state for one unit: `started()` when it came up, `failed()` when it
    went down (or could not be started); `failed()` returns the delay before the next start, or
    None once the unit is in a crash loop."""

    def __init__(self, policy: RestartPolicy, clock: Clock) -> None:
        self._policy = policy
        self._clock = clock
        self._started_at = clock()
        self.failures = 0  # in a row, each before the unit stayed up reset_after_s

    def started(self) -> None:
        self._started_at = self._clock()

    def failed(self) -> float | None:
        p = self._policy
        if self._clock() - self._started_at >= p.reset_after_s:
            self.failures = 0
        self.failures += 1
        # A failure ends the "up" period; a failed restart is a failure right at its start.
        self._started_at = self._clock()
        if self.failures > p.max_quick_failures:
            return None
        return min(p.initial_backoff_s * p.multiplier ** (self.failures - 1), p.max_backoff_s)


@dataclass(frozen=True)
class Liveness:
    """A unit's liveness probe (see the module docstring). `alive()` returns True when the unit
    is alive; False or an exception (its message is the error logged) is a failed probe; it must
    bound its own duration. `kill()` ends the unit, so that its `wait()` returns."""

    alive: Callable[[], Awaitable[bool]]
    kill: Callable[[], Awaitable[None]]
    period_s: float
    failure_threshold: int
    # Failures that say the unit is dead for good: one kills it, whatever `failure_threshold`.
    fatal: tuple[type[Exception], ...] = ()

    def __post_init__(self) -> None:
        if self.period_s <= 0 or self.failure_threshold < 1:
            raise ValueError("need period_s > 0 and failure_threshold >= 1")


@dataclass
class _Unit:
    name: str
    wait: Callable[[], Awaitable[int | None]]
    restart: Callable[[], Awaitable[None]]
    backoff: Backoff
    liveness: Liveness | None = None
    task: asyncio.Task[None] | None = None
    restarts: int = 0


@dataclass
class RestartEvent:
    """One completed restart: the unit, its exit status, how long it was down (exit seen, or
    liveness kill, to ready again), and why the supervisor killed it (None: it exited)."""

    name: str
    exit_code: int | None
    down_s: float
    reason: str | None = None


@dataclass
class Supervisor:
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    clock: Clock = time.monotonic
    sleep: Sleep = asyncio.sleep
    _units: dict[str, _Unit] = field(default_factory=dict)
    #: Units the supervisor gave up on (crash loop) -> why.
    given_up: dict[str, str] = field(default_factory=dict)
    #: Every completed restart, oldest first.
    history: list[RestartEvent] = field(default_factory=list)
    _closed: bool = False

    def watch(
        self,
        name: str,
        wait: Callable[[], Awaitable[int | None]],
        restart: Callable[[], Awaitable[None]],
        liveness: Liveness | None = None,
    ) -> None:
        """Supervise a running, ready unit from now on (a unit of that name is replaced), and
        probe its liveness if given; nothing once the supervisor is halted (the mesh is
        stopping)."""
        if self._closed:
            return
        old = self._units.pop(name, None)
        if old is not None and old.task is not None:
            old.task.cancel()
        unit = _Unit(name, wait, restart, Backoff(self.policy, self.clock), liveness)
        unit.task = asyncio.get_running_loop().create_task(
            self._run(unit), name=f"supervise {name}"
        )
        self._units[name] = unit
        self.given_up.pop(name, None)

    def unwatch(self, name: str) -> None:
        """Stop supervising `name` (it keeps running; it stays down if it exits): a unit a
        test means to leave dead. A restart in progress is cancelled."""
        unit = self._units.pop(name, None)
        if unit is not None and unit.task is not None:
            unit.task.cancel()

    def restarts(self, name: str) -> int:
        unit = self._units.get(name)
        return unit.restarts if unit is not None else 0

    def halt(self) -> None:
        """Stop supervising at once (children keep running); safe in a signal handler, before the
        children themselves see the signal (Ctrl-C reaches the whole process group)."""
        self._closed = True
        for u in self._units.values():
            # Once: a second cancel would cut short the cleanup the first one started (a
            # restart tearing its half-started child down).
            if u.task is not None and not u.task.cancelling():
                u.task.cancel()

    async def close(self) -> None:
        """Stop supervising (children keep running): call before stopping them on purpose. A
        restart in progress is cancelled; its half-started unit is the restart's to clean up."""
        self.halt()
        tasks = [u.task for u in self._units.values() if u.task is not None]
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _run(self, unit: _Unit) -> None:
        while True:
            try:
                code, reason = await self._wait_or_kill(unit)
            except Exception as exc:  # nothing to watch (never started): a bug, not a crash
                self.given_up[unit.name] = f"cannot watch it: {exc!r}"
                log.error("cannot watch %s: %r", unit.name, exc, extra={"child": unit.name})
                return
            down_at = self.clock()
            log.warning(
                "%s %s (status %s); restarting it",
                unit.name,
                "exited" if reason is None else f"killed: {reason}",
                code,
                extra={"child": unit.name, "exit_code": code, "reason": reason},
            )
            while True:
                delay = unit.backoff.failed()
                if delay is None:
                    why = (
                        f"{unit.backoff.failures} failures in a row, each within "
                        f"{self.policy.reset_after_s:g} s of its start (last exit code {code})"
                    )
                    self.given_up[unit.name] = why
                    log.error(
                        "%s is in a crash loop (%s): not restarting it",
                        unit.name,
                        why,
                        extra={"child": unit.name},
                    )
                    return
                log.info("restarting %s in %.2f s", unit.name, delay, extra={"child": unit.name})
                await self.sleep(delay)
                try:
                    await unit.restart()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning(
                        "restarting %s failed: %s",
                        unit.name,
                        exc,
                        extra={"child": unit.name, "error": str(exc)},
                    )
                    continue
                break
            unit.backoff.started()
            unit.restarts += 1
            event = RestartEvent(unit.name, code, self.clock() - down_at, reason)
            self.history.append(event)
            log.warning(
                "%s restarted and ready again (restart %d, down %.2f s)",
                unit.name,
                unit.restarts,
                event.down_s,
                extra={"child": unit.name, "restarts": unit.restarts, "down_s": event.down_s},
            )

    async def _wait_or_kill(self, unit: _Unit) -> tuple[int | None, str | None]:
        """Until the unit exits: (its exit status, None), or, once its liveness probe failed
        `failure_threshold` times in a row and the supervisor killed it, (its exit status, why)."""
        if unit.liveness is None:
            return await unit.wait(), None
        waiting = asyncio.ensure_future(unit.wait())
        probing = asyncio.get_running_loop().create_task(
            self._probe(unit, unit.liveness), name=f"probe {unit.name}"
        )
        try:
            await asyncio.wait({waiting, probing}, return_when=asyncio.FIRST_COMPLETED)
            if waiting.done():
                return waiting.result(), None
            reason = probing.result()
            log.warning(
                "%s: %s; killing it",
                unit.name,
                reason,
                extra={"child": unit.name, "reason": reason},
            )
            try:
                await unit.liveness.kill()
            except Exception as exc:  # it may have exited meanwhile: wait() tells
                log.warning("killing %s failed: %r", unit.name, exc, extra={"child": unit.name})
            return await waiting, reason
        finally:
            for t in (waiting, probing):
                t.cancel()
            await asyncio.gather(waiting, probing, return_exceptions=True)

    async def _probe(self, unit: _Unit, lv: Liveness) -> str:
        """Probe every `period_s` (the first one period after the unit was watched); return the
        reason to kill it once `failure_threshold` probes in a row failed."""
        failures = 0
        next_at = self.clock() + lv.period_s
        while True:
            await self.sleep(max(0.0, next_at - self.clock()))
            next_at = self.clock() + lv.period_s
            try:
                ok = await lv.alive()
                error = "" if ok else "not alive"
            except asyncio.CancelledError:
                raise
            except lv.fatal as exc:
                error = str(exc) or repr(exc)
                log.warning(
                    "%s: liveness probe found it dead: %s",
                    unit.name,
                    error,
                    extra={"child": unit.name, "error": error},
                )
                return f"liveness probe found it dead: {error}"
            except Exception as exc:
                ok, error = False, str(exc) or repr(exc)
            if ok:
                if failures:
                    log.info(
                        "%s: liveness probe succeeded again after %d failures",
                        unit.name,
                        failures,
                        extra={"child": unit.name},
                    )
                failures = 0
                continue
            failures += 1
            log.warning(
                "%s: liveness probe failed (%d of %d in a row): %s",
                unit.name,
                failures,
                lv.failure_threshold,
                error,
                extra={"child": unit.name, "error": error},
            )
            if failures >= lv.failure_threshold:
                return f"liveness probe failed {failures} times: {error}"
