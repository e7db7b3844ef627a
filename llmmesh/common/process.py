"""Child processes that die with their parent, whatever ends it.

`tied_to_parent(argv)` is the way to spawn: it prefixes `argv` with util-linux's
`setpriv --pdeathsig KILL --`, so the parent-death signal is set between fork and exec without
running any Python in the forked child. Prefer it to `die_with_parent`: a `preexec_fn` makes
CPython run its after-fork handlers in the child, which can crash or deadlock the child when the
parent has other Python threads (seen: a segfault in `threading._after_fork` while a mesh with
telemetry and executor threads restarted a replica). Its one gap: a parent that dies before
`setpriv` runs leaves the child untied.

`die_with_parent` is a `preexec_fn` (`subprocess.Popen`, `asyncio.create_subprocess_exec`, also
under uvloop): in the forked child, before exec, it asks the kernel (Linux
`prctl(PR_SET_PDEATHSIG)`) to send the child SIGKILL when its parent goes away, so a parent
killed by SIGKILL, SIGTERM or a crash leaves no child behind. If the parent already died between
fork and prctl, the child kills itself. Elsewhere than Linux it does nothing.

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
import ctypes
import ctypes.util
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl: Callable[..., int] = libc.prctl
    return prctl


# Resolved here, in the parent: the forked child must not import or look up libraries (another
# thread of the parent may have held a lock at fork time that the child would wait on forever).
_prctl = _load_prctl()


_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None


def tied_to_parent(argv: Sequence[str], sig: signal.Signals = signal.SIGKILL) -> list[str]:
    """`argv` run so that the kernel sends it `sig` when the thread that spawns it exits (see
    the module docstring); `argv` unchanged where there is no `setpriv`."""
    if _SETPRIV is None:
        return list(argv)
    return [_SETPRIV, "--pdeathsig", sig.name.removeprefix("SIG"), "--", *argv]


def die_with_parent() -> None:
    set_parent_death_signal(signal.SIGKILL)


def set_parent_death_signal(sig: int) -> None:
    """In a forked child (a `preexec_fn`): have the kernel send `sig` to this process when the
    thread that forked it exits; if the parent is already gone, send it now."""
    if _prctl is None:
        return
    parent = os.getppid()
    if _prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


async def wait_for_exit(proc: subprocess.Popen[bytes]) -> int:
    """Wait until `proc` exits and reap it; its exit status."""
    rc = proc.poll()
    if rc is not None:
        return rc
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd here (or already reaped): a waiting thread
        return await asyncio.to_thread(proc.wait)
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
    with contextlib.suppress(ChildProcessError):
        return proc.wait()
    return proc.returncode if proc.returncode is not None else -1
