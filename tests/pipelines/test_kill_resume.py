"""A DP-LDM run killed with SIGKILL (no chance to clean up) resumes from its last checkpoint and
ends with the same weights and ε as a run that was never interrupted.

Slow: python -m pytest -m slow tests/pipelines/test_kill_resume.py
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from privdiff.pipelines.dp_ldm import BYPRODUCTS, DPLDMConfig, train_dp_ldm
from privdiff.privacy.record import read_record
from privdiff.training.checkpoint import load_checkpoint

CONFIG = dict(batch_size=4, physical_batch_size=4, epochs=2.0, secure_noise=False, num_samples=1,
              clip_norm=0.1, learning_rate=1e-3, epsilon=8.0, checkpoint_every=2)
CHILD = """
import sys, time
from privdiff.models.tiny import TinySpec, tiny_pipeline
from privdiff.pipelines.dp_ldm import DPLDMConfig, train_dp_ldm
config = DPLDMConfig(**{config!r}, num_items=16)
def progress(info):
    if info.phase != "training":
        return
    print("step", info.step, flush=True)
    time.sleep(1.5)  # leaves time to kill the run between checkpoints
train_dp_ldm(base=tiny_pipeline(spec=TinySpec(), seed=0), data="shapes", out=sys.argv[1],
             config=config, progress=progress)
"""


def _base():
    from privdiff.models.tiny import TinySpec, tiny_pipeline

    pipe = tiny_pipeline(spec=TinySpec(), seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow  # about a minute: a child process, a kill, then two runs
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    killed = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(config=CONFIG), str(killed)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    def saved_step():
        try:
            return load_checkpoint(folder=killed / BYPRODUCTS, kind="dp-ldm", fingerprint=None).state["step"]
        except ValueError:  # none yet
            return 0

    deadline = time.time() + 600
    while time.time() < deadline and child.poll() is None:
        if saved_step() >= 2:
            break
        time.sleep(0.2)
    assert child.poll() is None, f"the run ended before it could be killed: {child.stderr.read()[-2000:]}"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    step_at_kill = saved_step()
    assert 2 <= step_at_kill < 8 and not list(killed.glob("*.safetensors")), "nothing released before the end"

    resumed = train_dp_ldm(base=_base(), data="shapes", out=killed, config=DPLDMConfig(**CONFIG, num_items=16), resume=True)
    straight = train_dp_ldm(base=_base(), data="shapes", out=tmp_path / "straight", config=DPLDMConfig(**CONFIG, num_items=16))
    a, b = load_file(str(straight.files["diffusers"])), load_file(str(resumed.files["diffusers"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_record(resumed.files["diffusers"]).epsilon == pytest.approx(read_record(straight.files["diffusers"]).epsilon)
    assert not (killed / BYPRODUCTS).exists()
