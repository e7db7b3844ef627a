"""The direct-scrape source: page parsing, reset-aware counter increases, histogram percentiles,
staleness, attribution to pools, and unreachable or malformed pages as unknown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import http.client
import http.server
import math
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping

import pytest

from llmmesh.common.engine_metrics import MAX_PAGE_BYTES, fetch_metrics_text
from llmmesh.common.topology import PoolKey
from services.autoscaler.scrape import CounterTrack, EngineTarget, ScrapeSource, histogram_quantile
from tests.autoscaler.fakes import engine_page, gateway_page, orchestrator_page

SHORT, LONG = PoolKey("short", "v1"), PoolKey("long", "v1")
WINDOW, MAX_AGE = 60.0, 30.0


@pytest.mark.parametrize(
    ("values", "increase"),
    [
        ([0, 5, 10], 10),
        ([10, 15, 3], 8),  # reset: 10 -> 15 (+5), restart at 0 -> 3 (+3)
        ([4, 4, 4], 0),
        ([1, math.nan, 6], 5),  # a NaN sample is skipped
    ],
)
def test_counter_increase_is_reset_aware(values: list[float], increase: float) -> None:
    track = CounterTrack(16)
    for i, v in enumerate(values):
        track.add(float(i), v)
    got = track.increase(2.0, 10.0, 5.0)
    assert got is not None
    assert got[0] == pytest.approx(increase)


def test_counter_increase_unknown_when_stale_or_single() -> None:
    track = CounterTrack(16)
    track.add(0.0, 1.0)
    assert track.increase(0.0, 10.0, 5.0) is None  # one point
    track.add(1.0, 2.0)
    assert track.increase(7.0, 10.0, 5.0) is None  # newest point 6 s old > 5 s
    assert track.increase(20.0, 100.0, 50.0) == (1.0, 1.0)


@pytest.mark.parametrize(
    ("buckets", "q", "expected"),
    [
        ([(0.1, 0), (1.0, 10), (math.inf, 10)], 0.5, 0.55),
        ([(0.1, 10), (1.0, 10), (math.inf, 10)], 0.9, 0.09),
        ([(0.1, 0), (1.0, 0), (math.inf, 10)], 0.9, 1.0),  # beyond the last finite bound
        ([(0.1, 0), (1.0, 0), (math.inf, 0)], 0.9, None),  # no observations
        ([(0.1, 1), (1.0, 2)], 0.9, None),  # no +Inf bucket
    ],
)
def test_histogram_quantile(
    buckets: list[tuple[float, float]], q: float, expected: float | None
) -> None:
    got = histogram_quantile(q, buckets)
    assert got == (pytest.approx(expected) if expected is not None else None)


class Pages:
    """Metrics pages by URL; a missing URL fails like a refused connection."""

    def __init__(self) -> None:
        self.pages: dict[str, str] = {}
        self.hosts: list[str] = []  # the Host header of each read

    def __call__(self, url: str, host: str, timeout: float) -> str:
        self.hosts.append(host)
        if url not in self.pages:
            raise ConnectionRefusedError(url)
        return self.pages[url]


async def same_host(host: str, port: int) -> list[str]:
    """Every host is its own only address (the pages are keyed by the URLs as given)."""
    return [host]


def scrape_source(
    pages: Pages,
    pool_models: Mapping[PoolKey, str] | None = None,
    resolver: Callable[[str, int], Awaitable[list[str]]] | None = None,
    timeout_s: float = 1.0,
) -> ScrapeSource:
    targets = [
        EngineTarget("r0", "http://r0/metrics", SHORT),
        EngineTarget("r1", "http://r1/metrics", SHORT),
        EngineTarget("r2", "http://r2/metrics", LONG),
    ]

    async def discover() -> list[EngineTarget]:
        return targets

    return ScrapeSource(
        targets=discover,
        orchestrator_urls=["http://orch/metrics"],
        gateway_url="http://gw/metrics",
        pool_models=pool_models or {},
        timeout_s=timeout_s,
        rate_window_s=WINDOW,
        max_age_s=MAX_AGE,
        fetch=pages,
        resolve=resolver or same_host,
    )


def ttft(fast: float, slow: float) -> list[tuple[str, float]]:
    return [("0.1", fast), ("1.0", fast + slow), ("+Inf", fast + slow)]


async def test_scrape_source_rates_percentiles_and_attribution() -> None:
    pages = Pages()
    pages.pages["http://r0/metrics"] = engine_page(3, 1, 10, 100)
    pages.pages["http://r1/metrics"] = engine_page(1, 0, 30, 100)
    pages.pages["http://r2/metrics"] = engine_page(0, 0, 0, 100)
    src = scrape_source(pages)

    def round_(decisions: dict[tuple[str, str], float], prompt: float, fast: float) -> None:
        pages.pages["http://orch/metrics"] = orchestrator_page(decisions, {SHORT: 2.0})
        pages.pages["http://gw/metrics"] = gateway_page(prompt, prompt / 2, ttft(fast, 0))

    round_({("r0", "short"): 100, ("r2", "long"): 50}, 1000, 5)
    first = await src.collect(0.0)
    assert first[SHORT].arrival_rate is None  # one read: no rate yet (unknown, not 0)
    assert first[SHORT].prompt_tokens_rate is None
    assert first[SHORT].ttft_p90_s is None
    # 10 s later: short got 30 admissions, long 10; the gateway counted 800 prompt tokens; the
    # orchestrator restarted its counter for r2 (50 -> 10 means 10 since the restart).
    round_({("r0", "short"): 130, ("r2", "long"): 10}, 1800, 15)
    got = await src.collect(10.0)
    short, long = got[SHORT], got[LONG]
    assert (short.replicas_known, short.reporting_replicas) == (2, 2)
    assert (short.engine_active, short.engine_waiting) == (4.0, 1.0)
    assert short.kv_utilization == pytest.approx(0.2)
    assert short.queue_depth == 2.0
    assert long.queue_depth == 0.0  # the gauge is exported, the pool has no series
    assert short.arrival_rate == pytest.approx(3.0)
    assert long.arrival_rate == pytest.approx(1.0)
    # The only model seen is the pools' model; its token rate splits 3:1 by admissions.
    assert short.prompt_tokens_rate == pytest.approx(80.0 * 0.75)
    assert long.prompt_tokens_rate == pytest.approx(80.0 * 0.25)
    assert short.completion_tokens_rate == pytest.approx(40.0 * 0.75)
    assert short.ttft_p90_s == pytest.approx(0.09)  # all 10 new observations below 0.1 s


async def test_scrape_source_gives_each_pool_its_own_latencies() -> None:
    """Series labelled by pool: each pool's TTFT and queue wait come from its own series (a
    long-prompt pool's slow first tokens are not the short pool's); a pool no series names
    has none."""
    pages = Pages()
    spare = PoolKey("spare", "v1")
    src = scrape_source(pages, {SHORT: "m", LONG: "m", spare: "m"})

    def round_(n: float) -> None:
        fast, slow = ttft(n, 0), ttft(0, n)
        pages.pages["http://orch/metrics"] = orchestrator_page(
            {("r0", "short"): n, ("r2", "long"): n},
            {SHORT: 0.0},
            waits_by_pool={"short": slow, "long": fast},
        )
        pages.pages["http://gw/metrics"] = gateway_page(
            n, n, (), ttft_by_pool={"short": fast, "long": slow}
        )

    round_(5)
    await src.collect(0.0)
    round_(15)
    got = await src.collect(10.0)
    assert got[SHORT].ttft_p90_s == pytest.approx(0.09)
    assert got[LONG].ttft_p90_s == pytest.approx(0.91)
    assert got[SHORT].queue_wait_p90_s == pytest.approx(0.91)
    assert got[LONG].queue_wait_p90_s == pytest.approx(0.09)
    assert (got[spare].ttft_p90_s, got[spare].queue_wait_p90_s) == (None, None)


async def test_scrape_source_gives_each_pool_its_own_token_rates() -> None:
    """Token series labelled by pool: each pool's rates are its own (the long pool's 8000-token
    prompts are not averaged with the short pool's), whatever the admissions' split."""
    pages = Pages()
    src = scrape_source(pages, {SHORT: "m", LONG: "m"})

    def round_(n: float) -> None:
        pages.pages["http://orch/metrics"] = orchestrator_page(
            {("r0", "short"): 9 * n, ("r2", "long"): n}, {SHORT: 0.0}
        )
        pages.pages["http://gw/metrics"] = gateway_page(
            0,
            0,
            ttft(n, 0),
            tokens_by_pool={"short": (500 * 9 * n, 0), "long": (8000 * n, 100 * n)},
        )

    round_(1)
    await src.collect(0.0)
    round_(11)
    got = await src.collect(10.0)
    assert got[LONG].arrival_rate == pytest.approx(1.0)
    assert got[LONG].prompt_tokens_rate == pytest.approx(8000.0)
    assert got[SHORT].prompt_tokens_rate == pytest.approx(9 * 500.0)
    assert got[LONG].completion_tokens_rate == pytest.approx(100.0)


async def test_scrape_source_unreachable_and_stale_are_unknown() -> None:
    pages = Pages()
    pages.pages["http://r0/metrics"] = engine_page(3, 1, 10, 100)
    pages.pages["http://r1/metrics"] = engine_page(math.nan, 0, 30, 100)
    pages.pages["http://orch/metrics"] = orchestrator_page({("r0", "short"): 1}, None)
    src = scrape_source(pages)
    await src.collect(0.0)
    got = await src.collect(5.0)
    short, long = got[SHORT], got[LONG]
    assert (short.replicas_known, short.reporting_replicas) == (2, 1)  # r1's NaN: not reporting
    assert (long.replicas_known, long.reporting_replicas) == (1, 0)  # r2 refused
    assert (long.engine_active, long.kv_utilization) == (None, None)
    assert short.queue_depth is None  # the per-pool gauge is not exported
    assert (short.prompt_tokens_rate, short.ttft_p90_s) == (None, None)  # gateway down
    # The orchestrator goes away: its rates turn unknown once the last point is too old.
    del pages.pages["http://orch/metrics"]
    assert (await src.collect(5.0 + MAX_AGE + 1))[SHORT].arrival_rate is None


async def test_scrape_source_garbage_page_is_unknown() -> None:
    pages = Pages()
    for r in ("r0", "r1", "r2"):
        pages.pages[f"http://{r}/metrics"] = "this is { not prometheus"
    pages.pages["http://orch/metrics"] = "}}}"
    src = scrape_source(pages)
    got = await src.collect(0.0)
    assert got[SHORT].reporting_replicas == 0
    assert got[SHORT].arrival_rate is None


async def test_leases_count_replicas_the_targets_do_not_list() -> None:
    """Replicas an actuator started are not engine targets: the orchestrator's leases on them
    stand in for the engines' request counts (attributed to the pool's only version)."""
    pages = Pages()
    pages.pages["http://orch/metrics"] = orchestrator_page(
        {}, {}, leases={("short-v1-local-0", "short"): 4, ("r2", "long"): 0, ("x", "gone"): 9}
    )
    src = scrape_source(pages)
    got = await src.collect(0.0)
    assert got[SHORT].engine_active is None  # no engine of short could be read
    assert got[SHORT].leases_in_flight == 4.0
    assert got[SHORT].in_flight == 4.0
    assert got[LONG].leases_in_flight == 0.0
    assert PoolKey("gone", "v1") not in got  # a pool with no known version is not guessed


async def test_every_orchestrator_behind_the_url_is_read_and_summed() -> None:
    """Two orchestrators (active-active) behind one name: each is read with the name as Host,
    their admissions are rates of their own counters (one restarting does not look like a reset
    of the other's), their queue depths add up; one of them down leaves the other's signals, which the pools say
    undercount (the policy does not scale down on them)."""
    pages = Pages()

    async def two(host: str, port: int) -> list[str]:
        assert (host, port) == ("orch", 80)
        return ["10.0.0.1", "10.0.0.2"]

    src = scrape_source(pages, resolver=two)
    a, b = "http://10.0.0.1:80/metrics", "http://10.0.0.2:80/metrics"
    pages.pages[a] = orchestrator_page({("r0", "short"): 100}, {SHORT: 2.0})
    pages.pages[b] = orchestrator_page({("r0", "short"): 7}, {SHORT: 3.0})
    await src.collect(0.0)
    assert "orch:80" in pages.hosts
    pages.pages[a] = orchestrator_page({("r0", "short"): 120}, {SHORT: 1.0})
    pages.pages[b] = orchestrator_page({("r0", "short"): 17}, {SHORT: 4.0})
    got = await src.collect(10.0)
    assert got[SHORT].arrival_rate == pytest.approx((20 + 10) / 10)
    assert got[SHORT].queue_depth == 5.0
    assert got[SHORT].unread == ()
    del pages.pages[b]
    pages.pages[a] = orchestrator_page({("r0", "short"): 140}, {SHORT: 2.0})
    got = await src.collect(20.0)
    assert got[SHORT].queue_depth == 2.0
    assert got[SHORT].unread == ("1 of 2 orchestrators not read",)  # 2.0 is a lower bound


class Broken(Pages):
    """One URL fails the way a broken HTTP endpoint does (not an OSError), one never answers
    until released; the rest are pages."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error
        self.release = threading.Event()

    def __call__(self, url: str, host: str, timeout: float) -> str:
        if url == "http://r1/metrics":
            raise self.error
        if url == "http://r2/metrics":
            self.release.wait(30)
            raise ConnectionResetError(url)
        return super().__call__(url, host, timeout)


@pytest.mark.parametrize(
    "error",
    [http.client.IncompleteRead(b"nv_trt"), http.client.BadStatusLine("SSH-2.0"), ValueError()],
)
async def test_a_broken_or_stuck_endpoint_is_one_unread_replica(error: Exception) -> None:
    pages = Broken(error)
    pages.pages["http://r0/metrics"] = engine_page(3, 1, 10, 100)
    src = scrape_source(pages, timeout_s=0.1)  # r2 given up on after deadline_s(0.1)
    try:
        got = await asyncio.wait_for(src.collect(0.0), 30)
    finally:
        pages.release.set()
    # r0 read; r1 broken and r2 stuck past the deadline count as known, not reporting.
    assert (got[SHORT].replicas_known, got[SHORT].reporting_replicas) == (2, 1)
    assert got[SHORT].engine_active == 3
    assert (got[LONG].replicas_known, got[LONG].reporting_replicas) == (1, 0)


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()


class Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_page_over_the_bound_is_not_read() -> None:
    class Huge(Quiet):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            chunk = b"#" * (1 << 20)
            with contextlib.suppress(OSError):
                for _ in range(MAX_PAGE_BYTES // len(chunk) + 2):
                    self.wfile.write(chunk)

    with serving(Huge) as url, pytest.raises(ValueError, match="over"):
        fetch_metrics_text(url, "", 10)


def test_an_http_error_status_is_a_connection_error_with_its_connection_closed() -> None:
    class Missing(Quiet):
        def do_GET(self) -> None:
            self.send_error(404)

    with serving(Missing) as url:
        # filterwarnings=error: a response left open would fail here as a ResourceWarning.
        with pytest.raises(ConnectionError, match="404"):
            fetch_metrics_text(url, "", 10)
        gc.collect()


def test_a_page_trickled_past_its_deadline_is_given_up_by_the_reading_thread() -> None:
    stop = threading.Event()

    class Trickle(Quiet):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            with contextlib.suppress(OSError):
                while not stop.wait(0.02):  # a byte well within each read's timeout
                    self.wfile.write(b"#")
                    self.wfile.flush()

    try:
        with serving(Trickle) as url, pytest.raises(TimeoutError):
            fetch_metrics_text(url, "", 0.2)  # whole within read_deadline_s(0.2) = 0.4 s
    finally:
        stop.set()


def test_a_page_cut_short_of_its_length_is_not_read_as_a_page() -> None:
    page = engine_page(3, 1, 987, 1000).encode()

    class Cut(Quiet):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page[: len(page) - 3])  # the last value arrives cut short

    with serving(Cut) as url, pytest.raises(http.client.IncompleteRead):
        fetch_metrics_text(url, "", 5)
