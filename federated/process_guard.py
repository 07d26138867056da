"""Run a command so that nothing it starts can outlive it, or outlive whoever started this guard.

`python process_guard.py COMMAND...` (run by path: it imports only the standard library). Flower's
SuperLink starts a SuperExec in a session of its own, which starts the simulation process, which starts
Ray's workers: a signal to one process group reaches none of them, and they outlive a killed SuperLink
by a minute or for good. So the guard
- makes itself a child subreaper (orphans below it are re-parented to it, not to init, so they stay in
  its tree),
- asks to be sent SIGTERM when its own parent dies, even by SIGKILL (PR_SET_PDEATHSIG),
- and on SIGTERM or SIGINT, or when COMMAND exits, kills every process below it and exits.
On a system without prctl and /proc it only runs COMMAND and ends it.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36


def _prctl(option: int, value: int) -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(option, value)
    except (OSError, AttributeError):
        pass


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def main(command: list[str]) -> None:
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the request above took effect
        return
    child = subprocess.Popen(command)

    def end(*_):
        for pid in descendants(os.getpid()) or [child.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        os._exit(0)

    signal.signal(signal.SIGTERM, end)
    signal.signal(signal.SIGINT, end)
    child.wait()
    end()


if __name__ == "__main__":
    main(sys.argv[1:])
