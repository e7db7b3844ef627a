"""A private `redis-server` child: the shared store of the local mesh, the benchmarks and the tests.

Debian's redis-server as `make setup` unpacks it into .build/redis (or one on PATH), bound to
127.0.0.1 on a port chosen once (a free one by default), without persistence (`--save ""`,
`--appendonly no`: a restart starts empty, as a cache-only Redis Deployment does). The process is
tied to its parent (`tied_to_parent`), so it dies with whoever started it, whatever the signal;
`restart()` brings it back on the same port, so clients reconnect to the same address.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from llmmesh.common.process import prepend_path, tied_to_parent, wait_for_exit
from llmmesh.netutil import free_port

ROOT = Path(__file__).resolve().parents[1]
UNPACKED = ROOT / ".build" / "redis" / "usr" / "bin" / "redis-server"

__all__ = ["RedisServer", "RedisUnavailable", "redis_binary"]


class RedisUnavailable(RuntimeError):
    """No redis-server binary, or it did not answer PING within its start timeout."""


def redis_binary() -> tuple[str, dict[str, str]] | None:
    """(path, environment) of the redis-server to run: the unpacked Debian one (with its
    libraries on LD_LIBRARY_PATH), else one on PATH; None when there is none."""
    env = dict(os.environ)
    unpacked = UNPACKED.exists()
    libs = (
        [str(p) for p in (ROOT / ".build" / "redis" / "usr" / "lib").glob("*-linux-gnu")]
        if unpacked
        else []
    )
    library_path = prepend_path(libs, env.pop("LD_LIBRARY_PATH", None))
    if library_path:
        env["LD_LIBRARY_PATH"] = library_path
    if unpacked:
        return str(UNPACKED), env
    found = shutil.which("redis-server")
    return (found, env) if found else None


class RedisServer:
    def __init__(self, workdir: Path, port: int = 0) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def spawn(self) -> None:
        found = redis_binary()
        if found is None:
            raise RedisUnavailable(
                f"no redis-server: run `make setup` (unpacks it into {UNPACKED})"
            )
        binary, env = found
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            binary,
            *("--port", str(self.port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", str(self.workdir)),
            *("--logfile", str(self.log_path)),
        ]
        self.proc = subprocess.Popen(
            tied_to_parent(argv),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            # Not in the terminal's process group: Ctrl-C reaches its owner alone, which stops
            # it after the gateways that use it (they drain against it).
            start_new_session=True,
        )

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _failed(self, deadline: float) -> str | None:
        if self.proc is None or self.proc.poll() is not None:
            return "exited"
        if time.monotonic() > deadline:
            return "did not answer PING"
        return None

    def _error(self, why: str) -> RedisUnavailable:
        tail = ""
        with contextlib.suppress(OSError):
            tail = self.log_path.read_text(errors="replace")[-2000:]
        return RedisUnavailable(f"redis-server on port {self.port} {why}:\n{tail}")

    def start_blocking(self, timeout_s: float = 10.0) -> None:
        """Spawn and poll PING from a thread without an event loop (pytest fixtures)."""
        self.spawn()
        deadline = time.monotonic() + timeout_s
        while not self._pong():
            why = self._failed(deadline)
            if why is not None:
                self.kill()
                raise self._error(why)
            time.sleep(0.02)

    async def start(self, timeout_s: float = 10.0) -> None:
        self.spawn()
        deadline = time.monotonic() + timeout_s
        while not await asyncio.to_thread(self._pong):
            why = self._failed(deadline)
            if why is not None:
                self.kill()
                raise self._error(why)
            await asyncio.sleep(0.02)

    async def restart(self, timeout_s: float = 10.0) -> None:
        self.kill()
        await self.start(timeout_s)

    async def wait(self) -> int:
        """The exit status once the process ends (the supervisor's watch)."""
        proc = self.proc
        if proc is None:
            return 0
        # No thread blocked in wait(): one left there would hold the loop's shutdown (its
        # default executor is joined without a timeout) if the stop never came.
        return await wait_for_exit(proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (Redis exits at once without persistence), SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None
