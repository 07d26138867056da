"""The engine under torchrun: two CPU processes on gloo take the same steps as one process,
with the noise added once per logical step (not once per rank)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(tmp_path, name, noise, backend, *, ranks):
    out = tmp_path / f"{name}.pt"
    logs = tmp_path / f"{name}-logs"
    if ranks == 1:
        command = [sys.executable, str(WORKER), str(out), str(noise), backend]
    else:
        # A port free now (not one derived from the pid, which two runs can share), and each rank's
        # output kept apart so that a failure says which rank failed and why.
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                   "--log-dir", str(logs), "--redirects", "3", str(WORKER), str(out), str(noise), backend]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    if done.returncode != 0:
        per_rank = "".join(f"\n--- {f.relative_to(logs)}\n{f.read_text()[-1500:]}" for f in sorted(logs.rglob("*.log")))
        raise AssertionError(f"{name}: exit {done.returncode}\n{done.stderr[-2000:]}{per_rank}")
    return torch.load(out)


# The opacus backend runs the same ranks through the same engine's noise; it is `slow` (25 s) to keep the
# default suite under 20 minutes: run it with -m slow.
@pytest.mark.parametrize("backend", ["privdiff", pytest.param("opacus", marks=pytest.mark.slow)])
def test_two_gloo_ranks_equal_one_process_noise_added_once(tmp_path, backend):
    single = _run(tmp_path, "single", 1.0, backend, ranks=1)
    double = _run(tmp_path, "double", 1.0, backend, ranks=2)
    for key in single:
        if key != "losses":
            assert torch.allclose(single[key], double[key], rtol=1e-5, atol=1e-6), key
    assert torch.allclose(single["losses"], double["losses"], rtol=1e-5, equal_nan=True)
    # Had each rank added its own noise, the update would carry sqrt(2) times the noise: different weights.
    noiseless = _run(tmp_path, "noiseless", 0.0, backend, ranks=1)
    assert not torch.allclose(noiseless["0.weight"], double["0.weight"], atol=1e-3)
