"""privdiff commands in child processes: what a GUI (ComfyUI) starts, watches and stops.

ComfyUI runs one workflow at a time, so a split-learning server that must keep answering, or a
Flower simulation with its own Ray workers, runs as a `privdiff ...` command in its own process
group. The child imports this very package by its location, so it works whatever the custom-node
folder is called and whether or not privdiff is pip-installed. Its output goes to a log file, whose
tail is what an error message shows.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]

# Imports the package at PACKAGE_ROOT under the name `privdiff` and runs its command line.
_LAUNCHER = (
    "import importlib.util, sys\n"
    "root = sys.argv[1]\n"
    "spec = importlib.util.spec_from_file_location('privdiff', root + '/__init__.py', submodule_search_locations=[root])\n"
    "module = importlib.util.module_from_spec(spec); sys.modules['privdiff'] = module; spec.loader.exec_module(module)\n"
    "from privdiff.cli import main\n"
    "raise SystemExit(main(sys.argv[2:]))\n"
)

_RUNNING: dict[str, "ChildCommand"] = {}


class ChildCommand:
    """One `privdiff` command running in its own process group, logging to `log`."""

    def __init__(self, *, name: str, argv: list[str], log: Path, process: subprocess.Popen):
        self.name, self.argv, self.log, self.process = name, list(argv), Path(log), process

    @classmethod
    def start(cls, *, name: str, argv: list[str], log: str | os.PathLike, threads: int | None = None) -> "ChildCommand":
        """Start `privdiff <argv>`; `name` identifies it (one running child per name)."""
        current = _RUNNING.get(name)
        if current is not None and current.running():
            raise RuntimeError(f"a privdiff job named {name!r} is already running (pid {current.process.pid}); "
                               "stop it first or use another name.")
        log = Path(log)
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        with open(log, "ab") as output:
            process = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(PACKAGE_ROOT), *argv],
                                       stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, start_new_session=True)  # its own group: stop() reaches Ray's workers
        child = cls(name=name, argv=argv, log=log, process=process)
        _RUNNING[name] = child
        return child

    @staticmethod
    def find(name: str) -> "ChildCommand | None":
        """The running child of that name, if any."""
        child = _RUNNING.get(name)
        return child if child is not None and child.running() else None

    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, *, grace_seconds: float = 20.0) -> int | None:
        """Ask politely (SIGINT: the commands checkpoint and exit), then end the whole group."""
        if self.running():
            self._signal_group(signal.SIGINT)
            try:
                self.process.wait(timeout=grace_seconds)
            except subprocess.TimeoutExpired:
                pass
        # Whatever the child left behind (Ray's workers) goes too.
        self._signal_group(signal.SIGKILL)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if _RUNNING.get(self.name) is self:
            del _RUNNING[self.name]
        return self.returncode

    def _signal_group(self, sig) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, *, poll, should_stop=None, interval: float = 0.5, grace_seconds: float = 20.0) -> bool:
        """Call `poll()` every `interval` seconds until the child exits (True) or `should_stop()` holds
        (the child is stopped, given `grace_seconds` to checkpoint; False)."""
        try:
            while self.running():
                poll()
                if should_stop is not None and should_stop():
                    self.stop(grace_seconds=grace_seconds)
                    return False
                time.sleep(interval)
            poll()
        except BaseException:
            # e.g. ComfyUI's progress bar raising on the stop button: the child must not outlive the wait.
            self.stop(grace_seconds=grace_seconds)
            raise
        return True

    def raise_if_failed(self, what: str) -> None:
        if self.returncode not in (0, None):
            raise RuntimeError(f"{what} failed (exit code {self.returncode}); the end of its log {self.log}:\n"
                               f"{self.log_tail()}")


@atexit.register
def _stop_children() -> None:
    # A child outliving the GUI would hold ports and CPUs with nobody to stop it.
    for child in list(_RUNNING.values()):
        child.stop(grace_seconds=5.0)
