"""Child processes that die with their parent, whatever ends it.

`die_with_parent` is a `preexec_fn`: in the forked child, before exec, it asks the kernel
(Linux `prctl(PR_SET_PDEATHSIG)`) to send the child SIGKILL when the thread that forked it exits,
so a parent killed by SIGKILL, SIGTERM or a crash leaves no child behind. If the parent already
died between fork and prctl, the child kills itself. Elsewhere than Linux it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)
