"""What the federated tests share: a look at the Flower and Ray processes on this machine."""

import time
from pathlib import Path

import pytest

FLOWER_PROCESSES = ("flower-superlink", "flower-superexec", "flwr-simulation", "flwr run", "raylet", "gcs_server",
                    "ray::")


def _flower_processes() -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(name in command for name in FLOWER_PROCESSES):
            found.append(command.strip())
    return found


@pytest.fixture
def flower_processes():
    """`flower_processes(wait=0)`: command lines of the Flower and Ray processes still running after
    waiting up to `wait` seconds for them to end (Linux: read from /proc)."""
    def running(*, wait: float = 0.0) -> list[str]:
        deadline = time.monotonic() + wait
        while _flower_processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        return _flower_processes()

    return running
