"""tied_to_parent: a grandchild started with it is killed when its parent is SIGKILLed;
wait_for_exit awaits a child's exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from llmmesh.common.process import prepend_path, tied_to_parent, wait_for_exit

# The middle process starts a long sleeper tied to it, prints its pid, then waits.
_PARENT = """
import subprocess, sys, time
from llmmesh.common.process import tied_to_parent, prepend_path
sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
child = subprocess.Popen(tied_to_parent(sleeper))
print(child.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_child_dies_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.01)  # the kernel delivers the signal asynchronously; poll its effect
        assert not _alive(child)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
        parent.stdout.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_tied_child_runs_its_command_in_its_own_pid() -> None:
    argv = tied_to_parent([sys.executable, "-c", "import os; print(os.getpid())"])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    assert done.stdout.strip().isdigit()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_tied_child_whose_parent_is_not_the_spawner_exits_before_its_command() -> None:
    # What a child re-parented before `setpriv` set the signal sees: a parent other than the
    # process that built its argv. It must not run the command (it would be untied).
    argv = tied_to_parent([sys.executable, "-c", "print('ran')"])
    other = [
        sys.executable,
        "-c",
        "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))",
    ]
    done = subprocess.run([*other, *argv], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "ran" not in done.stdout


async def test_wait_for_exit_returns_the_exit_status() -> None:
    # A Popen child, as TritonServer starts from async code (Popen itself returns at once).
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])  # noqa: ASYNC220
    assert await wait_for_exit(proc) == 3
    assert proc.returncode == 3
    assert await wait_for_exit(proc) == 3  # already reaped: answered at once


@pytest.mark.parametrize(
    ("entries", "path", "expected"),
    [
        (["/a"], None, "/a"),
        (["/a"], "", "/a"),
        (["/a", "/b"], "/c::/a:", "/a:/b:/c"),  # no empty entry (the current directory)
        ([], "/c:", "/c"),
        ([], None, ""),
    ],
)
def test_prepend_path(entries: list[str], path: str | None, expected: str) -> None:
    assert prepend_path(entries, path) == expected
