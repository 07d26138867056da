"""A split job as a GUI runs it: a local server in a child process, a client that stops and resumes,
the released one-file ControlNet (weights, config, record), the attack audit, and the preview a user
sees before sending anything (exactly the messages training would send, and the server's best
reconstruction from them, with the audit's figures for the same secret)."""

import dataclasses

import numpy as np
import pytest
import torch

from privdiff.pipelines.split_attacks import server_view
from privdiff.pipelines.split_client import split_tensors
from privdiff.pipelines.split_controlnet import SplitConfig
from privdiff.pipelines.split_run import (SplitTrainConfig, audit_split_training, load_split_controlnet_file,
                                          start_split_server, stop_split_server, train_split_controlnet)
from privdiff.privacy.split_secret import ClientSecret


@pytest.fixture(scope="module")
def tiny():
    from privdiff.models.loading import load_pipeline

    return load_pipeline(base="tiny")


@pytest.fixture(scope="module")
def circles():
    from privdiff.data import load_dataset

    return load_dataset(data="circles", num_items=8, seed=0)


def test_client_stops_resumes_and_releases_a_split_controlnet_that_loads_with_its_record(tiny, circles, tmp_path):
    from privdiff.pipelines.background import ChildCommand
    from privdiff.privacy.record import read_record

    connection = start_split_server(base_pipeline=tiny, out=tmp_path / "server", learning_rate=1e-4)
    try:
        assert start_split_server(base_pipeline=tiny, out=tmp_path / "server") == connection  # reused, not restarted
        sent = []
        config = SplitTrainConfig(connection=connection, privacy=SplitConfig(), epochs=2, batch_size=2)
        stopped = train_split_controlnet(base=tiny, data=circles, out=tmp_path / "client", config=config,
                                         progress=sent.append, should_stop=lambda: len(sent) >= 2)
        # A stop makes no new batch; the ones already on their way (a window of 4) are still trained.
        assert stopped.stopped and not stopped.files and 2 <= stopped.figures["steps"] < 8
        assert stopped.figures["steps"] == len(sent) and sent[-1].total == 8 and sent[-1].unit == "batch"
        done = train_split_controlnet(base=tiny, data=circles, out=tmp_path / "client",
                                      config=dataclasses.replace(config, stop_server=True))
    finally:
        stop_split_server(connection)
    # The batches sent before the stop were acknowledged, not trained again: 8 steps in all.
    assert not done.stopped and done.figures["steps"] == 8 and done.record == read_record(done.files["controlnet"])
    assert ChildCommand.find(connection.process_name) is None  # stop_server ended the child
    record = read_record(done.files["controlnet"])
    assert record.mechanism == "split-hardened" and record.steps == 8 and record.num_examples == 8
    assert record.extra["settings"]["snr_bound"] == SplitConfig().snr_bound
    loaded = load_split_controlnet_file(done.files["controlnet"])
    assert loaded.latent_scale == tiny.vae.config.scaling_factor
    controlnet = loaded.controlnet
    assert controlnet.config.conditioning_channels == tiny.unet.config.in_channels
    assert any(p.abs().max() > 0 for n, p in controlnet.named_parameters() if "zero_conv" in n or "controlnet_down" in n)
    # the released file is a diffusers pipeline away, its record with it
    from privdiff.pipelines import SplitControlNetPipeline

    pipeline = SplitControlNetPipeline.from_split_file(base=tiny, controlnet_file=done.files["controlnet"])
    assert pipeline.privacy_record == record
    assert all(torch.equal(a, b) for a, b in zip(pipeline.controlnet.state_dict().values(),
                                                 controlnet.state_dict().values()))


def test_a_file_without_the_split_config_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "stock.safetensors"))
    with pytest.raises(ValueError, match="not a privdiff split ControlNet"):
        load_split_controlnet_file(tmp_path / "stock.safetensors")


def test_audit_shows_paper_mode_leaks_and_hardened_does_not(tiny, circles, tmp_path):
    paper, _ = audit_split_training(pipeline=tiny, dataset=circles, config=SplitConfig(mode="paper"), epochs=1,
                                    batch_size=4, folder=tmp_path / "p", optimisation_steps=0)
    hardened, steps = audit_split_training(pipeline=tiny, dataset=circles, config=SplitConfig(), epochs=1,
                                           batch_size=4, folder=tmp_path / "h", optimisation_steps=0)
    assert steps == 2
    assert paper.image_psnr > 40  # the reference design gives every image away
    assert hardened.image_psnr < hardened.mean_image_psnr + 3


@pytest.mark.parametrize("config", [SplitConfig(), SplitConfig(sigma_hint=1.0, draws_per_image=None)],
                         ids=["default", "hint-noise-fresh-draws"])
def test_the_view_is_what_training_sends_and_its_figures_are_the_audits(tiny, circles, tmp_path, config):
    secret = ClientSecret(bytes(range(32)))  # the test's fixed secret; a user's comes from the OS
    pixels, hints = split_tensors(circles)
    view = server_view(pipeline=tiny, pixels=pixels, hint_pixels=hints, config=config, secret=secret, epochs=2)
    report, _ = audit_split_training(pipeline=tiny, dataset=circles, config=config, epochs=2, batch_size=4,
                                     folder=tmp_path, optimisation_steps=0, secret=secret)
    assert view.report.image_psnr == pytest.approx(report.image_psnr, abs=1e-9)  # the very same messages
    assert view.report.hint_psnr == pytest.approx(report.hint_psnr, abs=1e-9)
    assert view.report.mean_image_psnr == pytest.approx(report.mean_image_psnr, abs=1e-6)
    assert view.images.shape == pixels.shape and view.hints.shape == pixels.shape
    assert 0 <= float(view.images.min()) and float(view.images.max()) <= 1
    first = view.payloads[0]
    assert set(first) == {"z_t", "h", "t", "label"} and first["z_t"].dtype == np.float16
    # The same secret gives the same messages again: the preview shows what will leave, not a sample of it.
    again = server_view(pipeline=tiny, pixels=pixels, hint_pixels=hints, config=config, secret=secret, epochs=1)
    assert all(np.array_equal(first[k], again.payloads[0][k]) for k in first)


def test_the_view_refuses_mismatched_images_and_hints(tiny, circles):
    pixels, hints = split_tensors(circles)
    with pytest.raises(ValueError, match="one hint per image"):
        server_view(pipeline=tiny, pixels=pixels, hint_pixels=hints[:3], config=SplitConfig(),
                    secret=ClientSecret(bytes(32)))
