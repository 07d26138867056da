"""Analyzers on ground truth: each set's own images score high against their own targets, and
low against shuffled targets or another set's images."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from privdiff.data import (
    ANALYZERS,
    PUBLIC_SHAPES,
    CirclesAnalyzer,
    CirclesConfig,
    CirclesDataset,
    DigitsAnalyzer,
    DigitsConfig,
    DigitsDataset,
    MnistAnalyzer,
    ShapesAnalyzer,
    ShapesDataset,
    StyleAnalyzer,
    StyleConfig,
    StyleDataset,
    analyzer_for,
    digits_split,
    images_from_pixel_values,
    load_dataset,
    public_prompts,
    public_shapes_config,
    random_circle_iou,
)


def _images(items):
    return images_from_pixel_values(pixel_values=[it["pixel_values"] for it in items])


def _rotate(seq):
    return list(seq[1:]) + list(seq[:1])


@pytest.fixture(scope="module")
def shapes_analyzer():
    start = time.perf_counter()
    analyzer = ShapesAnalyzer()
    assert time.perf_counter() - start < 5.0  # scikit-learn import included
    return analyzer


@pytest.fixture(scope="module")
def digits_analyzer():
    return DigitsAnalyzer()


@pytest.fixture(scope="module")
def public_items():
    ds = ShapesDataset(public_shapes_config(num_items=200, seed=10_000))
    return [ds[i] for i in range(len(ds))]


# ---------------------------------------------------------------------------------------------
# shapes


def test_public_prompts_are_public_seeded_and_not_the_training_items():
    prompts = public_prompts(num=200)
    assert len(prompts) == 200 and prompts == public_prompts(num=200, seed=0)
    assert public_prompts(num=200, seed=1) != prompts
    assert {p.shape for p in prompts} == set(PUBLIC_SHAPES)
    assert all(0.2 * 64 <= p.size <= 0.4 * 64 for p in prompts)
    train = ShapesDataset(public_shapes_config(num_items=200, seed=0))
    assert sum(p == train.attributes(i) for i, p in enumerate(prompts)) == 0
    assert prompts == [ShapesDataset(public_shapes_config(num_items=200, seed=10_000)).attributes(i)
                       for i in range(200)]


def test_shapes_analyzer_reads_true_images_and_rejects_wrong_specs(shapes_analyzer, public_items):
    images = _images(public_items)
    specs = [it["attributes"] for it in public_items]
    true = shapes_analyzer.score(images=images, specs=specs)
    assert true.num_images == 200
    assert true.background_accuracy >= 0.98 and true.color_accuracy >= 0.98 and true.shape_accuracy >= 0.95
    assert true.value >= 0.97
    wrong = shapes_analyzer.score(images=images, specs=_rotate(specs))
    assert wrong.background_accuracy <= 0.4 and wrong.color_accuracy <= 0.4 and wrong.shape_accuracy <= 0.4
    assert wrong.all_accuracy <= 0.05
    # Specs may be plain mappings, and items work directly.
    as_dicts = [{"shape": s.shape, "color": s.color, "background": s.background} for s in specs]
    assert shapes_analyzer.score(images=images, specs=as_dicts) == true
    assert shapes_analyzer.score_items(images=images, items=public_items) == true


def test_shapes_reading_is_the_same_for_every_input_form(shapes_analyzer, public_items):
    item = public_items[0]
    spec = item["attributes"]
    floats = _images([item])[0]
    uint8 = np.round(floats * 255).astype(np.uint8)
    big = Image.fromarray(uint8).resize((128, 128), Image.Resampling.NEAREST)
    for image in (floats, uint8, Image.fromarray(uint8), big):
        reading = shapes_analyzer.read(image)
        assert (reading.background, reading.color, reading.shape) == (spec.background, spec.color, spec.shape)
        assert np.allclose(reading.background_rgb, spec.background_rgb, atol=2)
    flat = np.full((64, 64, 3), 0.5, dtype=np.float32)  # nothing drawn: no colour, no shape
    reading = shapes_analyzer.read(flat)
    assert reading.color is None and reading.shape is None and reading.foreground_fraction == 0.0


def test_shapes_reading_survives_blur_noise_and_specks(shapes_analyzer, public_items):
    rng = np.random.default_rng(0)
    images = []
    for image in _images(public_items[:60]):
        blurred = np.asarray(Image.fromarray(np.uint8(image * 255)).resize((32, 32), Image.Resampling.BILINEAR)
                             .resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32)
        noisy = blurred + rng.normal(0, 10, blurred.shape)
        noisy[rng.integers(0, 64, 5), rng.integers(0, 64, 5)] = rng.integers(0, 256, (5, 3))  # specks
        images.append(np.clip(noisy, 0, 255).astype(np.uint8))
    score = shapes_analyzer.score_items(images=images, items=public_items[:60])
    assert score.background_accuracy >= 0.95 and score.color_accuracy >= 0.95 and score.shape_accuracy >= 0.9


def test_shapes_analyzer_is_deterministic():
    a, b = (ShapesAnalyzer(num_train=200, seed=3) for _ in range(2))
    ds = ShapesDataset(public_shapes_config(num_items=40, seed=10_001))
    images = _images([ds[i] for i in range(40)])
    assert [a.read(im) for im in images] == [b.read(im) for im in images]


# ---------------------------------------------------------------------------------------------
# circles


def test_circles_analyzer_iou_true_high_shuffled_at_chance():
    ds = CirclesDataset(CirclesConfig(num_items=200, seed=21))
    items = [ds[i] for i in range(200)]
    images = _images(items)
    circles = [it["circle"] for it in items]
    analyzer = CirclesAnalyzer()
    true = analyzer.score(images=images, circles=circles)
    assert true.mean_iou >= 0.9 and min(true.ious) >= 0.85 and len(true.ious) == 200
    assert analyzer.score_items(images=images, items=items) == true
    baseline = analyzer.random_circle_iou(num=1000, seed=0)
    assert baseline == random_circle_iou(num=1000, seed=0) and 0.0 < baseline < 0.2
    shuffled = analyzer.score(images=images, circles=_rotate(circles))
    assert shuffled.mean_iou <= baseline + 0.05 and shuffled.mean_iou < 0.4
    assert shuffled.value == shuffled.mean_iou


def test_circles_targets_are_rescaled_from_the_dataset_resolution():
    ds = CirclesDataset(CirclesConfig(num_items=30, resolution=32, seed=4))
    items = [ds[i] for i in range(30)]
    score = CirclesAnalyzer(resolution=32).score_items(images=_images(items), items=items)
    assert score.mean_iou >= 0.85
    # The same targets read as 64 px coordinates point at the wrong place.
    assert CirclesAnalyzer(resolution=64).score_items(images=_images(items), items=items).mean_iou < 0.6


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_classifier_is_held_out_and_accurate(digits_analyzer):
    assert digits_analyzer.classifier_accuracy >= 0.9
    train = {int(i) for i in digits_split(split="train")}
    assert set(digits_analyzer.source_indices) == {int(i) for i in digits_split(split="classifier")}
    assert train.isdisjoint(digits_analyzer.source_indices)


def test_digits_analyzer_reads_the_train_split_and_rejects_wrong_labels(digits_analyzer):
    ds = DigitsDataset(DigitsConfig())  # the train split: never seen by the classifier
    items = [ds[i] for i in range(len(ds))]
    images = _images(items)
    labels = [it["label"] for it in items]
    true = digits_analyzer.score(images=images, labels=labels)
    assert true.accuracy >= 0.85 and len(true.predictions) == len(ds)
    assert digits_analyzer.score_items(images=images, items=items) == true
    shifted = digits_analyzer.score(images=images, labels=[(v + 1) % 10 for v in labels])
    assert shifted.accuracy <= 0.2
    # 128 px PIL images and uint8 arrays read the same way.
    some = items[:20]
    big = [Image.fromarray(np.uint8(np.round(im * 255))).resize((128, 128), Image.Resampling.BICUBIC)
           for im in _images(some)]
    assert digits_analyzer.score(images=big, labels=labels[:20]).accuracy >= 0.85


# ---------------------------------------------------------------------------------------------
# style


def test_style_analyzer_tells_style_from_public_images(public_items):
    ds = StyleDataset(StyleConfig())
    style_images = _images([ds[i] for i in range(len(ds))])
    analyzer = StyleAnalyzer()
    assert analyzer.score(images=style_images).style_match >= 0.8
    assert analyzer.score(images=_images(public_items)).style_match <= 0.05
    digits = _images([load_dataset(data="digits")[i] for i in range(20)])
    assert analyzer.score(images=digits).style_match <= 0.05
    # Blurred stripes (what a 64 px model draws) are still the style's palette ...
    blurred = [np.asarray(Image.fromarray(np.uint8(im * 255)).resize((16, 16), Image.Resampling.BILINEAR)
                          .resize((64, 64), Image.Resampling.BILINEAR)) for im in style_images[:20]]
    assert analyzer.score(images=blurred).style_match >= 0.7
    assert StyleAnalyzer(blends=False).score(images=blurred).style_match < 0.5
    # ... and blurred public images are not.
    blurred_public = [np.asarray(Image.fromarray(np.uint8(im * 255)).resize((16, 16), Image.Resampling.BILINEAR)
                                 .resize((64, 64), Image.Resampling.BILINEAR)) for im in _images(public_items[:50])]
    assert analyzer.score(images=blurred_public).style_match <= 0.05


# ---------------------------------------------------------------------------------------------
# registry and input checks


def test_registry_maps_every_set_to_its_analyzer():
    assert dict(ANALYZERS) == {"shapes": ShapesAnalyzer, "circles": CirclesAnalyzer,
                               "digits": DigitsAnalyzer, "mnist": MnistAnalyzer, "style": StyleAnalyzer}
    assert analyzer_for("digits") is DigitsAnalyzer and analyzer_for(name="style") is StyleAnalyzer
    with pytest.raises(ValueError, match="supported names: circles, digits, mnist, shapes, style"):
        analyzer_for("faces")


def test_bad_inputs_are_explained():
    analyzer = StyleAnalyzer()
    image = np.zeros((64, 64, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        analyzer.score(images=[image - 1.0])
    with pytest.raises(ValueError, match="wrap a single image in a list"):
        analyzer.score(images=image)
    with pytest.raises(ValueError, match="images_from_pixel_values"):
        analyzer.score(images=[np.zeros((3, 64, 64), dtype=np.float32)])
    with pytest.raises(ValueError, match="2 images and 1 circles"):
        CirclesAnalyzer().score(images=[image, image], circles=[(1.0, 2.0, 3.0)])
    with pytest.raises(ValueError, match="distance=0"):
        StyleAnalyzer(distance=0)
    with pytest.raises(ValueError, match="hexagon"):
        ShapesAnalyzer(shapes=("circle", "hexagon"))
