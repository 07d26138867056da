"""README.md's shell blocks, executed as written (slow: as written they train for real, about an hour of
CPU in all). The default suite parses every `privdiff` line of them (`test_readme.py`); this runs them.

Each block runs with bash in its own scratch folder (holding a link to the repository's `federated/`, which
the README names relative to the repository's root), stopping at the first failing line. The first block
is CI's own (install, demo) and runs there. A line that starts a server (`privdiff split serve`, "on the
GPU server") runs in the background, as on another machine, and is stopped when the block ends; so is
any SuperLink that Flower's own CLI leaves running, found by the private FLWR_HOME the block runs with.
"""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"
SHELL_BLOCKS = re.findall(r"^```bash\n(.*?)^```", README.read_text(), flags=re.MULTILINE | re.DOTALL)[1:]


def _as_script(block: str) -> str:
    lines = []
    for line in block.splitlines():
        command = line.split("  #")[0].rstrip()
        if re.search(r"\bprivdiff split serve\b", command):
            command += " &\nsleep 2"  # the server, as on its own machine
        lines.append(command)
    return "set -euo pipefail\n" + "\n".join(lines) + "\n"


def _processes_with(variable: str, value: str) -> list[int]:
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"{variable}={value}".encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except (OSError, ValueError):
            continue
    return [pid for pid in found if pid != os.getpid()]


def test_the_shell_blocks_are_the_readme_sections_they_claim():
    assert len(SHELL_BLOCKS) >= 4
    assert any("train dp-ldm" in b for b in SHELL_BLOCKS) and any("fed simulate" in b for b in SHELL_BLOCKS)


@pytest.mark.parametrize("index", range(len(SHELL_BLOCKS)))
def test_every_shell_block_in_the_readme_runs_as_written(index, tmp_path):
    script = tmp_path / "block.sh"
    script.write_text(_as_script(SHELL_BLOCKS[index]))
    # The README's commands run from the repository's root: what they name there (the Flower app) is here.
    (tmp_path / "federated").symlink_to(README.parent / "federated", target_is_directory=True)
    flower_home = str(tmp_path / "flwr-home")
    env = {**os.environ, "FLWR_HOME": flower_home, "PRIVDIFF_README_BLOCK": str(index)}
    started = time.monotonic()
    with open(tmp_path / "block.log", "w") as log:
        block = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            code = block.wait(timeout=3 * 3600)
        finally:
            for pid in _processes_with("FLWR_HOME", flower_home) + [block.pid]:
                try:
                    os.killpg(pid, signal.SIGTERM) if pid == block.pid else os.kill(pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
    text = (tmp_path / "block.log").read_text(errors="replace")
    print(f"README shell block {index + 2}: {time.monotonic() - started:.0f} s")
    assert code == 0, f"README shell block {index + 2} failed (exit {code}):\n{SHELL_BLOCKS[index]}\n...\n{text[-4000:]}"
    assert "Traceback" not in text, text[-4000:]
