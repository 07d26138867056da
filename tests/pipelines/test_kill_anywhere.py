"""[9] acceptance 2: SIGKILL at random points of DP-LDM, DPAgg-TI and DP-SGD TI runs, again and again
on the same folder; each restart resumes (or, with no checkpoint yet, starts over), and the run that
finally completes releases exactly what an unbroken run releases, with the same record. After every
kill the folder holds either the whole release or none of it: never some of its files.

Slow (about 10 minutes on 2 cores): python -m pytest -m slow tests/pipelines/test_kill_anywhere.py
Kills per method: PRIVDIFF_KILLS (default 20). Kill points are drawn from a seeded generator, spread
over the run from process start to release (imports, model build, steps, checkpoint and release
writes); torn writes at each rename are also covered one by one in tests/adversary/test_torn_checkpoints.py.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from privdiff.privacy.record import read_record

KILLS = int(os.environ.get("PRIVDIFF_KILLS", "20"))

CHILD = r"""
import sys, time
from pathlib import Path
from privdiff.training.checkpoint import has_checkpoint
method, out = sys.argv[1], Path(sys.argv[2])
byproducts = out / "byproducts-not-covered-by-dp"
# What a person does after a crash: the same command, with --resume once the run has left anything
# to resume from (a checkpoint, a staged release, or a finished one).
resume = has_checkpoint(byproducts) or (out / ".release-staging").exists() or any(out.glob("*.safetensors"))
print("ready", flush=True)
def progress(*args):
    print("step", flush=True)
if method == "dp-ldm":
    from privdiff.models.tiny import TinySpec, tiny_pipeline
    from privdiff.pipelines.dp_ldm import DPLDMConfig, train_dp_ldm
    config = DPLDMConfig(batch_size=4, physical_batch_size=4, epochs=3.0, secure_noise=False, num_samples=1,
                         clip_norm=0.1, learning_rate=1e-3, epsilon=8.0, checkpoint_every=1, num_items=16)
    train_dp_ldm(base=tiny_pipeline(spec=TinySpec(), seed=0), data="shapes", out=out,
                 config=config, resume=resume, progress=lambda info: info.phase == "training" and progress())
else:
    from privdiff.data import load_dataset
    from privdiff.models.tiny import TinySpec, tiny_pipeline
    from privdiff.pipelines import dp_ti
    data = load_dataset(data="style", num_items=6, seed=0)
    pipe = tiny_pipeline(spec=TinySpec(), seed=0)
    if method == "dpagg":
        config = dp_ti.DPAggConfig(token="<stripes>", init_word="circle", steps=6, batch_size=4, epsilon=1.0,
                                   secure_noise=False, checkpoint_every=1)
        dp_ti.train_dpagg_ti(base=pipe, data=data, out=out, config=config, resume=resume, progress=progress)
    else:
        config = dp_ti.DPSGDTIConfig(token="<stripes>", init_word="circle", epochs=3.0, batch_size=3, epsilon=4.0,
                                     secure_noise=False, checkpoint_every=1)
        dp_ti.train_dpsgd_ti(base=pipe, data=data, out=out, config=config, resume=resume, progress=progress)
print("done", flush=True)
"""

def _child(method, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, method, str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _released(out: Path) -> set[str]:
    return {p.name for p in out.glob("*") if p.is_file() and not p.name.startswith(".")}


def _weights(out: Path, method: str) -> dict:
    files = sorted(out.glob("*.safetensors"))
    return {f.name: load_file(str(f)) for f in files}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dp-ldm", "dpagg", "dp-sgd-ti"])
def test_random_kills_then_resume_release_what_an_unbroken_run_releases(tmp_path, method):
    straight = tmp_path / "straight"
    start = time.monotonic()
    done = _child(method, straight)
    log = done.communicate(timeout=600)[0]
    assert done.returncode == 0 and "done" in log, log[-3000:]
    duration = time.monotonic() - start
    expected = _weights(straight, method)
    release = _released(straight)
    assert expected, f"{method}: the unbroken run released no weights"

    rng = random.Random(f"kills-{method}")
    kills, rounds = 0, 0
    while kills < KILLS:  # rounds from scratch, each killed until a restart finishes, then checked
        rounds += 1
        out = tmp_path / f"killed-{rounds}"
        while True:
            child = _child(method, out)
            time.sleep(rng.uniform(0.2, duration))
            if child.poll() is not None:  # this restart finished (or failed) before its kill
                log = child.communicate()[0]
                assert child.returncode == 0, f"{method}: a restart failed:\n{log[-3000:]}"
                break
            child.send_signal(signal.SIGKILL)
            child.communicate()
            kills += 1
            present = _released(out) & release
            # All of the release or none of it. The one window between: a committed release whose
            # files were being moved in; its COMMIT file is there, and any next run completes it.
            committed = (out / ".release-staging" / "COMMIT").exists()
            assert present in (set(), release) or committed, f"{method}: partial release after kill {kills}: {present}"
        got = _weights(out, method)
        assert got.keys() == expected.keys()
        for name in expected:
            assert expected[name].keys() == got[name].keys()
            for key in expected[name]:
                assert torch.equal(expected[name][key], got[name][key]), \
                    f"{method}: {name}:{key} differs after round {rounds} ({kills} kills so far)"
            a, b = read_record(straight / name), read_record(out / name)
            assert (a.epsilon, a.delta, a.steps) == (b.epsilon, b.delta, b.steps), f"{method}: {name}'s record differs"
        assert rounds <= KILLS, f"{method}: {rounds} rounds for {kills} kills: the kills do not land"
    print(f"{method}: {kills} kills over {rounds} rounds, every round released what the unbroken run released")
