"""DPAgg-TI: the aggregation's exact mean and noise law, its ε, files that load, clear errors."""

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from privdiff.models.tiny import TinySpec, tiny_pipeline
from privdiff.pipelines.dp_ti import DPAggConfig, aggregate, calibrate_aggregate_sigma, train_dpagg_ti
from privdiff.privacy.record import read_record


def _embeddings(n=40, k=2, d=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, d, generator=generator, dtype=torch.float64), torch.randn(d, generator=generator,
                                                                                        dtype=torch.float64)


def test_noiseless_full_release_is_the_mean_of_clipped_embeddings():
    embeddings, init = _embeddings()
    result = aggregate(embeddings=embeddings, init=init, clip=5.5, noise_multiplier=0.0, sample_rate=1.0,
                       generator=torch.Generator().manual_seed(0))
    centred = embeddings - init
    norms = centred.flatten(1).norm(dim=1)
    assert (norms > 5.5).any() and (norms < 5.5).any()
    expected = init + (centred * torch.clamp(5.5 / norms, max=1.0)[:, None, None]).mean(dim=0)
    assert torch.allclose(result.release, expected, rtol=1e-12, atol=1e-12)  # float64 rounding only


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_release_error_follows_the_stated_gaussian(sample_rate):
    """Over many seeds, (release - noiseless release) per coordinate ~ N(0, (σC/(q n))²) (q = 1), and
    the subsampled release is unbiased for the full mean. Kolmogorov-Smirnov at a fixed seed."""
    from scipy import stats

    embeddings, init = _embeddings(n=30)
    clip, sigma = 0.8, 1.3
    reference = aggregate(embeddings=embeddings, init=init, clip=clip, noise_multiplier=0.0, sample_rate=1.0,
                          generator=torch.Generator().manual_seed(0)).release
    errors = []
    for seed in range(2000):
        release = aggregate(embeddings=embeddings, init=init, clip=clip, noise_multiplier=sigma,
                            sample_rate=sample_rate, generator=torch.Generator().manual_seed(seed)).release
        errors.append((release - reference).flatten().numpy())
    errors = np.stack(errors)
    scale = sigma * clip / (sample_rate * 30)
    if sample_rate == 1.0:
        assert stats.kstest(errors[:, 0] / scale, "norm").pvalue > 0.01
        assert abs(errors.std() / scale - 1) < 0.03
    else:
        assert np.abs(errors.mean(axis=0)).max() < 4 * errors.std(axis=0).max() / np.sqrt(len(errors))
        assert errors.std() > scale  # subsampling adds its own variance on top of the noise


@pytest.mark.parametrize("sample_rate", [1.0, 0.2])
def test_calibrated_sigma_meets_epsilon_per_an_independent_accountant(sample_rate):
    from privdiff.privacy.accounting import analytic_gaussian_epsilon, epsilon

    sigma = calibrate_aggregate_sigma(epsilon=1.0, delta=1e-3, sample_rate=sample_rate)
    if sample_rate == 1.0:
        independent = analytic_gaussian_epsilon(noise_multiplier=sigma, delta=1e-3)
    else:
        independent = epsilon(noise_multiplier=sigma, sample_rate=sample_rate, steps=1, delta=1e-3, accountant="prv")
    assert independent == pytest.approx(1.0, rel=0.05)  # PLD calibrated, opacus PRV (or the analytic formula) checks


@pytest.fixture()
def pipe():
    pipeline = tiny_pipeline(spec=TinySpec(), seed=0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _data(n):
    from privdiff.data import load_dataset

    return load_dataset(data="style", num_items=n, seed=0)


def test_dpagg_run_writes_files_that_load(pipe, tmp_path):
    config = DPAggConfig(token="<stripes>", init_word="circle", num_vectors=2, steps=2, batch_size=4, epsilon=1.0,
                         secure_noise=False)
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    vocab = len(pipe.tokenizer)
    result = train_dpagg_ti(base=pipe, data=_data(6), out=tmp_path / "ti", config=dataclasses.replace(config, a1111=True))
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, before) and len(pipe.tokenizer) == vocab
    record = read_record(result.files["diffusers"])
    assert record.mechanism == "gaussian-aggregate" and record.epsilon <= 1.0 and record.num_examples == 6
    assert set(load_file(str(result.files["diffusers"]))) == {"<stripes>"}
    comfy = load_file(str(result.files["comfyui"]))
    assert set(comfy) == {"clip_l"} and comfy["clip_l"].shape == (2, 32)
    assert read_record(result.files["a1111"]) == record  # from its sidecar
    ids = pipe.tokenizer(["a picture in the style of"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        plain = pipe.text_encoder(ids)[0]
    pipe.load_textual_inversion(str(result.files["diffusers"]), token="<stripes>")
    with_token = pipe.tokenizer(["a picture in the style of <stripes>"], padding="max_length", max_length=77,
                                return_tensors="pt").input_ids
    with torch.no_grad():
        encoded = pipe.text_encoder(with_token)[0]
    assert not torch.allclose(encoded, plain)


@pytest.mark.parametrize("kwargs,n,message", [
    (dict(token="circle"), 6, "already in the vocabulary"),
    (dict(init_word="zxqvbn"), 6, "single tokens"),
    (dict(num_subsets=8), 6, "more than the 6 images"),
    (dict(epsilon=1e-7, delta=1e-8), 6, "cannot be met"),
])
def test_bad_input_writes_nothing(pipe, tmp_path, kwargs, n, message):
    config = DPAggConfig(**{**dict(steps=1, batch_size=2, secure_noise=False), **kwargs})
    with pytest.raises(ValueError, match=message):
        train_dpagg_ti(base=pipe, data=_data(n), out=tmp_path / "ti", config=config)
    assert not (tmp_path / "ti").exists()


def test_dpsgd_ti_trains_only_the_new_rows(pipe, tmp_path):
    from privdiff.pipelines.dp_ti import DPSGDTIConfig, train_dpsgd_ti
    from privdiff.privacy.accounting import epsilon as epsilon_of

    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    config = DPSGDTIConfig(token="<stripes>", init_word="circle", epochs=1.0, batch_size=3, epsilon=4.0,
                           secure_noise=False)
    result = train_dpsgd_ti(base=pipe, data=_data(6), out=tmp_path / "ti", config=config)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, before)
    assert all(torch.equal(v, unet_before[k]) for k, v in pipe.unet.state_dict().items())
    record = read_record(result.files["diffusers"])
    assert record.mechanism == "dp-sgd" and record.epsilon <= 4.0
    independent = epsilon_of(noise_multiplier=record.noise_multiplier, sample_rate=0.5, steps=record.steps,
                             delta=record.delta, accountant="pld")
    assert abs(record.epsilon - independent) / independent < 0.05
    vectors = load_file(str(result.files["diffusers"]))["<stripes>"]
    init = before[pipe.tokenizer("circle", add_special_tokens=False).input_ids[0]]
    assert vectors.shape == (1, 32) and not torch.allclose(vectors[0], init)


@pytest.fixture()
def sdxl_pipe():
    pipeline = tiny_pipeline(spec=TinySpec(family="sdxl"), seed=0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _encodings(pipeline, prompt):
    from privdiff.pipelines.textual_inversion import encode_prompts

    ids = [tok([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
           for tok in (pipeline.tokenizer, pipeline.tokenizer_2)]
    with torch.no_grad():
        context, added = encode_prompts(pipeline=pipeline, ids=ids, image_size=32)
    return context, added["text_embeds"]


@pytest.mark.parametrize("method", ["dpagg", "dpsgd"])
def test_sdxl_token_trains_rows_in_both_encoders_and_loads_into_both(sdxl_pipe, tmp_path, method):
    from privdiff.pipelines.dp_ti import DPSGDTIConfig, train_dpsgd_ti
    from privdiff.pipelines.textual_inversion import load_embedding

    tables = [te.get_input_embeddings().weight.detach().clone() for te in (sdxl_pipe.text_encoder,
                                                                           sdxl_pipe.text_encoder_2)]
    if method == "dpagg":
        result = train_dpagg_ti(base=sdxl_pipe, data=_data(6), out=tmp_path / "ti", config=DPAggConfig(
            token="<stripes>", init_word="circle", steps=2, batch_size=4, epsilon=1.0, secure_noise=False))
    else:
        result = train_dpsgd_ti(base=sdxl_pipe, data=_data(6), out=tmp_path / "ti", config=DPSGDTIConfig(
            token="<stripes>", init_word="circle", epochs=1.0, batch_size=3, epsilon=4.0, secure_noise=False))
    for te, table in zip((sdxl_pipe.text_encoder, sdxl_pipe.text_encoder_2), tables):
        assert torch.equal(te.get_input_embeddings().weight, table)  # the pipeline's own tables are untouched
    for kind in ("diffusers", "comfyui"):
        tensors = load_file(str(result.files[kind]))
        assert {k: tuple(v.shape) for k, v in tensors.items()} == {"clip_l": (1, 32), "clip_g": (1, 48)}
    tensors = load_file(str(result.files["diffusers"]))
    inits = [table[tok("circle", add_special_tokens=False).input_ids[0]]
             for table, tok in zip(tables, (sdxl_pipe.tokenizer, sdxl_pipe.tokenizer_2))]
    assert not torch.allclose(tensors["clip_l"][0], inits[0]) and not torch.allclose(tensors["clip_g"][0], inits[1])
    before = _encodings(sdxl_pipe, "a picture in the style of <stripes>")
    load_embedding(pipeline=sdxl_pipe, path=result.files["diffusers"], token="<stripes>")
    after = _encodings(sdxl_pipe, "a picture in the style of <stripes>")
    width = 32  # the first encoder's share of the context
    assert not torch.allclose(before[0][..., :width], after[0][..., :width])  # clip_l went into encoder 1
    assert not torch.allclose(before[0][..., width:], after[0][..., width:])  # clip_g into encoder 2
    assert not torch.allclose(before[1], after[1])
    for te, key in ((sdxl_pipe.text_encoder, "clip_l"), (sdxl_pipe.text_encoder_2, "clip_g")):
        token_id = (sdxl_pipe.tokenizer if key == "clip_l" else sdxl_pipe.tokenizer_2).convert_tokens_to_ids("<stripes>")
        assert torch.allclose(te.get_input_embeddings().weight[token_id], tensors[key][0])


def test_sdxl_refuses_a1111(sdxl_pipe, tmp_path):
    with pytest.raises(ValueError, match="A1111"):
        train_dpagg_ti(base=sdxl_pipe, data=_data(4), out=tmp_path / "ti",
                       config=DPAggConfig(steps=1, batch_size=2, secure_noise=False, a1111=True))
    assert not (tmp_path / "ti").exists()


def test_subject_units_make_one_embedding_per_person(pipe, tmp_path):
    from privdiff.data import load_dataset
    from privdiff.pipelines.dp_ti import DPSGDTIConfig, train_dpsgd_ti
    from privdiff.pipelines.dpagg_units import make_units

    data = load_dataset(data="style", num_items=9, seed=0, num_subjects=3)
    groups = sorted(unit.members for unit in make_units(dataset=data, secret=b"k" * 32, privacy_unit="subject"))
    assert groups == [(0, 3, 6), (1, 4, 7), (2, 5, 8)]
    result = train_dpagg_ti(base=pipe, data=data, out=tmp_path / "agg", config=DPAggConfig(
        token="<stripes>", init_word="circle", steps=1, batch_size=3, epsilon=1.0, delta=1e-2,
        privacy_unit="subject", secure_noise=False))
    record = read_record(result.files["diffusers"])
    assert result.figures["num_units"] == 3 and record.num_examples == 3
    result = train_dpsgd_ti(base=pipe, data=data, out=tmp_path / "sgd", config=DPSGDTIConfig(
        token="<stripes>", init_word="circle", epochs=1.0, batch_size=2, epsilon=8.0, delta=1e-2,
        privacy_unit="subject", secure_noise=False))
    record = read_record(result.files["diffusers"])
    assert record.privacy_unit == "subject" and record.num_examples == 3
    with pytest.raises(ValueError, match="subject id for every image"):
        train_dpagg_ti(base=pipe, data=_data(4), out=tmp_path / "none",
                       config=DPAggConfig(steps=1, batch_size=2, privacy_unit="subject", secure_noise=False))
    assert not (tmp_path / "none").exists()


def test_dpagg_stopped_then_resumed_releases_what_an_unbroken_run_releases(pipe, tmp_path):
    from privdiff.pipelines.dp_ti import BYPRODUCTS

    config = DPAggConfig(token="<s>", init_word="circle", steps=4, batch_size=3, secure_noise=False, epsilon=2.0)
    straight = train_dpagg_ti(base=pipe, data=_data(6), out=tmp_path / "straight", config=config)
    polls = iter([False, True])  # stop after the second step
    stopped = train_dpagg_ti(base=pipe, data=_data(6), out=tmp_path / "broken", config=config,
                             should_stop=lambda: next(polls))
    assert stopped.stopped and stopped.figures["steps_done"] == 2 and not stopped.files
    assert (tmp_path / "broken" / BYPRODUCTS / "checkpoint.safetensors").is_file()
    assert not list((tmp_path / "broken").glob("*.safetensors")), "a stopped run releases nothing"
    resumed = train_dpagg_ti(base=pipe, data=_data(6), out=tmp_path / "broken", config=config, resume=True)
    assert resumed.figures["steps_done"] == straight.figures["steps_done"] == 4
    a, b = load_file(str(straight.files["diffusers"]))["<s>"], load_file(str(resumed.files["diffusers"]))["<s>"]
    assert torch.allclose(a, b, atol=1e-6)
    assert not (tmp_path / "broken" / BYPRODUCTS).exists(), "the per-image embeddings are deleted at release"
    with pytest.raises(ValueError, match="other settings"):
        train_dpagg_ti(base=pipe, data=_data(6), out=tmp_path / "again", config=config,
                       should_stop=lambda: True)
        train_dpagg_ti(base=pipe, data=_data(6), out=tmp_path / "again",
                       config=DPAggConfig(**{**config.__dict__, "steps": 5}), resume=True)


def test_dpsgd_ti_stopped_then_resumed_releases_what_an_unbroken_run_releases(pipe, tmp_path):
    from privdiff.pipelines.dp_ti import BYPRODUCTS, DPSGDTIConfig, train_dpsgd_ti

    config = DPSGDTIConfig(token="<s>", init_word="circle", epochs=2.0, batch_size=3, epsilon=4.0, secure_noise=False)
    straight = train_dpsgd_ti(base=pipe, data=_data(6), out=tmp_path / "straight", config=config)
    polls = iter([False, True])
    stopped = train_dpsgd_ti(base=pipe, data=_data(6), out=tmp_path / "broken", config=config,
                             should_stop=lambda: next(polls))
    assert stopped.stopped and stopped.figures["steps_done"] == 2 and not stopped.files
    resumed = train_dpsgd_ti(base=pipe, data=_data(6), out=tmp_path / "broken", config=config, resume=True)
    assert resumed.figures["steps_done"] == straight.figures["steps_done"] == 4
    assert resumed.epsilon == pytest.approx(straight.epsilon, rel=1e-9), "the accountant carried over"
    a, b = load_file(str(straight.files["diffusers"]))["<s>"], load_file(str(resumed.files["diffusers"]))["<s>"]
    assert torch.allclose(a, b, atol=1e-6)
    assert not (tmp_path / "broken" / BYPRODUCTS).exists()
    # resuming a finished run returns its release, with the same figures
    again = train_dpsgd_ti(base=pipe, data=_data(6), out=tmp_path / "broken", config=config, resume=True)
    assert again.files == resumed.files and again.figures == resumed.figures
