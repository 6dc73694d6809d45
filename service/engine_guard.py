"""``python -m service.engine_guard -- COMMAND...``: runs the engine and takes its whole process
group down with it, whatever ends it.

Why: when the gateway is killed with SIGKILL it can clean nothing up. Linux can signal a process
when its parent dies (``PR_SET_PDEATHSIG``), but only a direct child; vLLM's engine core and
workers are grandchildren and were seen to outlive their server. This guard is that direct
child: on the parent-death signal, or on any SIGTERM, it stops every process of its group
(SIGTERM, then SIGKILL after a grace period). The supervisor starts it as a group leader.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

_PR_SET_PDEATHSIG = 1
GRACE_S = 10.0


def main(argv: Sequence[str]) -> int:
    command = list(argv[1:] if argv and argv[0] == "--" else argv)
    if not command:
        print("usage: python -m service.engine_guard -- COMMAND...", file=sys.stderr)
        return 2
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the gateway died before the signal was armed
        return 1
    child = subprocess.Popen(command)
    asked_to_stop: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        asked_to_stop.append(signum)

    signal.signal(signal.SIGTERM, note)
    signal.signal(signal.SIGINT, note)
    # Poll rather than wait: the group is stopped from here, never from a signal handler
    # (Popen.poll inside an interrupted Popen.wait cannot see the child exit).
    while child.poll() is None and not asked_to_stop:
        time.sleep(0.1)
    if child.returncode is not None:
        print(
            f"hybrid-serve engine guard: the engine exited with code {child.returncode}",
            file=sys.stderr,
            flush=True,
        )
    _stop_group(child)  # on a stop request, or the leftovers of an engine that died on its own
    return child.returncode or 0


def _stop_group(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM the group, give the engine ``GRACE_S`` to stop, then SIGKILL whatever is left but
    this guard, which then exits with the engine's own code."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group signal reaches this guard too
    os.killpg(os.getpgrp(), signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # the engine's own children exit just after it
    for pid in _group_members():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    child.wait()


def _group_members() -> list[int]:
    """The other live processes of this guard's process group (read from /proc)."""
    group, me = os.getpgrp(), os.getpid()
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(entry))
    return members


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
