"""A federated simulation as a GUI runs it: `privdiff fed simulate` in a child process, stopped after a
round, resumed, and released as weight files with a client-level DP record."""

import time

import pytest

from privdiff.federated.fedavg import FederatedConfig
from privdiff.pipelines.background import ChildCommand
from privdiff.pipelines.federated_run import train_federated

CONFIG = FederatedConfig(data="digits", num_items=32, heldout_items=16, num_clients=2, rounds=2, batch_size=16,
                         learning_rate=1e-3, client_noise_multiplier=1.0, client_clip_norm=0.1)


@pytest.fixture(scope="module")
def tiny():
    from privdiff.models.loading import load_pipeline

    return load_pipeline(base="tiny")


def test_resume_needs_a_run_and_the_same_settings(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="no federated run to continue"):
        train_federated(base=tiny, data="digits", config=CONFIG, out=tmp_path / "none", resume=True)
    from dataclasses import replace

    import torch

    from privdiff.federated.fedavg import round_record, save_round

    # A finished round of this federation: its settings travel in the global model's record.
    config = replace(CONFIG, base=str(tmp_path / "run" / "base"))
    save_round(out=tmp_path / "run" / "federation", round_number=1, parameters={"x": torch.zeros(1)},
               record=round_record(config=config, rounds=1, partition_sizes=[16, 16]))
    with pytest.raises(ValueError, match="other settings.*learning_rate"):
        train_federated(base=tiny, data="digits", config=replace(CONFIG, learning_rate=1e-2), out=tmp_path / "run",
                        resume=True)


def test_a_failing_child_raises_with_the_end_of_its_log(tmp_path):
    child = ChildCommand.start(name="bad", argv=["fed", "simulate", "--data", "no-such-set", "--out", str(tmp_path)],
                               log=tmp_path / "log.txt")
    assert child.wait(poll=lambda: None) is True
    with pytest.raises(RuntimeError, match="no-such-set"):
        child.raise_if_failed("the simulation")


def test_stop_button_ends_the_child_group_quickly(tmp_path):
    started = time.monotonic()
    child = ChildCommand.start(name="sleeper", argv=["fed", "simulate", "--out", str(tmp_path / "f"), "--rounds", "50"],
                               log=tmp_path / "log.txt")
    stop_at = time.monotonic() + 3
    assert child.wait(poll=lambda: None, should_stop=lambda: time.monotonic() > stop_at, grace_seconds=2) is False
    assert not child.running() and ChildCommand.find("sleeper") is None
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_stopped_run_resumes_and_releases_the_global_model_with_its_client_level_record(tiny, tmp_path):
    import dp_accounting
    import torch
    from dp_accounting import pld
    from safetensors.torch import load_file

    from privdiff.federated.fedavg import initial_parameters
    from privdiff.models.loading import load_pipeline
    from privdiff.privacy.record import read_record

    seen = []
    stopped = train_federated(base=tiny, data="digits", config=CONFIG, out=tmp_path, progress=seen.append,
                                       should_stop=lambda: bool(seen) and seen[-1].step >= 1)
    assert stopped.stopped and stopped.figures["rounds_done"] == 1 and not stopped.files
    assert seen[-1].unit == "round" and seen[-1].epsilon == pytest.approx(CONFIG.client_level_epsilon(rounds=1))
    done = train_federated(base=tiny, data="digits", config=CONFIG, out=tmp_path, resume=True)
    assert not done.stopped and done.figures["rounds_done"] == 2

    independent = pld.PLDAccountant()
    independent.compose(dp_accounting.GaussianDpEvent(1.0), 2)
    for path in done.files.values():
        record = read_record(path)
        assert record.mechanism == "dp-fedavg" and record.privacy_unit == "client"
        assert record.epsilon == pytest.approx(independent.get_epsilon(record.delta), rel=0.05)
    # base + released difference == the global model of the last round, value for value
    diffs = load_file(str(done.files["diffusers"]))
    start = initial_parameters(CONFIG, load_pipeline(base="tiny"))
    final = load_file(str(tmp_path / "federation" / "global-round-2.safetensors"))
    assert diffs and all(torch.allclose(start[f"unet.{k}"] + v, final[f"unet.{k}"], atol=1e-6) for k, v in diffs.items())
    assert any(v.abs().max() > 0 for v in diffs.values())
    assert done.figures["loss_chart"] is not None  # shown in the node, never written with the release
    assert not (tmp_path / "federation" / "byproducts-not-covered-by-dp").exists()
    # The release loads the way a DP-LDM output does, global model and record included.
    from privdiff.pipelines import DPLDMPipeline

    loaded = DPLDMPipeline.from_fine_tune(base="tiny", weights=tmp_path)
    assert loaded.privacy_record.mechanism == "dp-fedavg"
    tuned = dict(loaded.unet.named_parameters())
    assert all(torch.allclose(tuned[k], final[f"unet.{k}"], atol=1e-6) for k in diffs)
