"""The preview a user sees before sending anything: exactly the messages training would send, and
the server's best reconstruction from them, with the attack audit's figures for the same secret."""

import numpy as np
import pytest
import torch

from privdiff.pipelines.split_attacks import server_view
from privdiff.pipelines.split_controlnet import SplitConfig
from privdiff.pipelines.split_run import audit_split_training
from privdiff.privacy.split_secret import ClientSecret


@pytest.fixture(scope="module")
def tiny():
    from privdiff.models.loading import load_pipeline

    return load_pipeline(base="tiny")


@pytest.fixture(scope="module")
def circles():
    from privdiff.data import load_dataset

    return load_dataset(data="circles", num_items=8, seed=0)


def _stacked(dataset):
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([it["pixel_values"] for it in items]), torch.stack([it["hint"] for it in items])


@pytest.mark.parametrize("config", [SplitConfig(), SplitConfig(sigma_hint=1.0, draws_per_image=None)],
                         ids=["default", "hint-noise-fresh-draws"])
def test_the_view_is_what_training_sends_and_its_figures_are_the_audits(tiny, circles, tmp_path, config):
    secret = ClientSecret(bytes(range(32)))  # the test's fixed secret; a user's comes from the OS
    pixels, hints = _stacked(circles)
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
    pixels, hints = _stacked(circles)
    with pytest.raises(ValueError, match="one hint per image"):
        server_view(pipeline=tiny, pixels=pixels, hint_pixels=hints[:3], config=SplitConfig(),
                    secret=ClientSecret(bytes(32)))
