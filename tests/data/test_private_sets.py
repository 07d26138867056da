"""Private sets ``digits`` and ``style``: item format, determinism, the fixed digits split, and
pixels that match captions and the style palette."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch

from privdiff.data import (
    PALETTE,
    PROCEDURAL_DATASETS,
    PUBLIC_SHAPES,
    STYLE_PALETTE,
    DigitsConfig,
    DigitsDataset,
    StyleConfig,
    StyleDataset,
    collate,
    digits_source,
    digits_split,
    load_dataset,
)
from privdiff.data.private_sets import (
    DIGITS_TOTAL,
    DIGITS_TRAIN_SIZE,
    STYLE_MIN_DISTANCE,
    STYLE_STRIPES,
    segment_distance,
)
from privdiff.models.tokenizer import DEFAULT_WORDS


def _rgb(pixel_values: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> uint8 [H, W, 3]."""
    return ((pixel_values + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_both_sets_are_registered_and_load_by_name():
    assert {"digits", "style"} <= set(PROCEDURAL_DATASETS)
    ds = load_dataset(data="digits", num_items=5, resolution=32, seed=1)
    assert isinstance(ds, DigitsDataset) and len(ds) == 5 and ds[0]["pixel_values"].shape == (3, 32, 32)
    ds = load_dataset(data="style", num_items=4, seed=2)
    assert isinstance(ds, StyleDataset) and len(ds) == 4 and ds[0]["pixel_values"].shape == (3, 64, 64)
    assert len(load_dataset(data="digits")) == DIGITS_TRAIN_SIZE
    assert len(load_dataset(data="digits", split="classifier")) == DIGITS_TOTAL - DIGITS_TRAIN_SIZE
    assert len(load_dataset(data="style")) == 100
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\]"):
        load_dataset(data="style", colour="red")


@pytest.mark.parametrize("cls, cfg", [(DigitsDataset, DigitsConfig), (StyleDataset, StyleConfig)])
def test_item_format(cls, cfg):
    ds = cls(cfg(num_items=6, resolution=32, seed=0, num_subjects=4))
    assert len(ds) == 6 and not ds.has_hints
    for i in range(6):
        item = ds[i]
        pv = item["pixel_values"]
        assert pv.shape == (3, 32, 32) and pv.dtype == torch.float32 and pv.min() >= -1 and pv.max() <= 1
        assert item["caption"] == ds.caption(i) and item["hint"] is None
        assert item["index"] == i and item["path"] == f"procedural:{ds.name}/{i}"
        assert item["subject"] == f"subject-{i % 4}"
    assert cls(cfg(num_items=3)).subjects() == [None, None, None]
    batch = collate([ds[0], ds[1], ds[2]])
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["hint"] is None
    assert len(batch["attributes"]) == 3


@pytest.mark.parametrize("cls, cfg", [(DigitsDataset, DigitsConfig), (StyleDataset, StyleConfig)])
def test_same_seed_same_tensors_other_seed_different(cls, cfg):
    a, b, c = (cls(cfg(num_items=20, seed=s)) for s in (5, 5, 6))
    _ = a[7]  # access order must not matter
    for i in (3, 0, 19):
        assert torch.equal(a[i]["pixel_values"], b[i]["pixel_values"]) and a[i]["caption"] == b[i]["caption"]
    assert sum(not torch.equal(a[i]["pixel_values"], c[i]["pixel_values"]) for i in range(20)) >= 15


# ---------------------------------------------------------------------------------------------
# digits


def test_digit_captions_name_the_label_with_tokenizer_words():
    ds = DigitsDataset(DigitsConfig(num_items=60, seed=3))
    labels = ds.labels()
    assert set(labels) == set(range(10))
    for i in range(len(ds)):
        item = ds[i]
        assert isinstance(item["label"], int) and item["label"] == labels[i]
        assert item["caption"] == f"a handwritten digit {item['label']}"
        assert item["attributes"].label == item["label"] and item["attributes"].split == "train"
        assert all(word in DEFAULT_WORDS for word in item["caption"].split())
    _, source_labels = digits_source()
    assert [source_labels[ds[i]["source_index"]] for i in range(len(ds))] == labels


def test_digits_split_is_fixed_disjoint_and_ignores_the_seed():
    train, held = digits_split(split="train"), digits_split(split="classifier")
    assert len(train) == DIGITS_TRAIN_SIZE and len(held) == DIGITS_TOTAL - DIGITS_TRAIN_SIZE
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(range(DIGITS_TOTAL))
    # The two splits share no image content either (load_digits has no exact duplicates across them).
    images, _ = digits_source()
    train_bytes = {images[i].tobytes() for i in train}
    assert not any(images[i].tobytes() in train_bytes for i in held)
    # Every seed orders the same images differently; no seed moves an image across the split.
    a, b = (DigitsDataset(DigitsConfig(seed=s)) for s in (0, 7))
    sa = [a.attributes(i).source_index for i in range(len(a))]
    sb = [b.attributes(i).source_index for i in range(len(b))]
    assert sorted(sa) == sorted(sb) == sorted(int(i) for i in train) and sa != sb
    c = DigitsDataset(DigitsConfig(split="classifier", seed=3))
    assert {c.attributes(i).source_index for i in range(len(c))} == {int(i) for i in held}
    # A smaller set is a prefix of the full one with the same seed.
    small = DigitsDataset(DigitsConfig(seed=7, num_items=50))
    assert [small.attributes(i).source_index for i in range(50)] == sb[:50]


def test_digits_are_smooth_grey_light_on_dark_upscales_of_their_source():
    ds = DigitsDataset(DigitsConfig(num_items=30, seed=1))
    images, _ = digits_source()
    for i in range(len(ds)):
        item = ds[i]
        rgb = _rgb(item["pixel_values"]).astype(np.float32)
        assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
        grey = rgb[..., 0] / 255.0
        assert np.percentile(grey, 25) < 0.05 and grey.mean() < 0.45 and grey.max() > 0.6  # light ink, dark ground
        assert len(np.unique(grey)) > 40  # smooth, not 16 flat levels in 8x8 blocks
        cells = grey.reshape(8, 8, 8, 8).mean(axis=(1, 3))
        source = images[item["source_index"]] / 16.0
        assert np.corrcoef(cells.ravel(), source.ravel())[0, 1] > 0.95
        assert np.abs(cells - source).mean() < 0.08 and np.abs(cells - source).max() < 0.35


@pytest.mark.parametrize("options, named", [
    ({"split": "test"}, "split='test'"),
    ({"num_items": DIGITS_TRAIN_SIZE + 1}, f"num_items={DIGITS_TRAIN_SIZE + 1}"),
    ({"split": "classifier", "num_items": 798}, "num_items <= 797"),
    ({"num_items": 0}, "num_items=0"),
    ({"seed": -1}, "seed=-1"),
    ({"resolution": 4}, "resolution=4"),
])
def test_digits_config_rejects_bad_values_by_name(options, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        DigitsConfig(**options)
    with pytest.raises(ValueError, match="split="):
        digits_split(split="val")


# ---------------------------------------------------------------------------------------------
# style


def test_style_palette_is_far_from_the_public_palette():
    assert len(STYLE_PALETTE) == 4 and STYLE_MIN_DISTANCE >= 90
    for (name, rgb), (pname, prgb) in itertools.product(STYLE_PALETTE.items(), PALETTE.items()):
        assert math.dist(rgb, prgb) >= 90, (name, pname)
    # Blurred stripes mix their pair's colours; the mixes stay far from the public palette too.
    for (first, second), prgb in itertools.product(STYLE_STRIPES, PALETTE.values()):
        assert segment_distance(point=prgb, a=STYLE_PALETTE[first], b=STYLE_PALETTE[second]) >= 90
    for a, b in itertools.combinations(STYLE_PALETTE.values(), 2):
        assert math.dist(a, b) >= 100  # the style's own colours are distinct as well
    assert all(name in DEFAULT_WORDS for name in STYLE_PALETTE)


def test_style_items_are_striped_shapes_in_the_style_palette():
    ds = StyleDataset(StyleConfig(num_items=40, seed=4))
    (a, b), (c, d) = ((STYLE_PALETTE[x], STYLE_PALETTE[y]) for x, y in STYLE_STRIPES)
    period = ds.config.stripe_period
    assert period == 7.0
    shapes_seen = set()
    for i in range(len(ds)):
        item = ds[i]
        spec = item["attributes"]
        assert item["caption"] == f"a {spec.shape} on a striped background" and spec.shape in PUBLIC_SHAPES
        assert all(word in DEFAULT_WORDS for word in item["caption"].split())
        rgb = _rgb(item["pixel_values"])
        mask = ds.mask(i)
        assert 0.2 * 64 <= spec.size <= 0.4 * 64 and mask.mean() > 0.03
        colours = [tuple(p) for p in rgb.reshape(-1, 3)]
        inside = {tuple(p) for p in rgb[mask]}
        outside = {tuple(p) for p in rgb[~mask]}
        assert inside == {c, d} and outside == {a, b}, set(colours)
        # Diagonal stripes: along a row the background colour flips every ~period/2 pixels,
        # and one step right-and-up (x+1, y-1) keeps the colour.
        row = rgb[0] if not mask[0].any() else rgb[-1]
        flips = sum(tuple(row[x]) != tuple(row[x + 1]) for x in range(63))
        assert 2 * 64 / period - 3 <= flips <= 2 * 64 / period + 3
        bg = ~mask
        diag_same = (rgb[1:, :-1] == rgb[:-1, 1:]).all(axis=2) & bg[1:, :-1] & bg[:-1, 1:]
        assert diag_same.sum() >= 0.95 * (bg[1:, :-1] & bg[:-1, 1:]).sum()
        shapes_seen.add(spec.shape)
    assert shapes_seen == set(PUBLIC_SHAPES)
    solid = StyleDataset(StyleConfig(num_items=3, shape_texture=False))
    for i in range(3):
        rgb = _rgb(solid[i]["pixel_values"])
        assert {tuple(p) for p in rgb[solid.mask(i)]} == {c}


@pytest.mark.parametrize("options, named", [
    ({"shapes": ("circle", "hexagon")}, "hexagon"),
    ({"size_range": (0.4, 0.2)}, "size_range"),
    ({"stripe_period": 1}, "stripe_period=1"),
    ({"shape_texture": "yes"}, "shape_texture='yes'"),
    ({"num_items": 0}, "num_items=0"),
])
def test_style_config_rejects_bad_values_by_name(options, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        StyleConfig(**options)
    with pytest.raises(TypeError, match="StyleConfig"):
        StyleDataset(DigitsConfig())
