"""`privdiff audit mia`: the loss-threshold attack sees an overfit model's members, not the base model's."""

import json

import numpy as np
import pytest

from privdiff.cli import main
from privdiff.data import load_dataset
from privdiff.models.privdiff_tiny import load_privdiff_tiny
from privdiff.pipelines.membership import MembershipAuditConfig, diffusion_losses


def test_every_example_gets_the_same_draws():
    pipe = load_privdiff_tiny()
    data = load_dataset(data="shapes", num_items=3, seed=0)
    config = MembershipAuditConfig(timesteps=(50, 400), noise_draws=1, batch_size=2)
    forward = diffusion_losses(pipeline=pipe, dataset=data, indices=[0, 1, 2], config=config)
    backward = diffusion_losses(pipeline=pipe, dataset=data, indices=[2, 1, 0], config=config)
    assert np.allclose(forward, backward[::-1], rtol=1e-5)
    with pytest.raises(ValueError, match="below 1000"):
        diffusion_losses(pipeline=pipe, dataset=data, indices=[0], config=MembershipAuditConfig(timesteps=(1000,)))


def test_overfit_model_exposes_its_members_and_the_base_does_not(tmp_path):
    # Digits, which privdiff-tiny 2 never saw, and the whole UNet: 40 steps on the same 8 images
    # memorise them (attention alone at this rate does not, on a base this broad).
    run = tmp_path / "run"
    assert main(["train", "dp-ldm", "--base", "tiny", "--data", "digits", "--num-items", "8", "--no-dp",
                 "--epochs", "40", "--batch-size", "8", "--physical-batch-size", "8", "--learning-rate", "1e-3", "--trainable", "full",
                 "--sample-prompt", "a handwritten digit 3", "--out", str(run)]) == 0
    audits = {}
    for name, weights in (("tuned", ["--weights", str(run)]), ("base", [])):
        out = tmp_path / name
        assert main(["audit", "mia", "--base", "tiny", "--data", "digits", "--num-members", "8",
                     "--out", str(out), *weights]) == 0
        audits[name] = json.loads((out / "membership-audit.not-covered-by-dp.json").read_text())
        assert "NOT covered" in audits[name]["not_covered_by_dp"] and audits[name]["num_nonmembers"] == 8
    assert audits["tuned"]["auc"] >= 0.65 and audits["tuned"]["auc"] >= audits["base"]["auc"] + 0.2, \
        {k: v["auc"] for k, v in audits.items()}


def test_a_folder_needs_its_held_out_images(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    code = main(["audit", "mia", "--base", "tiny", "--data", str(tmp_path / "imgs"), "--num-members", "4",
                 "--out", str(tmp_path / "out")])
    assert code == 2 and "--nonmember-data" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
