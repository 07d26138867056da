"""DPLDMPipeline and SplitControlNetPipeline are diffusers pipelines: importable from privdiff.pipelines,
saved with save_pretrained and loaded with from_pretrained with their weights and privacy record, and
called with diffusers' usual arguments."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from privdiff.models.tiny import TinySpec, tiny_pipeline
from privdiff.pipelines import DPLDMPipeline, SplitControlNetPipeline
from privdiff.privacy.record import PrivacyRecord, record_for_dp_sgd

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def tiny():
    return tiny_pipeline(spec=TinySpec(), seed=0)


@pytest.fixture(scope="module")
def record():
    from privdiff.privacy.accounting import Accountant

    accountant = Accountant(accountant="prv")
    accountant.step(noise_multiplier=1.1, sample_rate=0.01, num_steps=200)
    return record_for_dp_sgd(history=accountant, clip=0.01, num_examples=1000, delta=1e-4, accountant="prv")


@pytest.fixture(scope="module")
def split_controlnet(tiny):
    from privdiff.pipelines.split_controlnet import SplitTrainer

    controlnet = SplitTrainer(unet=tiny.unet).controlnet
    with torch.no_grad():  # not the zero-initialised output convolutions: a round trip must keep real values
        for param in controlnet.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    return controlnet.eval()


def _same_weights(a, b) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def _dpldm(tiny, record):
    pipeline = DPLDMPipeline(**{k: v for k, v in tiny.components.items()
                                if k not in ("safety_checker", "feature_extractor", "image_encoder")})
    pipeline.privacy_record = record
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _split(tiny, controlnet, record):
    from privdiff.pipelines.split_pipeline import split_controlnet_pipeline

    pipeline = split_controlnet_pipeline(base=tiny, controlnet=controlnet, privacy_record=record)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _hint(size=64):
    y, x = np.mgrid[:size, :size]
    disc = ((x - size / 2) ** 2 + (y - size / 3) ** 2 < (size / 5) ** 2).astype(np.float32)
    return np.repeat(disc[..., None], 3, axis=2)


def test_dpldm_pipeline_round_trip_keeps_weights_and_record(tiny, record, tmp_path):
    pipeline = _dpldm(tiny, record)
    pipeline.save_pretrained(tmp_path / "dpldm")
    index = json.loads((tmp_path / "dpldm" / "model_index.json").read_text())
    assert index["_class_name"] == "DPLDMPipeline" and index["privacy_record"]["epsilon"] == record.epsilon
    loaded = DPLDMPipeline.from_pretrained(tmp_path / "dpldm")
    assert isinstance(loaded, DPLDMPipeline)
    assert loaded.privacy_record == record and isinstance(loaded.privacy_record, PrivacyRecord)
    for name in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(loaded, name), getattr(pipeline, name)), name


def test_split_pipeline_round_trip_keeps_controlnet_and_record(tiny, split_controlnet, record, tmp_path):
    from privdiff.pipelines.split_controlnet import SPLIT_CONFIG_KEY

    pipeline = _split(tiny, split_controlnet, record)
    pipeline.save_pretrained(tmp_path / "split")
    assert json.loads((tmp_path / "split" / "model_index.json").read_text())["_class_name"] == "SplitControlNetPipeline"
    loaded = SplitControlNetPipeline.from_pretrained(tmp_path / "split")
    assert type(loaded) is SplitControlNetPipeline and loaded.privacy_record == record
    assert SPLIT_CONFIG_KEY in json.loads((tmp_path / "split" / "controlnet" / "config.json").read_text())
    assert _same_weights(loaded.controlnet, split_controlnet) and _same_weights(loaded.unet, tiny.unet)
    hints = [_hint()]
    kwargs = dict(num_inference_steps=3, output_type="np")
    before = pipeline(PROMPT, hints, generator=torch.Generator().manual_seed(1), **kwargs).images
    after = loaded(PROMPT, hints, generator=torch.Generator().manual_seed(1), **kwargs).images
    assert np.allclose(before, after, atol=1e-5)  # the same model: equal up to float summation order


def test_a_pipeline_without_a_record_says_so(tiny, split_controlnet, tmp_path):
    pipeline = _split(tiny, split_controlnet, None)
    pipeline.save_pretrained(tmp_path / "plain")
    assert SplitControlNetPipeline.from_pretrained(tmp_path / "plain").privacy_record is None


@pytest.mark.parametrize("kind", ["dpldm", "split"])
def test_standard_call_arguments(tiny, split_controlnet, record, kind):
    pipeline = _dpldm(tiny, record) if kind == "dpldm" else _split(tiny, split_controlnet, record)
    hint = {} if kind == "dpldm" else {"image": Image.fromarray((_hint() * 255).astype(np.uint8))}
    steps_seen = []

    def on_step_end(pipe, step, timestep, values):
        steps_seen.append(step)
        return {"latents": values["latents"]}

    common = dict(num_inference_steps=3, guidance_scale=4.0, negative_prompt="blurry", height=32, width=32,
                  num_images_per_prompt=2, **hint)
    # the default output type is PIL, and return_dict gives the usual output object
    out = pipeline(PROMPT, generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step_end, **common)
    assert steps_seen == [0, 1, 2]
    assert len(out.images) == 2 and all(isinstance(im, Image.Image) and im.size == (32, 32) for im in out.images)
    # given latents are the starting point (a stochastic scheduler's step noise still comes from the
    # generator): the same latents give the same images, other latents other images
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(7))

    def run(start, **overrides):
        return pipeline(PROMPT, latents=start.clone(), generator=torch.Generator().manual_seed(3),
                        **{**common, "output_type": "np", **overrides})

    first, _ = run(latents, return_dict=False)
    second = run(latents).images
    assert first.shape == (2, 32, 32, 3) and np.array_equal(first, second)
    assert not np.allclose(first, run(latents.flip(0)).images)
    # the negative prompt is used: a different one changes the images
    other = run(latents, negative_prompt="a green square").images
    assert not np.allclose(first, other)


def test_split_pipeline_refuses_mismatched_hints(tiny, split_controlnet):
    pipeline = _split(tiny, split_controlnet, None)
    with pytest.raises(ValueError, match="one per prompt"):
        pipeline([PROMPT] * 3, [_hint(), _hint()], num_inference_steps=2)
    with pytest.raises(ValueError, match="needs hint images"):
        pipeline(PROMPT, num_inference_steps=2)
