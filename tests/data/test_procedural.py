"""Procedural sets: item format, determinism, geometry, and captions that match the pixels."""

from __future__ import annotations

import itertools
import re
import time

import numpy as np
import pytest
import torch

from privdiff.data import (
    PALETTE,
    SHAPES,
    CirclesConfig,
    CirclesDataset,
    ShapesConfig,
    ShapesDataset,
    caption_for,
    collate,
)

CAPTION = re.compile(r"^an? (?P<color>.+?) (?P<shape>\w+) on an? (?P<background>.+) background$")


def _rgb(pixel_values: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> uint8 [H, W, 3]."""
    return ((pixel_values + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _parse(caption: str) -> dict[str, str]:
    m = CAPTION.match(caption)
    assert m, caption
    return m.groupdict()


def test_palette_colours_are_distinguishable():
    assert 7 <= len(PALETTE) <= 10
    for (a, ca), (b, cb) in itertools.combinations(PALETTE.items(), 2):
        assert np.linalg.norm(np.subtract(ca, cb)) >= 100, (a, b)
    with pytest.raises(TypeError):
        PALETTE["new"] = (1, 2, 3)  # the shared table is read-only


def test_caption_articles():
    assert caption_for(shape="circle", color="red", background="light blue") == \
        "a red circle on a light blue background"
    assert caption_for(shape="star", color="orange", background="orange") == \
        "an orange star on an orange background"


@pytest.mark.parametrize("cls, cfg", [(CirclesDataset, CirclesConfig), (ShapesDataset, ShapesConfig)])
def test_item_format(cls, cfg):
    ds = cls(cfg(num_items=6, resolution=32, seed=0, num_subjects=4))
    assert len(ds) == 6
    for i in range(6):
        item = ds[i]
        assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
        assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
        assert isinstance(item["caption"], str) and item["caption"] == ds.caption(i)
        assert item["index"] == i and item["path"] == f"procedural:{ds.name}/{i}"
        assert item["subject"] == f"subject-{i % 4}"
        if ds.has_hints:
            assert item["hint"].shape == (3, 32, 32) and item["hint"].dtype == torch.float32
            assert set(item["hint"].unique().tolist()) <= {0.0, 1.0}
        else:
            assert item["hint"] is None
    assert ds.subjects() == [f"subject-{i % 4}" for i in range(6)]
    assert cls(cfg(num_items=3)).subjects() == [None, None, None]
    batch = collate([ds[0], ds[1], ds[2]])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert (batch["hint"] is not None) == ds.has_hints
    assert len(batch["attributes"]) == 3


@pytest.mark.parametrize("cls, cfg", [(CirclesDataset, CirclesConfig), (ShapesDataset, ShapesConfig)])
def test_same_seed_same_tensors_other_seed_different(cls, cfg):
    a, b, c = (cls(cfg(num_items=20, seed=s)) for s in (5, 5, 6))
    _ = a[7]  # access order must not matter
    for i in (3, 0, 19):
        x, y = a[i], b[i]
        assert torch.equal(x["pixel_values"], y["pixel_values"]) and x["caption"] == y["caption"]
        if a.has_hints:
            assert torch.equal(x["hint"], y["hint"])
    differing = sum(not torch.equal(a[i]["pixel_values"], c[i]["pixel_values"]) for i in range(20))
    assert differing >= 18
    assert a.captions() != c.captions()
    assert len({a.caption(i) for i in range(20)}) > 5  # items differ from each other too


def test_a_large_set_costs_nothing_to_build_and_is_lazy():
    start = time.perf_counter()
    ds = CirclesDataset(CirclesConfig(num_items=1_000_000, seed=1))
    assert time.perf_counter() - start < 0.5
    assert len(ds) == 1_000_000
    assert ds[999_999]["pixel_values"].shape == (3, 64, 64)
    assert CirclesConfig().num_items == 50_000


def test_circle_hint_outline_lies_on_the_filled_circle_boundary():
    ds = CirclesDataset(CirclesConfig(num_items=25, resolution=64, seed=3))
    w = ds.config.outline_width
    assert w == 2.0
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    for i in range(len(ds)):
        item = ds[i]
        cx, cy, r = item["circle"]
        assert r <= cx <= 64 - r and r <= cy <= 64 - r  # fully inside
        d = np.hypot(xx - cx, yy - cy)
        hint = item["hint"].numpy()
        assert np.array_equal(hint[0], hint[1]) and np.array_equal(hint[1], hint[2])  # white on black
        lit = hint[0] == 1.0
        # Every outline pixel is within half the width of the circle's edge ...
        assert lit.any() and np.all(np.abs(d[lit] - r) <= w / 2)
        # ... and every boundary pixel of the filled disc is lit.
        filled = ds.mask(i)
        assert filled.sum() == pytest.approx(np.pi * r * r, rel=0.15)
        padded = np.pad(filled, 1)
        interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        boundary = filled & ~interior
        assert boundary.any() and np.all(lit[boundary])
        # The image really is that disc: shape colour inside, background outside.
        rgb = _rgb(item["pixel_values"])
        spec = item["attributes"]
        assert np.all(rgb[filled] == spec.color_rgb) and np.all(rgb[~filled] == spec.background_rgb)


def test_circle_captions_name_the_colours_drawn():
    ds = CirclesDataset(CirclesConfig(num_items=40, seed=9))
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        words = _parse(item["caption"])
        assert words["shape"] == "circle"
        cx, cy, _ = item["circle"]
        rgb = _rgb(item["pixel_values"])
        assert tuple(rgb[int(cy), int(cx)]) == PALETTE[words["color"]]
        assert tuple(rgb[0, 0]) == PALETTE[words["background"]]
        assert words["color"] != words["background"]
        seen |= {words["color"], words["background"]}
    assert len(seen) >= 7  # the whole palette gets used


def test_shapes_match_their_attributes_and_captions():
    ds = ShapesDataset(ShapesConfig(num_items=120, resolution=64, seed=2))
    shapes_seen = set()
    for i in range(len(ds)):
        item = ds[i]
        spec = item["attributes"]
        words = _parse(item["caption"])
        assert (words["shape"], words["color"], words["background"]) == (spec.shape, spec.color, spec.background)
        rgb = _rgb(item["pixel_values"])
        mask = ds.mask(i)
        assert np.all(rgb[mask] == PALETTE[spec.color]) and np.all(rgb[~mask] == PALETTE[spec.background])
        cx, cy = spec.center
        assert tuple(rgb[int(cy), int(cx)]) == PALETTE[words["color"]]  # every shape covers its centre
        s = spec.size
        assert 0.12 * 64 <= s <= 0.4 * 64 and s <= cx <= 64 - s and s <= cy <= 64 - s
        ys, xs = np.nonzero(mask)
        assert xs.min() >= cx - s - 1 and xs.max() <= cx + s and ys.min() >= cy - s - 1 and ys.max() <= cy + s
        area = {"circle": np.pi, "square": 4.0, "triangle": 3 * np.sqrt(3) / 4, "diamond": 1.4}.get(spec.shape)
        if area is not None and s >= 10:
            assert mask.sum() == pytest.approx(area * s * s, rel=0.15)
        shapes_seen.add(spec.shape)
    assert shapes_seen == set(SHAPES)


def test_star_is_not_convex():
    ds = ShapesDataset(ShapesConfig(num_items=1, shapes=("star",), size_range=(0.4, 0.4), resolution=64))
    mask = ds.mask(0)
    s, (cx, cy) = ds.attributes(0).size, ds.attributes(0).center
    assert mask.sum() < 0.5 * np.pi * s * s  # much less than the circumscribed disc
    assert mask[int(cy - 0.9 * s), int(cx)]  # the top point is in
    assert not mask[int(cy - 0.9 * s), int(cx - 0.3 * s)]  # beside it, between points, is not


def test_palette_and_shapes_can_be_restricted_or_replaced():
    ds = ShapesDataset(ShapesConfig(num_items=30, palette=["red", "blue"], shapes=("triangle",)))
    for caption in ds.captions():
        assert caption in ("a red triangle on a blue background", "a blue triangle on a red background")
    custom = {"teal": (0, 128, 128), "maroon": (128, 0, 0), "ivory": (255, 255, 240)}
    ds = CirclesDataset(CirclesConfig(num_items=10, palette=custom, resolution=16))
    for i in range(10):
        spec = ds.attributes(i)
        assert spec.color in custom and spec.background in custom
        rgb = _rgb(ds[i]["pixel_values"])
        assert tuple(rgb[0, 0]) == custom[spec.background]
    assert ds.config.palette == tuple(custom.items())
    hash(ds.config)  # normalised to tuples, so the frozen config stays hashable


@pytest.mark.parametrize("cfg, options, named", [
    (CirclesConfig, {"num_items": 0}, "num_items=0"),
    (CirclesConfig, {"resolution": 8}, "resolution=8"),
    (CirclesConfig, {"seed": -1}, "seed=-1"),
    (CirclesConfig, {"palette": ["red", "mauve"]}, "mauve"),
    (CirclesConfig, {"palette": ["red"]}, "at least 2 colours"),
    (CirclesConfig, {"palette": {"red": (300, 0, 0), "blue": (0, 0, 255)}}, "0..255"),
    (CirclesConfig, {"size_range": (0.3, 0.1)}, "size_range"),
    (CirclesConfig, {"outline_width": 0}, "outline_width=0"),
    (ShapesConfig, {"shapes": ("circle", "hexagon")}, "hexagon"),
    (ShapesConfig, {"shapes": ()}, "shapes=()"),
    (ShapesConfig, {"num_subjects": -2}, "num_subjects=-2"),
])
def test_configs_reject_bad_values_by_name(cfg, options, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        cfg(**options)


def test_datasets_check_their_config_type():
    with pytest.raises(TypeError, match="CirclesConfig"):
        CirclesDataset(ShapesConfig())
    assert len(ShapesDataset()) == ShapesConfig().num_items
