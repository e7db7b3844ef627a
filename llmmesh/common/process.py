"""Child processes that die with their parent, whatever ends it.

`tied_to_parent(argv)` prefixes `argv` with util-linux's `setpriv --pdeathsig KILL --`: the
kernel (Linux `prctl(PR_SET_PDEATHSIG)`) sends the child SIGKILL when its parent goes away, so a
parent killed by SIGKILL, SIGTERM or a crash leaves no child behind. The signal is set between
fork and exec without running any Python in the forked child: a `preexec_fn` would make CPython
run its after-fork handlers there, which crashed children of threaded parents here (a segfault
in `threading._after_fork` while a mesh restarted a replica). A parent that dies before
`setpriv` sets the signal would leave the child untied, so `setpriv` then execs a POSIX shell
that compares its parent (read after the signal was set) with the spawning process and exits
when they differ (the child was already re-parented), before exec'ing `argv`. Not for a signal
whose default is to be ignored (the child handles it, and checks its parent itself).

Two things to know:
- The kernel fires it when the *thread* that forked the child exits, not the process. Spawn from
  the main thread or the event loop's thread, never from a worker thread (`asyncio.to_thread`,
  an executor) that may end while the child should live on.
- It is not inherited: the child's own children are not covered (a child that starts processes
  must tie them itself; see `llmmesh.triton.launcher` for Triton's backend stubs).

`wait_for_exit` awaits a `subprocess.Popen`'s exit without a thread per child (a pidfd where
Linux has one, else a waiting thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence

_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None
_SH = shutil.which("sh")
# $0 is the spawning process's pid; $PPID is read when the shell starts, after the prctl.
_GUARD = '[ "$PPID" = "$0" ] || exit 1; exec "$@"'
_IGNORED_BY_DEFAULT = frozenset({signal.SIGURG, signal.SIGCHLD, signal.SIGWINCH, signal.SIGCONT})


def prepend_path(entries: Sequence[str], path: str | None) -> str:
    """A search path (PATH-like, `os.pathsep`-separated): `entries` first, then `path`'s own
    entries not among them, with no empty entry (the dynamic loader and Python read one as the
    current directory)."""
    rest = [p for p in (path or "").split(os.pathsep) if p and p not in entries]
    return os.pathsep.join([*entries, *rest])


def tied_to_parent(argv: Sequence[str], sig: signal.Signals = signal.SIGKILL) -> list[str]:
    """`argv` run so that the kernel sends it `sig` when the thread that spawns it exits (see
    the module docstring); `argv` unchanged where there is no `setpriv`."""
    if _SETPRIV is None:
        return list(argv)
    tie = [_SETPRIV, "--pdeathsig", sig.name.removeprefix("SIG"), "--"]
    if _SH is None or sig in _IGNORED_BY_DEFAULT:
        # A signal the child handles itself (its default is to be ignored): the child checks
        # its parent once its handler is in place, which covers the window (the launcher's
        # watchdog does); exiting here would skip what its handler does.
        return [*tie, *argv]
    return [*tie, _SH, "-c", _GUARD, str(os.getpid()), *argv]


async def wait_for_exit(proc: subprocess.Popen[bytes]) -> int:
    """Wait until `proc` exits and reap it; its exit status."""
    rc = proc.poll()
    if rc is not None:
        return rc
    await until_exited(proc)
    with contextlib.suppress(ChildProcessError):
        return proc.wait()
    return proc.returncode if proc.returncode is not None else -1


async def until_exited(proc: subprocess.Popen[bytes]) -> None:
    """Wait until `proc` exits, leaving it unreaped where this system has pidfds (a zombie
    keeps its pid, and the process group it leads, from being reused until it is reaped)."""
    if proc.returncode is not None:
        return
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd here (or already reaped): a waiting thread
        await asyncio.to_thread(proc.wait)
        return
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def exited_within(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Wait up to `timeout_s` for `proc` to exit without reaping it (blocking): whether it
    did. A zombie keeps its pid, and the process group it leads, from being reused."""
    if proc.returncode is not None:
        return True
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd here (or already reaped): reaped by waiting
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout_s)
    finally:
        os.close(fd)
    return bool(readable)
