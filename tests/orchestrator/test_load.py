"""The live load ledger (services/orchestrator/load.py) on an injected clock, table-driven."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from services.orchestrator.load import LoadLedger
from services.orchestrator.scheduling.contracts import ReplicaLoad
from services.orchestrator.scheduling.work import WorkModel
from tests.helpers import ManualClock

WORK = WorkModel.named("llama-3.1-8b-h100-bf16")


@dataclass(frozen=True)
class Grant:
    lease: str
    prompt: int
    cached: int = 0
    max_tokens: int = 16
    replica: str = "r"
    held: int | None = None  # of the cached tokens, those the engine's cache held (None: all)
    prefix: int | None = None  # the prompt's first block


def granted(led: LoadLedger, grants: tuple[Grant, ...]) -> None:
    for g in grants:
        led.grant(
            g.lease,
            g.replica,
            g.prompt,
            g.cached,
            g.max_tokens,
            held_tokens=g.held,
            prefix_key=g.prefix,
        )


def ledger(*grants: Grant) -> tuple[LoadLedger, ManualClock]:
    clock = ManualClock(100.0)
    led = LoadLedger(clock, WORK)
    granted(led, grants)
    return led, clock


W1000 = WORK.prefill_work_s(1000, 0)
W2000 = WORK.prefill_work_s(2000, 0)


@pytest.mark.parametrize(
    ("grants", "after_s", "prefill_tokens", "prefill_s", "decode_seqs"),
    [
        # Nothing granted: no load.
        ((), 0.0, 0, 0.0, 0),
        # One prefill, just granted: all of it outstanding.
        ((Grant("a", 1000),), 0.0, 1000, W1000, 0),
        # Two prefills queue on the FIFO server: their work adds up.
        ((Grant("a", 1000), Grant("b", 2000)), 0.0, 3000, W1000 + W2000, 0),
        # Half-way through the first: half its tokens left, the second whole.
        ((Grant("a", 1000), Grant("b", 2000)), W1000 / 2, 2500, W1000 / 2 + W2000, 0),
        # Past the first's first token: it decodes; the second is prefilling.
        ((Grant("a", 1000), Grant("b", 2000)), W1000 + 1e-6, 2000, W2000 - 1e-6, 1),
        # Past both: two decoding sequences, no prefill backlog.
        ((Grant("a", 1000), Grant("b", 2000)), 10.0, 0, 0.0, 2),
        # A cached prefix is not prefill work: only the uncached tail counts.
        ((Grant("a", 2000, cached=1000),), 0.0, 1000, WORK.prefill_work_s(1000, 1000), 0),
        # Fully cached prompt: the engine still computes the last token.
        ((Grant("a", 1024, cached=1024),), 0.0, 1, WORK.prefill_work_s(1, 1023), 0),
        # Leases on another replica do not count here.
        ((Grant("a", 1000, replica="other"),), 0.0, 0, 0.0, 0),
    ],
)
def test_ledger_load_after_grants(
    grants: tuple[Grant, ...],
    after_s: float,
    prefill_tokens: int,
    prefill_s: float,
    decode_seqs: int,
) -> None:
    led, clock = ledger(*grants)
    clock.t += after_s
    load = led.load("r")
    assert load.prefill_tokens == pytest.approx(prefill_tokens, abs=1)
    assert load.prefill_s == pytest.approx(prefill_s, abs=1e-5)
    assert load.decode_seqs == decode_seqs


@pytest.mark.parametrize(
    ("complete", "after_s", "expect"),
    [
        # The first ends before its first token (cancelled): the second moves up by its work.
        (["a"], 0.0, ReplicaLoad(2000, W2000, 0, 0)),
        # The second ends before its first token: the backlog is the first's alone.
        (["b"], 0.0, ReplicaLoad(1000, W1000, 0, 0)),
        # Both end: nothing left.
        (["a", "b"], 0.0, ReplicaLoad(0, 0.0, 0, 0)),
        # Completing an unknown or already completed lease changes nothing.
        (["zz", "a", "a"], 0.0, ReplicaLoad(2000, W2000, 0, 0)),
        # The first decodes (16 tokens max) and ends: only the second is left, decoding.
        (["a"], 10.0, ReplicaLoad(0, 0.0, 1, 2016)),
    ],
)
def test_ledger_completion_gives_back_the_work(
    complete: list[str], after_s: float, expect: ReplicaLoad
) -> None:
    led, clock = ledger(Grant("a", 1000), Grant("b", 2000))
    clock.t += after_s
    for lid in complete:
        led.complete(lid)
    load = led.load("r")
    assert load.prefill_tokens == pytest.approx(expect.prefill_tokens, abs=1)
    assert load.prefill_s == pytest.approx(expect.prefill_s, abs=1e-6)
    assert (load.decode_seqs, load.decode_tokens) == (expect.decode_seqs, expect.decode_tokens)


def test_first_token_signal_moves_the_queue_up() -> None:
    led, clock = ledger(Grant("a", 1000), Grant("b", 2000))
    clock.t += W1000 / 4
    led.first_token("a")  # the engine was faster than modelled
    load = led.load("r")
    assert load.decode_seqs == 1
    assert load.prefill_s == pytest.approx(W2000, abs=1e-6)
    assert load.prefill_tokens == 2000


@pytest.mark.parametrize(
    ("active", "waiting", "own_at_sample", "prefill_s_at_least", "decode_seqs"),
    [
        # The engine agrees with the ledger: no correction.
        (2, 0, 2, 0.0, 0),
        # The engine holds 3 requests beyond this orchestrator's 2 leases: they decode here.
        (5, 0, 2, 0.0, 3),
        # 4 requests wait at the engine, 2 of them beyond the leases (others'), and the ledger
        # has none that has not started: the model ran ahead; the backlog is stretched to cover
        # the 2 at the mean prefill work of recent grants.
        (0, 4, 2, 2 * W1000, 2),
    ],
)
def test_engine_samples_correct_the_ledger(
    active: int, waiting: int, own_at_sample: int, prefill_s_at_least: float, decode_seqs: int
) -> None:
    led, clock = ledger(Grant("a", 1000), Grant("b", 2000))
    clock.t += 10.0  # the ledger thinks both decode
    led.observe("r", active, waiting, own_at_sample, sample_at=clock.t)
    load = led.load("r")
    assert load.prefill_s >= prefill_s_at_least
    assert load.decode_seqs == 2 + decode_seqs
    # The same sample is applied once.
    led.observe("r", active, waiting, own_at_sample, sample_at=clock.t)
    assert led.load("r").prefill_s == pytest.approx(load.prefill_s)


def test_decoding_context_grows_with_generated_tokens() -> None:
    led, clock = ledger(Grant("a", 1000, max_tokens=1000))
    clock.t += W1000 + 0.1
    early = led.load("r").decode_tokens
    clock.t += 1.0
    later = led.load("r").decode_tokens
    assert 1000 < early < later <= 2000


def test_drop_replica_forgets_its_leases() -> None:
    led, _ = ledger(Grant("a", 1000), Grant("b", 1000, replica="s"))
    led.drop_replica("r")
    assert led.load("r") == ReplicaLoad()
    assert len(led) == 1
    led.complete("a")  # its lease completes later: no error


def test_saved_time_is_a_query_that_keeps_no_replica() -> None:
    led, _ = ledger(Grant("a", 1000, replica="s"))
    idle = led.saved_s("s", 2000, 1000)  # s is granted, not decoding yet: no slowdown
    assert idle == pytest.approx(W2000 - WORK.prefill_work_s(1000, 1000))
    assert led.saved_s("gone", 2000, 1000) == idle
    assert led.load("gone") is led.load("never-seen")  # both unknown: no entry was made


def test_unique_share_is_the_uncached_part_of_the_leased_tokens() -> None:
    clock = ManualClock(100.0)
    led = LoadLedger(clock, WORK)
    assert led.unique_share("r0") == 1.0
    led.grant("a", "r0", 1000, 900, 100)  # 100 uncached + 100 output of 1100
    led.grant("b", "r0", 1000, 0, 100)  # all its own
    assert led.unique_share("r0") == (200 + 1100) / 2200
    led.complete("b")
    assert led.unique_share("r0") == 200 / 1100
    led.complete("a")
    assert led.unique_share("r0") == 1.0


def test_an_estimate_stands_for_one_engine_step_unless_the_replica_changes() -> None:
    led, clock = ledger(Grant("a", 4000), Grant("b", 4000))
    first = led.load("r")
    assert led.resolution_s == WORK.fixed_step_s > 0
    clock.t += led.resolution_s / 2
    assert led.load("r") is first  # the engine moved less than a step
    led.grant("c", "r", 1000, 0, 16)  # a change answers at once
    granted = led.load("r")
    # 1000 more tokens queued; a's prefill went on half a step (~50 of its 4000 tokens).
    assert first.prefill_tokens + 900 < granted.prefill_tokens < first.prefill_tokens + 1000
    clock.t += led.resolution_s  # a step later: estimated again, the prefill went on
    later = led.load("r")
    assert later is not granted
    assert later.prefill_s == pytest.approx(granted.prefill_s - led.resolution_s)
    assert later.prefill_tokens < granted.prefill_tokens
    assert led.estimated_for_s("r") == pytest.approx(led.resolution_s)
    clock.t += led.resolution_s / 4
    assert led.estimated_for_s("r") == pytest.approx(led.resolution_s * 3 / 4)
    led.complete("c")
    assert led.estimated_for_s("r") == 0.0  # a change: the next load is estimated anew
    assert led.load("r").prefill_tokens < later.prefill_tokens


def test_the_ledger_stamp_changes_with_each_event_and_an_estimate_stands_one_step() -> None:
    clock = ManualClock(100.0)
    led = LoadLedger(clock, WorkModel.named("llama-3.1-8b-h100-bf16"))
    assert (led.stamp("r"), led.stands_until("r")) == (-1, math.inf)  # never accounted
    stamps = [led.stamp("r")]
    events: list[Callable[[], None]] = [
        lambda: led.grant("a", "r", 1000, 0, 16),
        lambda: led.first_token("a"),
        lambda: led.observe("r", 1, 0, 1, clock.t),
        lambda: led.complete("a"),
    ]
    for event in events:
        event()
        stamps.append(led.stamp("r"))
        assert led.stamp("r") == stamps[-1]  # reading does not change it
    assert len(set(stamps)) == len(stamps)

    led.grant("b", "r", 1000, 0, 16)
    busy = led.load("r")
    assert led.stands_until("r") == clock.t + led.resolution_s
    clock.t += led.resolution_s / 2
    assert led.load("r") is busy
    led.complete("b")
    led.load("r")
    assert led.stands_until("r") == math.inf  # idle: the answer does not depend on the time
    led.drop_replica("r")
    led.grant("c", "r", 10, 0, 1)
    assert led.stamp("r") not in stamps  # accounted again: a stamp never seen before


def kv_ledger(capacity_blocks: int, *grants: Grant) -> tuple[LoadLedger, ManualClock]:
    """A ledger modelling KV admission at 32 tokens a block, its replica "r" sampled with
    `capacity_blocks` KV blocks, then `grants`."""
    clock = ManualClock(100.0)
    led = LoadLedger(clock, WORK, kv_block_size=32)
    led.observe("r", 0, 0, 0, sample_at=clock.t, kv_max_blocks=capacity_blocks)
    granted(led, grants)
    return led, clock


@pytest.mark.parametrize(
    ("grants", "free"),
    [
        # Nothing leased: the whole cache (100 blocks of 32 tokens).
        ((), 3200),
        # A lease reserves its prompt and max tokens in whole blocks (1200 -> 38 blocks).
        ((Grant("a", 1000, max_tokens=200),), 3200 - 38 * 32),
        # Two leases on one cached prefix (800 tokens the cache holds) hold it once; each
        # reserves its own 300 tokens (10 blocks).
        (
            (
                Grant("a", 1000, max_tokens=100, cached=800, prefix=7),
                Grant("b", 1000, max_tokens=100, cached=800, prefix=7),
            ),
            3200 - 800 - 2 * 320,
        ),
        # Different prefixes (first blocks) are each held: 800 and 600.
        (
            (
                Grant("a", 1000, max_tokens=100, cached=800, prefix=7),
                Grant("b", 1000, max_tokens=100, cached=600, prefix=8),
            ),
            3200 - 800 - 600 - 320 - 512,
        ),
        # One prefix matched to two depths: the shallower part is pinned, once (the deeper part
        # may be the first lease's own prompt, registered since, which that lease reserves).
        (
            (
                Grant("a", 1000, max_tokens=100, cached=600, prefix=7),
                Grant("b", 1000, max_tokens=100, cached=800, prefix=7),
            ),
            3200 - 600 - 512 - 320,
        ),
        # b's registered match is a's prompt, registered after a's prefill: a reserves it, the
        # cache pinned nothing before a (b reuses a's blocks: 4 blocks of its own).
        (
            (
                Grant("a", 1000, max_tokens=100, prefix=7),
                Grant("b", 1000, max_tokens=100, cached=999, prefix=7),
            ),
            3200 - 1120 - 128,
        ),
        # b's match is a's prompt, which a reserves (nothing the cache held): not held again.
        (
            (
                Grant("a", 1000, max_tokens=100),
                Grant("b", 1000, max_tokens=100, cached=960, held=0, prefix=7),
            ),
            3200 - 1120 - 160,
        ),
        # Reserved beyond the capacity (engine-queued sequences): negative, not clamped.
        ((Grant("a", 3000, max_tokens=200), Grant("b", 1000, max_tokens=0)), 3200 - 3200 - 1024),
        # Leases elsewhere reserve nothing here.
        ((Grant("a", 1000, max_tokens=200, replica="s"),), 3200),
    ],
)
def test_kv_free_tokens_are_the_capacity_less_what_the_leases_reserve(
    grants: tuple[Grant, ...], free: int
) -> None:
    led, _ = kv_ledger(100, *grants)
    assert led.load("r").kv_free_tokens == free


def test_others_requests_reserve_the_mean_prompt_and_max_tokens() -> None:
    led, clock = kv_ledger(1000, Grant("a", 1000, max_tokens=200), Grant("b", 3000, max_tokens=200))
    mine = 38 * 32 + 100 * 32
    assert led.load("r").kv_free_tokens == 32000 - mine
    # The engine holds 3 requests beyond this orchestrator's 2 leases.
    led.observe("r", 5, 0, 2, sample_at=clock.t + 1, kv_max_blocks=1000)
    mean = 1200 + 0.1 * (3200 - 1200)  # EWMA of prompt + max tokens per grant
    assert led.load("r").kv_free_tokens == 32000 - mine - round(3 * mean)
    # A later sample's capacity replaces the earlier one.
    led.observe("r", 2, 0, 2, sample_at=clock.t + 2, kv_max_blocks=500)
    assert led.load("r").kv_free_tokens == 16000 - mine


def test_kv_is_not_modelled_without_a_block_size_or_a_sample() -> None:
    led, clock = ledger(Grant("a", 1000))
    led.observe("r", 1, 0, 1, sample_at=clock.t, kv_max_blocks=100)
    assert led.load("r").kv_free_tokens is None  # no block size
    led, _ = kv_ledger(0, Grant("a", 1000, max_tokens=16))
    assert led.load("r").kv_free_tokens is None  # no capacity reported
    assert led.load("r").kv_wait_s(10**6) == 0.0


def test_kv_comes_back_at_what_is_reserved_over_the_mean_lease_duration() -> None:
    led, clock = kv_ledger(100, Grant("a", 1000, max_tokens=200))
    # No lease has ended yet: no return rate, so no wait is predicted.
    assert led.load("r").kv_return_per_s is None
    assert led.load("r").kv_wait_s(5000) == 0.0
    clock.t += 2.0
    led.complete("a")  # the first lease here lasted 2 s
    led.grant("b", "r", 2600, 0, 200)  # reserves 2816 (88 blocks) of 3200
    led.grant("c", "r", 100, 0, 28)  # 128 (4 blocks)
    clock.t += 1.0
    led.complete("c")  # 1 s: the mean lease is 2 + 0.1 x (1 - 2) = 1.9 s
    load = led.load("r")
    assert load.kv_free_tokens == 384
    assert load.kv_return_per_s == pytest.approx(2816 / 1.9)
    assert load.kv_wait_s(384) == 0.0  # fits now
    # 1000 more than free: the reserved tokens come back at 2816 / 1.9 per second.
    assert load.kv_wait_s(1384) == pytest.approx(1000 / (2816 / 1.9))
    led.complete("b")  # what it reserved is back at once
    assert led.load("r").kv_free_tokens == 3200
