"""DP-LDM trainer on the tiny model: outputs with their privacy record, exact resume, clear errors."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from privdiff.models.tiny import TinySpec, tiny_pipeline
from privdiff.pipelines.dp_ldm import BYPRODUCTS, WEIGHTS_DIFFUSERS, DPLDMConfig, train_dp_ldm
from privdiff.privacy.accounting import epsilon as epsilon_of
from privdiff.privacy.record import read_record

QUICK = dict(batch_size=4, physical_batch_size=2, epochs=1.0, secure_noise=False, num_samples=2,
             clip_norm=0.1, learning_rate=1e-3)


def _base():
    pipe = tiny_pipeline(spec=TinySpec(), seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_private_run_releases_weights_with_their_record(tmp_path):
    result = train_dp_ldm(base=_base(), data="shapes", out=tmp_path / "run",
                          config=DPLDMConfig(epsilon=8.0, **QUICK, num_items=16))
    assert result.figures["total_steps"] == 4 and result.figures["steps_done"] == 4 and not result.stopped
    record = read_record(result.files["diffusers"])
    assert record.mechanism == "dp-sgd" and record.epsilon <= 8.0
    assert record.num_examples == 16 and record.sample_rate == 0.25 and record.steps == 4
    independent = epsilon_of(noise_multiplier=record.noise_multiplier, sample_rate=0.25, steps=4,
                             delta=record.delta, accountant="pld")
    assert abs(record.epsilon - independent) / independent < 0.05
    diffs = load_file(str(result.files["diffusers"]))
    assert diffs and all(".attn" in k for k in diffs) and any(v.abs().sum() > 0 for v in diffs.values())
    comfy = load_file(str(result.files["comfyui"]))
    assert len(comfy) == len(diffs) and all(k.startswith("diffusion_model.") for k in comfy)
    assert read_record(result.files["comfyui"]) == record
    assert (tmp_path / "run" / "samples.png").is_file()
    assert not (tmp_path / "run" / BYPRODUCTS).exists(), "by-products are deleted unless kept"


def test_stopped_and_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    config = DPLDMConfig(epsilon=8.0, **QUICK)
    straight = train_dp_ldm(base=_base(), data="shapes", out=tmp_path / "a", config=dataclasses.replace(config, num_items=16))
    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return calls["n"] == 2

    stopped = train_dp_ldm(base=_base(), data="shapes", out=tmp_path / "b", config=dataclasses.replace(config, num_items=16),
                           should_stop=stop_after_two)
    assert stopped.stopped and stopped.figures["steps_done"] == 2 and not (tmp_path / "b" / WEIGHTS_DIFFUSERS).exists()
    from privdiff.training.checkpoint import load_checkpoint

    saved = load_checkpoint(folder=tmp_path / "b" / BYPRODUCTS, kind="dp-ldm", fingerprint=None)
    assert saved.state["step"] == 2 and len(list((tmp_path / "b" / BYPRODUCTS).iterdir())) == 1  # one atomic file
    resumed = train_dp_ldm(base=_base(), data="shapes", out=tmp_path / "b", config=dataclasses.replace(config, num_items=16), resume=True)
    a, b = load_file(str(straight.files["diffusers"])), load_file(str(resumed.files["diffusers"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_record(resumed.files["diffusers"]).epsilon == pytest.approx(
        read_record(straight.files["diffusers"]).epsilon)


def test_non_private_run_is_labelled(tmp_path):
    result = train_dp_ldm(base=_base(), data="shapes", out=tmp_path / "run",
                          config=DPLDMConfig(epsilon=None, **QUICK, num_items=8))
    record = read_record(result.files["diffusers"])
    assert record.mechanism == "none" and "WITHOUT" in record.extra["warning"]


@pytest.mark.parametrize(
    ("kwargs", "num_items", "message"),
    [
        (dict(delta=0.5), 16, "delta"),
        ({}, 1, "at least 2"),
        (dict(batch_size=32), 16, "larger than the dataset"),
    ],
)
def test_bad_input_writes_nothing(tmp_path, kwargs, num_items, message):
    settings = dict(QUICK, **kwargs)
    with pytest.raises(ValueError, match=message):
        train_dp_ldm(base=_base(), data="shapes", out=tmp_path / "run",
                     config=DPLDMConfig(epsilon=1.0, **settings, num_items=num_items))
    assert not (tmp_path / "run").exists()


def test_epsilon_must_be_positive():
    with pytest.raises(ValueError, match="epsilon"):
        DPLDMConfig(epsilon=0.0)


def test_folder_without_usable_images_writes_nothing(tmp_path):
    from privdiff.data import DatasetError

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError):
        train_dp_ldm(base=_base(), data=tmp_path / "data", out=tmp_path / "run", config=DPLDMConfig(**QUICK))
    assert not (tmp_path / "run").exists()


def test_transformer_set_trains_on_encoded_latents(tmp_path):
    """Regression: latents sliced from the VAE's output crashed torch's CPU GroupNorm backward
    (channels-last kernel) as soon as the transformer set's norms were trained."""
    result = train_dp_ldm(base=_base(), data="shapes", out=tmp_path / "run",
                          config=DPLDMConfig(trainable="transformer", epsilon=8.0, **{**QUICK, "num_samples": 1}, num_items=8))
    diffs = load_file(str(result.files["diffusers"]))
    assert any(".norm" in k for k in diffs) and any(v.abs().sum() > 0 for v in diffs.values())


def test_group_wise_clipping_of_the_conditioning_rows_keeps_the_record(tmp_path):
    config = DPLDMConfig(epsilon=8.0, conditioning_words=("circle", "red"), conditioning_clip_share=0.5, **QUICK)
    result = train_dp_ldm(base=_base(), data="shapes", out=tmp_path / "run", config=dataclasses.replace(config, num_items=16))
    record = read_record(result.files["diffusers"])
    assert record.clip == QUICK["clip_norm"] and record.epsilon <= 8.0  # the whole unit is still bounded by C
    assert record.extra["dp_ldm"]["conditioning_clip_share"] == 0.5
    with pytest.raises(ValueError, match="conditioning_words"):
        DPLDMConfig(conditioning_clip_share=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        DPLDMConfig(conditioning_words=("red",), conditioning_clip_share=1.0)


@pytest.mark.gpu
def test_trains_on_a_gpu_and_resumes_there(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    config = DPLDMConfig(epsilon=8.0, conditioning_words=("circle",), **QUICK)
    stopped = train_dp_ldm(base=_base(), data="shapes", out=tmp_path / "run", config=dataclasses.replace(config, num_items=16, device="cuda"), should_stop=lambda: True)
    assert stopped.stopped
    result = train_dp_ldm(base=_base(), data="shapes", out=tmp_path / "run", config=dataclasses.replace(config, num_items=16, device="cuda"), resume=True)
    diffs = load_file(str(result.files["diffusers"]))
    assert all(v.device.type == "cpu" for v in diffs.values()) and any(v.abs().sum() > 0 for v in diffs.values())
