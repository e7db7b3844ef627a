"""The supervisor's restart policy on a virtual clock: backoff, its cap and reset, the crash-loop
bound, failed restarts, no restart after `close()`, and liveness probes (consecutive failures
kill and restart a unit; a unit is probed only once ready). No process is started here."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest

from llmmesh.supervisor import Backoff, Liveness, RestartPolicy, Supervisor

POLICY = RestartPolicy(
    initial_backoff_s=1.0, multiplier=2.0, max_backoff_s=5.0, reset_after_s=60.0,
    max_quick_failures=5,
)  # fmt: skip


class Clock:
    """Virtual time: `sleep` advances it at once."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s
        await asyncio.sleep(0)


class Unit:
    """A fake child: `crash()` ends its current run; `restart()` may be told to fail."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.starts: list[float] = []
        self.fail_next = 0

    async def wait(self) -> int:
        return await self._exit

    def crash(self, code: int = -9) -> None:
        self._exit.set_result(code)

    async def restart(self) -> None:
        self.starts.append(self._clock.now)
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("port taken")
        self._exit = asyncio.get_running_loop().create_future()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_backoff_doubles_up_to_the_cap_and_resets_after_a_stable_run() -> None:
    clock = Clock()
    b = Backoff(POLICY, clock)
    assert [b.failed() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert b.failed() is None  # the sixth quick failure: a crash loop
    b = Backoff(POLICY, clock)
    assert b.failed() == 1.0
    assert b.failed() == 2.0
    b.started()
    clock.now += 60.0  # up long enough: healthy again
    assert b.failed() == 1.0
    b.started()
    clock.now += 59.0  # not long enough
    assert b.failed() == 2.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_backoff_s": -1.0},
        {"initial_backoff_s": 10.0, "max_backoff_s": 5.0},
        {"multiplier": 0.5},
        {"max_quick_failures": 0},
        {"reset_after_s": 0.0},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"need|must"):
        RestartPolicy(**kwargs)  # type: ignore[arg-type]


async def test_a_dead_unit_is_restarted_with_backoff_and_logged_in_history() -> None:
    clock = Clock()
    sup = Supervisor(POLICY, clock=clock, sleep=clock.sleep)
    unit = Unit(clock)
    sup.watch("orchestrator", unit.wait, unit.restart)
    for expected in (1, 2, 3):
        unit.crash()
        await settle()
        assert sup.restarts("orchestrator") == expected
    assert clock.sleeps == [1.0, 2.0, 4.0]
    assert [e.down_s for e in sup.history] == [1.0, 2.0, 4.0]
    assert {e.exit_code for e in sup.history} == {-9}
    # Stable for reset_after_s: the next crash starts from the initial delay again.
    clock.now += 60.0
    unit.crash()
    await settle()
    assert clock.sleeps[-1] == 1.0
    await sup.close()


async def test_an_unwatched_unit_stays_down() -> None:
    clock = Clock()
    sup = Supervisor(POLICY, clock=clock, sleep=clock.sleep)
    unit, other = Unit(clock), Unit(clock)
    sup.watch("envoy a", unit.wait, unit.restart)
    sup.watch("envoy b", other.wait, other.restart)
    sup.unwatch("envoy a")
    sup.unwatch("never watched")  # nothing to do
    unit.crash()
    other.crash()
    await settle()
    assert (unit.starts, len(other.starts)) == ([], 1)
    assert [e.name for e in sup.history] == ["envoy b"]
    await sup.close()


async def test_a_failed_restart_counts_as_a_failure() -> None:
    clock = Clock()
    sup = Supervisor(POLICY, clock=clock, sleep=clock.sleep)
    unit = Unit(clock)
    unit.fail_next = 2
    sup.watch("replica-0", unit.wait, unit.restart)
    unit.crash()
    await settle()
    assert clock.sleeps == [1.0, 2.0, 4.0]  # two failed restarts, then one that held
    assert len(unit.starts) == 3
    assert sup.restarts("replica-0") == 1
    assert sup.history[0].down_s == 7.0
    await sup.close()


async def test_a_crash_loop_is_given_up_and_reported() -> None:
    clock = Clock()
    sup = Supervisor(POLICY, clock=clock, sleep=clock.sleep)
    unit = Unit(clock)
    sup.watch("kv_registry", unit.wait, unit.restart)
    for _ in range(5):
        unit.crash(1)
        await settle()
    assert sup.restarts("kv_registry") == 5
    assert not sup.given_up
    unit.crash(1)  # the sixth exit, each within reset_after_s of its start
    await settle()
    assert sup.restarts("kv_registry") == 5
    assert "6 failures in a row" in sup.given_up["kv_registry"]
    assert len(unit.starts) == 5
    await sup.close()


async def test_exits_after_close_are_not_restarted() -> None:
    clock = Clock()
    sup = Supervisor(POLICY, clock=clock, sleep=clock.sleep)
    unit = Unit(clock)
    sup.watch("gateway", unit.wait, unit.restart)
    await sup.close()
    unit.crash(0)  # a graceful stop after supervision ended
    await settle()
    assert unit.starts == []
    later = Unit(clock)
    sup.watch("replica-1", later.wait, later.restart)  # the mesh is stopping: not watched
    later.crash()
    await settle()
    assert later.starts == []
    assert sup.restarts("replica-1") == 0


async def test_halt_stops_supervision_at_once() -> None:
    clock = Clock()
    sup = Supervisor(POLICY, clock=clock, sleep=clock.sleep)
    unit = Unit(clock)
    sup.watch("gateway", unit.wait, unit.restart)
    sup.halt()  # synchronous: from a signal handler, before the child sees the signal
    unit.crash(0)
    await settle()
    assert unit.starts == []
    await sup.close()


async def test_close_after_halt_lets_a_cancelled_restart_clean_up() -> None:
    """A signal halts supervision during a restart, then the mesh closes it: the restart's
    cleanup (tearing its half-started child down) is cancelled once, and finishes."""
    clock = Clock()
    sup = Supervisor(POLICY, clock=clock, sleep=clock.sleep)
    unit = Unit(clock)
    starting, release = asyncio.Event(), asyncio.Event()
    cleaned: list[bool] = []

    async def restart() -> None:
        starting.set()
        try:
            await asyncio.Event().wait()  # a replica that takes its time to start
        except asyncio.CancelledError:
            await release.wait()  # its teardown, awaited
            cleaned.append(True)
            raise

    sup.watch("triton r0", unit.wait, restart)
    unit.crash()
    await starting.wait()
    sup.halt()
    await settle()
    closing = asyncio.ensure_future(sup.close())
    await settle()
    release.set()
    await closing
    assert cleaned == [True]


async def test_close_cancels_a_restart_waiting_out_its_backoff() -> None:
    clock = Clock()
    stalled = asyncio.Event()

    async def never(_: float) -> None:
        stalled.set()
        await asyncio.Event().wait()

    sup = Supervisor(POLICY, clock=clock, sleep=never)
    unit = Unit(clock)
    sup.watch("autoscaler", unit.wait, unit.restart)
    unit.crash()
    await stalled.wait()
    await sup.close()
    assert unit.starts == []


async def test_a_unit_that_cannot_be_watched_is_reported_not_restarted() -> None:
    clock = Clock()
    sup = Supervisor(POLICY, clock=clock, sleep=clock.sleep)
    restarted: list[str] = []

    async def wait() -> int:
        raise RuntimeError("not started")

    async def restart() -> None:
        restarted.append("x")

    sup.watch("gateway", wait, restart)
    await settle()
    assert "not started" in sup.given_up["gateway"]
    assert restarted == []
    await sup.close()


class Probed(Unit):
    """A fake child with a liveness probe: each probe takes the next result the test feeds
    (True, False, or an exception to raise), and records when it ran."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.results: asyncio.Queue[bool | Exception] = asyncio.Queue()
        self.probed_at: list[float] = []
        self.kills: list[float] = []
        self.restart_gate: asyncio.Event | None = None

    async def alive(self) -> bool:
        self.probed_at.append(self._clock.now)
        result = await self.results.get()
        if isinstance(result, Exception):
            raise result
        return result

    async def kill(self) -> None:
        self.kills.append(self._clock.now)
        self.crash(-9)

    async def restart(self) -> None:
        if self.restart_gate is not None:
            await self.restart_gate.wait()
        await super().restart()

    def liveness(self, period_s: float = 15.0, threshold: int = 4) -> Liveness:
        return Liveness(self.alive, self.kill, period_s, threshold)

    async def feed(self, *results: bool | Exception) -> None:
        for r in results:
            self.results.put_nowait(r)
            await settle()


async def test_consecutive_liveness_failures_kill_and_restart_the_unit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    start = clock.now
    sup = Supervisor(POLICY, clock=clock, sleep=clock.sleep)
    unit = Probed(clock)
    sup.watch("replica-0", unit.wait, unit.restart, unit.liveness())
    with caplog.at_level(logging.INFO, logger="llmmesh.supervisor"):
        await settle()
        await unit.feed(True, True)
        stub_dead = RuntimeError("HTTP 400: Stub process 'tensorrt_llm_0_0' is not healthy.")
        await unit.feed(stub_dead, stub_dead, stub_dead)
        assert unit.kills == []  # three in a row: not yet
        await unit.feed(stub_dead)
    # Every period_s, the first one a period after it was watched (ready).
    assert unit.probed_at[:6] == [start + 15.0 * i for i in range(1, 7)]
    assert unit.kills == [start + 90.0]
    assert sup.restarts("replica-0") == 1  # with the backoff
    assert clock.sleeps[6] == 1.0
    event = sup.history[0]
    assert event.exit_code == -9
    assert event.reason == f"liveness probe failed 4 times: {stub_dead}"
    assert f"killed: liveness probe failed 4 times: {stub_dead}" in caplog.text
    # The restarted unit is probed afresh, a period after it was ready again.
    await unit.feed(False, False, False)
    assert unit.kills == [start + 90.0]
    assert unit.probed_at[6:] == [start + 91.0 + 15.0 * i for i in range(1, 5)]
    await sup.close()


class Dead(RuntimeError):
    """A probe answer that says the unit is dead for good."""


async def test_a_fatal_probe_answer_kills_at_once_other_failures_count_to_the_threshold() -> None:
    clock = Clock()
    start = clock.now
    sup = Supervisor(POLICY, clock=clock, sleep=clock.sleep)
    unit = Probed(clock)
    lv = dataclasses.replace(unit.liveness(period_s=1.0, threshold=3), fatal=(Dead,))
    sup.watch("replica-0", unit.wait, unit.restart, lv)
    await settle()
    await unit.feed(TimeoutError("timed out"), RuntimeError("connection refused"))
    assert unit.kills == []  # two ordinary failures: below the threshold
    await unit.feed(Dead("HTTP 400: Stub process 'tensorrt_llm_0_0' is not healthy."))
    assert unit.kills == [start + 3.0]  # the fatal answer, at once
    assert sup.history[0].reason == (
        "liveness probe found it dead: HTTP 400: Stub process 'tensorrt_llm_0_0' is not healthy."
    )
    await sup.close()


async def test_only_consecutive_failures_count() -> None:
    clock = Clock()
    sup = Supervisor(POLICY, clock=clock, sleep=clock.sleep)
    unit = Probed(clock)
    sup.watch("replica-0", unit.wait, unit.restart, unit.liveness(threshold=3))
    await settle()
    for _ in range(5):
        await unit.feed(False, TimeoutError("timed out"), True)
    assert unit.kills == []
    assert sup.restarts("replica-0") == 0
    await unit.feed(False, False, False)
    assert len(unit.kills) == 1
    await sup.close()


async def test_a_slow_successful_probe_is_a_success() -> None:
    """A busy unit answers its probe late (the check bounds its own duration): not killed."""
    clock = Clock()
    sup = Supervisor(POLICY, clock=clock, sleep=clock.sleep)
    unit = Probed(clock)
    sup.watch("replica-0", unit.wait, unit.restart, unit.liveness(threshold=1))
    await settle()
    for _ in range(3):
        clock.now += 40.0  # longer than the period
        await unit.feed(True)
    assert unit.kills == []
    # The next probe is a period after the last one started, not one per missed period.
    assert len(unit.probed_at) == 4
    await sup.close()


async def test_a_unit_still_restarting_is_not_probed() -> None:
    clock = Clock()
    sup = Supervisor(POLICY, clock=clock, sleep=clock.sleep)
    unit = Probed(clock)
    sup.watch("replica-0", unit.wait, unit.restart, unit.liveness(threshold=2))
    await settle()
    await unit.feed(False)  # one failure, then the unit exits by itself
    unit.restart_gate = asyncio.Event()
    unit.crash(1)
    await settle()
    probes = len(unit.probed_at)
    for _ in range(10):
        await settle()
    assert len(unit.probed_at) == probes  # starting: not probed
    assert unit.kills == []
    unit.restart_gate.set()
    await settle()
    assert sup.restarts("replica-0") == 1
    assert sup.history[0].reason is None  # it exited, nobody killed it
    # Ready again: probed, and the failure before the restart does not count.
    await unit.feed(False)
    assert unit.kills == []
    await unit.feed(False)
    assert len(unit.kills) == 1
    await sup.close()


async def test_close_stops_the_probes() -> None:
    clock = Clock()
    sup = Supervisor(POLICY, clock=clock, sleep=clock.sleep)
    unit = Probed(clock)
    sup.watch("replica-0", unit.wait, unit.restart, unit.liveness(threshold=1))
    await settle()
    assert len(unit.probed_at) == 1  # waiting for its result
    await sup.close()
    await unit.feed(False, False)
    assert unit.kills == []
    assert unit.starts == []


def test_liveness_rejects_nonsense() -> None:
    async def alive() -> bool:
        return True

    async def kill() -> None:
        pass

    with pytest.raises(ValueError, match="need"):
        Liveness(alive, kill, 0.0, 1)
    with pytest.raises(ValueError, match="need"):
        Liveness(alive, kill, 1.0, 0)
