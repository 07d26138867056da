"""Flower's simulation, entered the way Flower supports it (`flwr run`, not the deprecated
`run_simulation`): a SuperLink in simulation mode started as a child on a free loopback port, the
privdiff-fed app run against it with `flwr run <app> <connection> --stream`, and the SuperLink stopped
when the run ends, however it ends.

Everything Flower writes (its `config.toml` connection, the installed app bundle, its state) lives in a
private FLWR_HOME that is deleted afterwards: nothing is written to the user's `~/.flwr`. No Flower
process outlives the run: the SuperLink runs under `process_guard.py`, which kills it and everything
below it (SuperExec, the simulation process, Ray's workers, which live in sessions of their own) when
the run ends, fails or is interrupted, and when this process dies, even by SIGKILL. The
streamed log is a by-product (it carries the clients' losses): it stays in the run's by-products
folder with the rest.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

APP = Path(__file__).resolve().parent / "privdiff-fed"
GUARD = Path(__file__).resolve().parent / "process_guard.py"
_STARTUP_SECONDS = 60.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _parent_death_signal():
    """A function for `flwr run` to call before it runs, so that it ends when this process ends, even
    by SIGKILL (Linux's PR_SET_PDEATHSIG); None elsewhere. libc is opened here, not in the forked child."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGKILL)


def _environment(home: Path) -> dict:
    from .fedavg import QUIET_ENVIRONMENT

    # Flower's console scripts beside this Python, whether or not its environment is activated
    # (ComfyUI is often started as venv/bin/python without it).
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, **QUIET_ENVIRONMENT, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PATH": path, "PYTHONUNBUFFERED": "1"}


def _connection(*, port: int) -> str:
    """The one `config.toml` connection `flwr run` uses: our SuperLink."""
    return (f'[superlink]\ndefault = "privdiff-simulation"\n\n[superlink.privdiff-simulation]\n'
            f'address = "127.0.0.1:{port}"\ninsecure = true\n')


def federation_config(*, num_clients: int, verbose: bool) -> str:
    """`flwr run --federation-config`: one SuperNode per client, one CPU each (privdiff's clients set
    torch to one thread); the clients' own output reaches the log only with `verbose`."""
    return (f"num-supernodes={int(num_clients)} client-resources-num-cpus=1 client-resources-num-gpus=0.0 "
            f"init-args-log-to-driver={'true' if verbose else 'false'}")


@contextmanager
def simulation_superlink(*, num_clients: int, verbose: bool = False) -> Iterator["SimulationLink"]:
    """A SuperLink in simulation mode on a free loopback port, with its private FLWR_HOME; stopped and
    deleted on leaving, whatever happened inside. It is starting on entry (`run` waits for it)."""
    with tempfile.TemporaryDirectory(prefix="privdiff-flwr-") as folder:
        home = Path(folder)
        port = _free_port()
        (home / "config.toml").write_text(_connection(port=port))
        env = _environment(home)
        log = open(home / "superlink.log", "wb")
        process = subprocess.Popen(  # under the guard: nothing Flower starts outlives it
            [sys.executable, str(GUARD), "flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
             "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            yield SimulationLink(home=home, port=port, env=env, process=process,
                                 federation=federation_config(num_clients=num_clients, verbose=verbose))
        finally:
            _stop(process, seconds=10)  # the guard kills the SuperLink and everything under it at once
            log.close()


def _stop(process: subprocess.Popen, *, seconds: float = 15) -> None:
    """SIGTERM, then SIGKILL after `seconds`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


class SimulationLink:
    """A started simulation SuperLink: `run` submits an app to it and streams the run's log."""

    def __init__(self, *, home: Path, port: int, env: dict, process: subprocess.Popen, federation: str):
        self.home, self.port, self.env, self.process, self.federation = home, port, env, process, federation

    def wait_until_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + _STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Flower's SuperLink did not start (exit code {self.process.returncode}):\n"
                                   + self.log_tail(self.home / "superlink.log"))
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=0.5).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"Flower's SuperLink did not answer within {_STARTUP_SECONDS:.0f} s:\n"
                           + self.log_tail(self.home / "superlink.log"))

    def run(self, *, app: Path, run_config: dict, log: Path, echo: Callable[[str], None] | None = None,
            finished: Callable[[], bool] | None = None) -> int:
        """`flwr run app --stream` with `run_config` overriding the app's own; every streamed line goes
        to `log` (and to `echo`, without colour codes). `finished()` is asked after each line: once it
        holds, the results are on disk and Flower's own wind-down (its summary, Ray's shutdown) is not
        waited for. Returns the command's exit code (0 when ended that way)."""
        import tomli_w

        self.wait_until_ready()
        overrides = self.home / "run-config.toml"
        overrides.write_text(tomli_w.dumps(run_config))
        command = ["flwr", "run", str(app), "privdiff-simulation", "--stream", "--run-config", str(overrides),
                   "--federation-config", self.federation]
        with open(log, "a", encoding="utf-8") as written, subprocess.Popen(
                command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                text=True, errors="replace", cwd=self.home, preexec_fn=_parent_death_signal()) as process:
            try:
                for line in process.stdout:
                    written.write(line)
                    written.flush()
                    if echo is not None:
                        echo(_ANSI.sub("", line.rstrip("\n")))
                    if finished is not None and finished():
                        process.kill()  # only Flower's summary and wind-down are left
                        return 0
            except BaseException:
                process.kill()
                raise
            return process.wait()

    @staticmethod
    def log_tail(path: Path, lines: int = 20) -> str:
        try:
            return "\n".join(_ANSI.sub("", path.read_text(errors="replace")).splitlines()[-lines:])
        except FileNotFoundError:
            return ""
