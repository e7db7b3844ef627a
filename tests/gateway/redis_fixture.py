"""A private redis-server for tests that need the shared resume store (resume_redis.py).

Debian's redis-server, as `make setup` unpacks it into .build/redis (or one on PATH), on a free
port, without persistence, dying with the test process. `RedisServer.stop()`/`start()` take it
down and bring it back on the same port (the Redis-down tests). Gateway tests get one per module
from the `redis_server` fixture (tests/gateway/conftest.py).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from llmmesh.common.process import tied_to_parent
from llmmesh.netutil import free_port

ROOT = Path(__file__).resolve().parents[2]
UNPACKED = ROOT / ".build" / "redis" / "usr" / "bin" / "redis-server"

__all__ = ["RedisServer"]


def _binary() -> tuple[str, dict[str, str]]:
    env = dict(os.environ)
    if UNPACKED.exists():
        libs = glob.glob(str(ROOT / ".build" / "redis" / "usr" / "lib" / "*-linux-gnu"))
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")])
        return str(UNPACKED), env
    found = shutil.which("redis-server")
    if found is None:
        pytest.fail(f"{UNPACKED} missing: run `make setup` (unpacks Debian's redis-server)")
    return found, env


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary, env = _binary()
        self.proc = subprocess.Popen(
            tied_to_parent(
                [
                    binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                    "--logfile",
                    str(self.workdir / "redis.log"),
                ]
            ),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                self.stop()
                pytest.fail(f"redis-server did not start:\n{log}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"FLUSHALL\r\n")
            assert s.recv(16).startswith(b"+OK")
