"""Geometry planning and tensor conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from privdiff.data import apply_geometry, plan_geometry
from privdiff.data.transforms import array_to_tensor, hint_to_tensor, image_to_tensor, to_rgb


@pytest.mark.parametrize("size, resized, box", [
    ((128, 64), (128, 64), (32, 0, 96, 64)),
    ((64, 200), (64, 200), (0, 68, 64, 132)),
    ((300, 200), (96, 64), (16, 0, 80, 64)),
    ((32, 32), (64, 64), (0, 0, 64, 64)),
    ((65, 64), (65, 64), (0, 0, 64, 64)),
])
def test_centre_crop_plan(size, resized, box):
    g = plan_geometry(size=size, resolution=64)
    assert (g.resized_size, g.box, g.flip) == (resized, box, False)


def test_random_plans_need_a_generator_and_stay_in_bounds():
    with pytest.raises(ValueError, match="rng="):
        plan_geometry(size=(100, 64), resolution=64, center_crop=False)
    rng = np.random.default_rng(0)
    lefts, flips = set(), set()
    for _ in range(200):
        g = plan_geometry(size=(100, 64), resolution=64, center_crop=False, random_flip=True, rng=rng)
        assert 0 <= g.box[0] <= 36 and g.box[2] - g.box[0] == 64 and g.box[1] == 0
        lefts.add(g.box[0])
        flips.add(g.flip)
    assert len(lefts) > 20 and flips == {True, False}


def test_apply_geometry_crops_and_flips():
    arr = np.zeros((64, 100, 3), np.uint8)
    arr[:, :50] = 255
    img = Image.fromarray(arr)
    g = plan_geometry(size=img.size, resolution=64)
    out = np.asarray(apply_geometry(img, g, resample="nearest"))
    assert out.shape == (64, 64, 3) and out[0, 0, 0] == 255 and out[0, 63, 0] == 0
    flipped = plan_geometry(size=img.size, resolution=64, random_flip=True, rng=_FlipAlways())
    out = np.asarray(apply_geometry(img, flipped, resample="nearest"))
    assert out[0, 0, 0] == 0 and out[0, 63, 0] == 255
    with pytest.raises(ValueError, match="differs from the planned source size"):
        apply_geometry(Image.new("RGB", (10, 10)), g)


class _FlipAlways:
    def random(self):
        return 0.0


def test_tensor_ranges_are_exact():
    arr = np.array([[[0, 128, 255]]], np.uint8)
    img = Image.fromarray(arr)
    assert image_to_tensor(img).flatten().tolist() == [-1.0, pytest.approx(128 / 127.5 - 1, abs=1e-6), 1.0]
    assert hint_to_tensor(img).flatten().tolist() == [0.0, pytest.approx(128 / 255, abs=1e-6), 1.0]
    with pytest.raises(ValueError, match="uint8"):
        array_to_tensor(np.zeros((2, 2, 3), np.float32), value_range=(0, 1))


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    assert np.asarray(to_rgb(rgba)).tolist() == [[[255, 255, 255], [10, 20, 30]]]
    assert to_rgb(Image.new("L", (1, 1), 7)).getpixel((0, 0)) == (7, 7, 7)
    assert isinstance(image_to_tensor(rgba), torch.Tensor)
