"""[8] defect 8: a crash in the middle of a checkpoint write must never let a resumed run under-record ε.

privdiff 0.1 wrote DP-LDM's checkpoint as two files renamed one after the other: killed between the
renames, it paired step-2k weights, optimizer and generators with the step-k counter and accountant,
and `resume` trained on silently, so the release recorded fewer noisy steps than it took. Here a
crash is injected at every rename a run makes (an exception raised from os.replace, as a kill would
stop it there); each resume must either end exactly where an unbroken run ends (same weights, same
record) or refuse with a clear message.
"""

import os
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from privdiff.pipelines.dp_ldm import BYPRODUCTS, DPLDMConfig, train_dp_ldm
from privdiff.privacy.record import read_record

CONFIG = DPLDMConfig(epsilon=3.0, batch_size=4, physical_batch_size=4, epochs=1.0, secure_noise=False, num_samples=0,
                     clip_norm=0.1, learning_rate=1e-3, checkpoint_every=1)


class Killed(BaseException):
    """Stands for a kill: nothing in privdiff catches it."""


def _base():
    from privdiff.models.tiny import TinySpec, tiny_pipeline

    pipe = tiny_pipeline(spec=TinySpec(), seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _train(out, **kwargs):
    return train_dp_ldm(base=_base(), data="shapes", out=out, config=replace(CONFIG, num_items=16), **kwargs)


def _killed_at_rename(monkeypatch, crash_at: int, run, *, only=lambda destination: True):
    """Run `run()` with a kill at the `crash_at`-th os.replace whose destination `only` accepts."""
    real, seen = os.replace, {"n": 0}

    def crashing(src, dst):
        if only(str(dst)):
            seen["n"] += 1
            if seen["n"] == crash_at:
                raise Killed()
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crashing)
    with pytest.raises(Killed):
        run()
    monkeypatch.setattr(os, "replace", real)


def test_a_crash_inside_any_checkpoint_write_never_under_records_epsilon(tmp_path, monkeypatch):
    real = os.replace
    renames = []  # the checkpoint renames an unbroken run makes

    def counting(src, dst):
        if BYPRODUCTS in str(dst):
            renames.append(dst)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", counting)
    straight = _train(tmp_path / "straight")
    monkeypatch.setattr(os, "replace", real)
    reference = load_file(str(straight.files["diffusers"]))
    reference_record = read_record(straight.files["diffusers"])
    assert len(renames) >= 2
    for crash_at in range(1, len(renames) + 1):
        out = tmp_path / f"crash-{crash_at}"
        _killed_at_rename(monkeypatch, crash_at, lambda: _train(out), only=lambda destination: BYPRODUCTS in destination)
        try:
            resumed = _train(out, resume=True)
        except (ValueError, FileNotFoundError) as refusal:  # a clear refusal is allowed, a wrong record is not
            assert "checkpoint" in str(refusal)
            continue
        weights = load_file(str(resumed.files["diffusers"]))
        record = read_record(resumed.files["diffusers"])
        assert record.steps == reference_record.steps and record.epsilon == pytest.approx(reference_record.epsilon), \
            f"crash at rename {crash_at}: the release records {record.steps} steps, ε = {record.epsilon}"
        assert all(torch.equal(weights[k], reference[k]) for k in reference), \
            f"crash at rename {crash_at}: the resumed run's weights differ from an unbroken run's"


def test_a_split_server_killed_inside_a_checkpoint_write_trains_no_batch_twice(tmp_path, monkeypatch):
    """The split job's checkpoint was two files too: tensors renamed before the JSON of applied batch
    ids, so a kill between them restarted with step-k weights and a stale set, and a re-sent batch was
    trained again. Crash at every rename of a job that checkpoints after each batch; restart from the
    folder; the client re-sends everything: each batch is trained exactly once."""
    import copy

    from privdiff.models.tiny import TinySpec, tiny_pipeline
    from privdiff.pipelines.split_client import SplitConfig, client_payload
    from privdiff.pipelines.split_server import SplitJob, SplitTrainer
    from privdiff.privacy.split_secret import ClientSecret
    from privdiff.transport.codec import Message

    pipe = tiny_pipeline(spec=TinySpec(), seed=0)
    secret = ClientSecret(bytes(32))
    ids = [secret.image_id(bytes([i])) for i in range(2)]
    pixels = torch.zeros(2, 3, 64, 64)
    messages = [Message(kind="batch", fields={"batch_id": f"b{k}"}, tensors=client_payload(
        pipeline=pipe, pixels=pixels + k / 10, hint_pixels=pixels, image_ids=ids, epoch=k, config=SplitConfig(),
        secret=secret)) for k in range(4)]

    def job():
        return SplitJob(trainer=SplitTrainer(unet=copy.deepcopy(pipe.unet), learning_rate=1e-3))

    def run(folder, start=None):
        from privdiff.training.checkpoint import has_checkpoint

        server = job()
        if start is not None and has_checkpoint(folder, name="job.safetensors"):  # as `privdiff split serve` does
            server.load_checkpoint(folder)
        for message in messages:
            server("client-key", message)
            server.save_checkpoint(folder)
        return server

    straight = run(tmp_path / "straight")
    for crash_at in range(1, 5):  # privdiff 0.1 renamed twice per save: 2 and 4 fell between a pair
        folder = tmp_path / f"crash-{crash_at}"
        _killed_at_rename(monkeypatch, crash_at, lambda: run(folder))
        restarted = run(folder, start=True)  # the client re-sends every batch after the restart
        assert restarted.trainer.steps == 4 == straight.trainer.steps, f"crash at rename {crash_at}"
        for key, value in straight.trainer.controlnet.state_dict().items():
            assert torch.equal(restarted.trainer.controlnet.state_dict()[key], value), (crash_at, key)
