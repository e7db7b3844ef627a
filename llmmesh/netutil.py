"""Small networking helpers."""

from __future__ import annotations

import random
import socket
import threading
from collections import deque
from pathlib import Path

# Linux's default ephemeral range, when /proc does not say (net.ipv4.ip_local_port_range).
_DEFAULT_EPHEMERAL = (32768, 60999)
# Listening ports are drawn from [_LISTEN_LOW, start of the ephemeral range).
_LISTEN_LOW = 16384
_TRIES = 64
# Ports this process handed out lately, never drawn again while remembered: a mesh draws its
# ports before its servers bind them, so a free port drawn twice (about 1% over 17 draws from
# the 16k below the ephemeral range) would go to two servers.
_RECENT_MAX = 4096
_recent: deque[int] = deque()
_recent_set: set[int] = set()
_recent_lock = threading.Lock()


def _claim(port: int, remember: int) -> bool:
    """Record `port` as handed out, keeping the last `remember`; False when it was lately."""
    with _recent_lock:
        if port in _recent_set:
            return False
        _recent.append(port)
        _recent_set.add(port)
        while len(_recent) > remember:
            _recent_set.discard(_recent.popleft())
        return True


def ephemeral_range(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (and for binds to port 0)."""
    try:
        low, high = (int(x) for x in path.read_text().split())
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL
    return low, high


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", rng: random.Random | None = None) -> int:
    """A TCP port that was free a moment ago, for a server that binds it later (and binds it
    again when restarted). Another process may take it before the caller binds, so use it
    right away.

    Drawn below the kernel's ephemeral range: a port from that range (what a bind to port 0
    returns) is also any outgoing connection's local port, so a restarted server could find
    its own port held by a client's connection, for as long as that connection lives (a
    keep-alive probe's, say), and fail to bind on every restart. Never a port this process
    handed out among its last `_RECENT_MAX`. Falls back to port 0 when the range leaves no room
    below it or no drawn port binds."""
    low, _ = ephemeral_range()
    draw = rng or random.SystemRandom()
    # At most a quarter of the range remembered: draws keep finding ports not handed out.
    remember = min(_RECENT_MAX, max(low - _LISTEN_LOW, 0) // 4)
    if low - _LISTEN_LOW >= 1024:
        for _ in range(_TRIES):
            port = draw.randrange(_LISTEN_LOW, low)
            if port not in _recent_set and _bindable(host, port) and _claim(port, remember):
                return port
    for _ in range(_TRIES):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if _claim(port, _RECENT_MAX):
            return port
    raise OSError("no free port that this process did not hand out lately")
