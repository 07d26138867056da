"""[9] acceptance 3: the disk fills during training and during the release of a DP-LDM run (a small
tmpfs, its free space set by a ballast file). The run stops with a clear OSError, keeps its last good
checkpoint and shows no partial release; once space is freed, the same call with resume=True ends
exactly like an unbroken run (same weights, same record).

Slow (about two minutes): python -m pytest -m slow tests/pipelines/test_full_disk.py. Needs root to
mount a tmpfs (skipped with the reason otherwise).
"""

import dataclasses
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from privdiff.pipelines.dp_ldm import BYPRODUCTS, DPLDMConfig, train_dp_ldm
from privdiff.privacy.record import read_record
from privdiff.training.checkpoint import CHECKPOINT_FILE, has_checkpoint

CONFIG = DPLDMConfig(batch_size=4, physical_batch_size=4, epochs=2.0, secure_noise=False, num_samples=1,
                     clip_norm=0.1, learning_rate=1e-3, epsilon=8.0, checkpoint_every=2)


def _base():
    from privdiff.models.tiny import TinySpec, tiny_pipeline

    pipe = tiny_pipeline(spec=TinySpec(), seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _train(out, config=CONFIG, **kwargs):
    return train_dp_ldm(base=_base(), data="shapes", out=out, config=dataclasses.replace(config, num_items=16), **kwargs)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'}); run as root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _leave_free(disk: Path, free_bytes: int) -> Path:
    """Fill the disk with a ballast file so that about `free_bytes` stay free."""
    ballast = disk / "ballast"
    stat = os.statvfs(disk)
    available = stat.f_bavail * stat.f_frsize + (ballast.stat().st_size if ballast.exists() else 0)
    size = max(0, available - free_bytes)
    with open(ballast, "wb") as handle:
        handle.truncate(0)
        chunk = b"\0" * (1 << 20)
        while size > 0:
            handle.write(chunk[:min(size, len(chunk))])
            size -= min(size, len(chunk))
    return ballast


def _sizes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
@pytest.mark.parametrize("when", ["training", "release"])
def test_a_full_disk_stops_cleanly_and_resume_ends_like_an_unbroken_run(tmp_path, small_disk, when, monkeypatch):
    straight = _train(tmp_path / "straight", config=dataclasses.replace(CONFIG, keep_byproducts=True))
    checkpoint = (tmp_path / "straight" / BYPRODUCTS / CHECKPOINT_FILE).stat().st_size
    release = _sizes(tmp_path / "straight") - _sizes(tmp_path / "straight" / BYPRODUCTS)
    out = small_disk / "run"
    # training: room for one checkpoint and the out folder, not for a second beside it (writes are
    # atomic: the new one is written in full before the old one goes). release: room for the
    # checkpoints, not for the release's files.
    if when == "training":
        ballast = _leave_free(small_disk, int(1.5 * checkpoint))
    else:  # the disk fills as the release starts (the final checkpoint is written by then)
        from privdiff.training import release as release_module

        ballast, enter = small_disk / "ballast", release_module.Release.__enter__

        def filling(self):
            staging = enter(self)
            _leave_free(small_disk, release // 2)
            return staging

        monkeypatch.setattr(release_module.Release, "__enter__", filling)
    with pytest.raises(OSError) as stopped:
        _train(out)
    monkeypatch.undo()
    message = str(stopped.value)
    assert "could not be written" in message and "free space" in message and "resume" in message, message
    assert has_checkpoint(out / BYPRODUCTS), "the last good checkpoint must survive a full disk"
    assert not list(out.glob("*.safetensors")) and not (out / ".release-staging").exists(), "no partial release"

    ballast.unlink()  # space is freed
    resumed = _train(out, resume=True)
    a, b = load_file(str(straight.files["diffusers"])), load_file(str(resumed.files["diffusers"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = read_record(straight.files["diffusers"]), read_record(resumed.files["diffusers"])
    assert (ra.epsilon, ra.steps) == (rb.epsilon, rb.steps)
