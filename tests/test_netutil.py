from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmmesh import netutil


def test_ephemeral_range_reads_the_kernel_file(tmp_path: Path) -> None:
    f = tmp_path / "range"
    f.write_text("40000\t50000\n")
    assert netutil.ephemeral_range(f) == (40000, 50000)


@pytest.mark.parametrize("text", ["", "1 2 3", "a b"])
def test_ephemeral_range_falls_back_on_bad_input(tmp_path: Path, text: str) -> None:
    f = tmp_path / "range"
    f.write_text(text)
    assert netutil.ephemeral_range(f) == (32768, 60999)
    assert netutil.ephemeral_range(tmp_path / "missing") == (32768, 60999)


def test_free_port_is_below_the_ephemeral_range_and_bindable() -> None:
    low, _ = netutil.ephemeral_range()
    for _ in range(20):
        port = netutil.free_port()
        assert port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_free_port_skips_a_port_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken: int = held.getsockname()[1]
        monkeypatch.setattr(netutil, "ephemeral_range", lambda: (taken + 2, 60999))
        monkeypatch.setattr(netutil, "_LISTEN_LOW", taken + 2 - 1024)
        # Every draw but the last lands on the held port.
        draws: Iterator[int] = iter([taken] * 10 + [taken + 1])

        class Rigged(random.Random):
            def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:
                return next(draws)

        assert netutil.free_port(rng=Rigged()) == taken + 1


def test_free_port_falls_back_to_port_zero_without_room(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netutil, "ephemeral_range", lambda: (2000, 60999))
    port = netutil.free_port()
    assert port >= 1024


def test_a_port_handed_out_is_not_handed_out_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # Drawn before a server binds it, a port is still free on the next draw: two servers of
    # one mesh would get it.
    low, _ = netutil.ephemeral_range()
    first = netutil.free_port()
    # Another port the draw accepts (first's neighbour may be held, or handed out already).
    nxt = next(
        p
        for p in range(low - 1, netutil._LISTEN_LOW, -1)
        if p != first and p not in netutil._recent_set and netutil._bindable("127.0.0.1", p)
    )
    draws: Iterator[int] = iter([first, first, nxt])

    class Rigged(random.Random):
        def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:
            return next(draws)

    assert netutil.free_port(rng=Rigged()) == nxt


def test_a_narrow_range_keeps_drawing_below_the_ephemeral_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 1024 ports to draw from: fewer remembered than that, or every draw would be refused
    # and the fallback would hand out ephemeral ports.
    low = netutil._LISTEN_LOW + 1024
    monkeypatch.setattr(netutil, "ephemeral_range", lambda: (low, 60999))
    ports = [netutil.free_port() for _ in range(1500)]
    assert max(ports) < low
