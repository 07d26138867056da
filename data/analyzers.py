"""Analyzers that score generated images against what their prompts asked for.

Each procedural set has one (see ANALYZERS / ``analyzer_for``): ``shapes`` (does the image show
the prompt's shape, colour and background), ``circles`` (IoU with the hint's circle), ``digits``
(a held-out classifier reads the digit), ``mnist`` (the same for real MNIST digits) and ``style`` (how many pixels use the unseen palette).

Images may be PIL images or numpy arrays [H, W, 3] (uint8 0..255, or float 0..1), of any size:
each is resized to ANALYSIS_RESOLUTION first, so scores of different models are comparable.
``images_from_pixel_values`` turns dataset/pipeline tensors in [-1, 1] into that form. Every
analyzer is deterministic: classifiers are fitted at construction on seeded renders.

scikit-learn (and SciPy, which it brings) is imported only when ShapesAnalyzer, DigitsAnalyzer or
MnistAnalyzer is built: ``pip install privdiff[analysis]`` (MnistAnalyzer also needs ``privdiff[mnist]``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image

from .analysis_common import (ANALYSIS_RESOLUTION, EVAL_SEED_OFFSET, FOREGROUND_DISTANCE, STYLE_DISTANCE,
                              as_rgb, as_rgb_list, border_median, check_distance, check_lengths, check_seed,
                              foreground, images_from_pixel_values, nearest)
from .digit_analyzers import DigitsAnalyzer, DigitsScore, MnistAnalyzer
from .procedural import PALETTE, CirclesConfig, CirclesDataset, ShapesConfig, ShapesDataset, ShapeSpec
from .private_sets import PUBLIC_SHAPES, PUBLIC_SIZE_RANGE, STYLE_PALETTE, STYLE_STRIPES, public_shapes_config

__all__ = [
    "ANALYSIS_RESOLUTION",
    "FOREGROUND_DISTANCE",
    "STYLE_DISTANCE",
    "EVAL_SEED_OFFSET",
    "images_from_pixel_values",
    "public_prompts",
    "random_circle_iou",
    "ShapeReading",
    "ShapesScore",
    "ShapesAnalyzer",
    "CirclesScore",
    "CirclesAnalyzer",
    "DigitsScore",
    "DigitsAnalyzer",
    "MnistAnalyzer",
    "StyleScore",
    "StyleAnalyzer",
    "ANALYZERS",
    "analyzer_for",
]

#: Seed of the renders ShapesAnalyzer's classifier is fitted on (another stream than evaluation).
_SHAPES_TRAIN_SEED = 777_000

_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.asarray(list(PALETTE.values()), dtype=np.float32)
_STYLE_RGB = np.asarray(list(STYLE_PALETTE.values()), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# shapes


def public_prompts(*, num: int = 200, seed: int = 0, resolution: int = 64) -> list[ShapeSpec]:
    """``num`` evaluation targets drawn like public pretraining data (public_shapes_config) with
    seed EVAL_SEED_OFFSET + seed, so they are not the training items of any small seed."""
    num = check_seed("num", num, 1)
    ds = ShapesDataset(public_shapes_config(num_items=num, seed=EVAL_SEED_OFFSET + check_seed("seed", seed),
                                            resolution=resolution))
    return [ds.attributes(i) for i in range(num)]


@dataclass(frozen=True)
class ShapeReading:
    """What ShapesAnalyzer sees in one image. ``color``/``shape`` are None when no foreground was found."""

    background: str
    color: str | None
    shape: str | None
    background_rgb: tuple[float, float, float]
    color_rgb: tuple[float, float, float] | None
    foreground_fraction: float


@dataclass(frozen=True)
class ShapesScore:
    """Fractions of images whose background / shape colour / shape class match the prompt;
    ``all_accuracy``: all three at once. ``value``: the mean of the three."""

    background_accuracy: float
    color_accuracy: float
    shape_accuracy: float
    all_accuracy: float
    num_images: int

    @property
    def value(self) -> float:
        return (self.background_accuracy + self.color_accuracy + self.shape_accuracy) / 3


def _target_field(spec: Any, field: str, i: int) -> str:
    value = spec.get(field) if isinstance(spec, Mapping) else getattr(spec, field, None)
    if not isinstance(value, str):
        raise ValueError(f"specs[{i}] = {spec!r} has no {field!r} name; pass ShapeSpec objects (e.g. from "
                         "public_prompts) or mappings with 'shape', 'color' and 'background'")
    return value


def _shape_features(mask: np.ndarray) -> np.ndarray:
    """Scale-free features of a mask: the bounding box resized to 16x16, fill ratio, aspect."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = mask[y0:y1, x0:x1].astype(np.float32)
    small = np.asarray(Image.fromarray(crop).resize((16, 16), Image.Resampling.BILINEAR), dtype=np.float32)
    h, w = y1 - y0, x1 - x0
    return np.concatenate([small.ravel(), [crop.mean(), h / (h + w)]]).astype(np.float32)


class ShapesAnalyzer:
    """Reads background colour, shape colour and shape class from images of the public grammar.

    The background is the PALETTE colour nearest to the median border pixel; the foreground the
    largest connected blob (holes filled) of pixels over ``foreground_distance`` from it; its colour
    the PALETTE colour nearest to its median pixel; its class comes from a logistic regression
    fitted at construction (~1 s) on ``num_train`` masks drawn by the ``shapes`` generator itself
    with ``shapes`` and ``size_range``.
    """

    def __init__(self, *, shapes: Sequence[str] = PUBLIC_SHAPES,
                 size_range: tuple[float, float] = PUBLIC_SIZE_RANGE, num_train: int = 2000, seed: int = 0,
                 foreground_distance: float = FOREGROUND_DISTANCE):
        from scipy import ndimage  # noqa: F401  (fail here, not at the first read, if it is missing)
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits

        num_train = check_seed("num_train", num_train, 50)
        seed = check_seed("seed", seed)
        self.foreground_distance = check_distance("foreground_distance", foreground_distance)
        # ShapesConfig validates shapes and size_range, with the same messages as the dataset.
        train = ShapesDataset(ShapesConfig(num_items=num_train, resolution=ANALYSIS_RESOLUTION,
                                           seed=_SHAPES_TRAIN_SEED + seed, shapes=tuple(shapes),
                                           size_range=size_range))
        self.shapes: tuple[str, ...] = train.config.shapes
        if len(self.shapes) == 1:
            self._classifier = None  # one class: nothing to decide
            return
        features = np.stack([_shape_features(train.mask(i)) for i in range(num_train)])
        labels = [train.attributes(i).shape for i in range(num_train)]
        # One BLAS thread: on small problems numpy's and SciPy's thread pools fight (25x slower on 2 cores).
        with threadpool_limits(limits=1):
            self._classifier = LogisticRegression(C=1.0, max_iter=2000).fit(features, labels)

    def _mask(self, rgb: np.ndarray, background: np.ndarray) -> np.ndarray:
        from scipy import ndimage

        mask = foreground(rgb, background, self.foreground_distance)
        labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        if n > 1:  # keep the largest blob: generated images have specks
            sizes = np.bincount(labels.ravel())[1:]
            mask = labels == (int(np.argmax(sizes)) + 1)
        return ndimage.binary_fill_holes(mask) if n else mask

    def read(self, image: Any) -> ShapeReading:
        """The background, shape colour and shape seen in one image."""
        return self._read(as_rgb(image, where="image"))

    def _read(self, rgb: np.ndarray) -> ShapeReading:
        bg_median = border_median(rgb)
        background = _PALETTE_NAMES[nearest(bg_median, _PALETTE_RGB)]
        mask = self._mask(rgb, bg_median)
        if not mask.any():
            return ShapeReading(background, None, None, tuple(map(float, bg_median)), None, 0.0)
        fg_median = np.median(rgb[mask], axis=0)
        color = _PALETTE_NAMES[nearest(fg_median, _PALETTE_RGB)]
        if self._classifier is None:
            shape = self.shapes[0]
        else:
            shape = str(self._classifier.predict(_shape_features(mask)[None])[0])
        return ShapeReading(background, color, shape, tuple(map(float, bg_median)),
                            tuple(map(float, fg_median)), float(mask.mean()))

    def score(self, *, images: Sequence[Any], specs: Sequence[Any]) -> ShapesScore:
        """How often each image shows its spec's background, colour and shape (names compared)."""
        rgbs = as_rgb_list(images)
        check_lengths(rgbs, specs, "specs")
        hits = np.zeros((len(rgbs), 3), dtype=bool)
        for i, (rgb, spec) in enumerate(zip(rgbs, specs)):
            want = [_target_field(spec, f, i) for f in ("background", "color", "shape")]
            got = self._read(rgb)
            hits[i] = [got.background == want[0], got.color == want[1], got.shape == want[2]]
        bg, col, shp = (float(v) for v in hits.mean(axis=0))
        return ShapesScore(bg, col, shp, float(hits.all(axis=1).mean()), len(rgbs))

    def score_items(self, *, images: Sequence[Any], items: Sequence[Mapping[str, Any]]) -> ShapesScore:
        """``score`` with targets taken from ``shapes`` dataset items (their ``attributes``)."""
        return self.score(images=images, specs=[it["attributes"] for it in items])


# ---------------------------------------------------------------------------------------------
# circles


@dataclass(frozen=True)
class CirclesScore:
    """Mean IoU of each image's foreground with its target disc, and every image's IoU."""

    mean_iou: float
    ious: tuple[float, ...]

    @property
    def value(self) -> float:
        return self.mean_iou


def _disc(cx: float, cy: float, r: float, resolution: int) -> np.ndarray:
    c = np.arange(resolution, dtype=np.float64) + 0.5  # pixel centres, as the generator draws
    return np.hypot(c[None, :] - cx, c[:, None] - cy) <= r


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def random_circle_iou(*, num: int = 1000, seed: int = 0, resolution: int = 64,
                      size_range: tuple[float, float] | None = None) -> float:
    """Expected IoU of a random ``circles`` circle with an independent one of the same distribution:
    what a model that ignores the hint scores. ``size_range`` defaults to CirclesConfig's."""
    num = check_seed("num", num, 1)
    seed = check_seed("seed", seed)
    extra = {} if size_range is None else {"size_range": size_range}
    a, b = (CirclesDataset(CirclesConfig(num_items=num, resolution=resolution, seed=s, **extra))
            for s in (EVAL_SEED_OFFSET + seed, 2 * EVAL_SEED_OFFSET + seed))
    return float(np.mean([_iou(a.mask(i), b.mask(i)) for i in range(num)]))


class CirclesAnalyzer:
    """IoU of a generated image's foreground with the target circle of its hint.

    Foreground: pixels over ``foreground_distance`` from the median border colour. Targets are the
    ``circle`` tuples (cx, cy, r) of ``circles`` items, in pixels at ``resolution`` (the dataset's);
    they are rescaled to the analysis resolution.
    """

    def __init__(self, *, resolution: int = 64, foreground_distance: float = FOREGROUND_DISTANCE):
        self.resolution = check_seed("resolution", resolution, 1)
        self.foreground_distance = check_distance("foreground_distance", foreground_distance)

    def foreground(self, image: Any) -> np.ndarray:
        """Boolean [64, 64]: the pixels that differ from the image's background."""
        rgb = as_rgb(image, where="image")
        return foreground(rgb, border_median(rgb), self.foreground_distance)

    def score(self, *, images: Sequence[Any], circles: Sequence[tuple[float, float, float]]) -> CirclesScore:
        rgbs = as_rgb_list(images)
        check_lengths(rgbs, circles, "circles")
        k = ANALYSIS_RESOLUTION / self.resolution
        ious = []
        for i, (rgb, circle) in enumerate(zip(rgbs, circles)):
            try:
                cx, cy, r = (float(v) for v in circle)
            except (TypeError, ValueError):
                raise ValueError(f"circles[{i}] = {circle!r} must be (cx, cy, r) in pixels") from None
            mask = foreground(rgb, border_median(rgb), self.foreground_distance)
            ious.append(_iou(mask, _disc(cx * k, cy * k, r * k, ANALYSIS_RESOLUTION)))
        return CirclesScore(float(np.mean(ious)), tuple(ious))

    def score_items(self, *, images: Sequence[Any], items: Sequence[Mapping[str, Any]]) -> CirclesScore:
        """``score`` with targets taken from ``circles`` dataset items (their ``circle``)."""
        return self.score(images=images, circles=[it["circle"] for it in items])

    def random_circle_iou(self, *, num: int = 1000, seed: int = 0) -> float:
        """``random_circle_iou`` at this analyzer's resolution with CirclesConfig's size range."""
        return random_circle_iou(num=num, seed=seed, resolution=self.resolution)


# ---------------------------------------------------------------------------------------------
# style


@dataclass(frozen=True)
class StyleScore:
    """Mean over images of the fraction of pixels in the style's colours, and each image's fraction."""

    style_match: float
    per_image: tuple[float, ...]

    @property
    def value(self) -> float:
        return self.style_match


def _segment_distances(rgb: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((rgb - a) @ ab) / float(ab @ ab), 0.0, 1.0)
    return np.linalg.norm(rgb - (a + t[..., None] * ab), axis=-1)


class StyleAnalyzer:
    """How much of each image is drawn in the ``style`` set's colours.

    A pixel matches when it is within ``distance`` of a STYLE_PALETTE colour or, with ``blends``
    (default), of a blend of one STYLE_STRIPES pair: a model at 64 px (8x8 latents) blurs 2-3 px
    stripes into their mix, which is still the style's palette. Both stay >= STYLE_MIN_DISTANCE
    (90) from every PALETTE colour, so public images score about 0. Texture itself is not scored.
    """

    def __init__(self, *, distance: float = STYLE_DISTANCE, blends: bool = True):
        self.distance = check_distance("distance", distance)
        if not isinstance(blends, bool):
            raise ValueError(f"blends={blends!r} must be True or False")
        self.blends = blends

    def match(self, image: Any) -> np.ndarray:
        """Boolean [64, 64]: the pixels drawn in the style's colours."""
        return self._match(as_rgb(image, where="image"))

    def _match(self, rgb: np.ndarray) -> np.ndarray:
        d = np.linalg.norm(rgb[:, :, None, :] - _STYLE_RGB[None, None], axis=3).min(axis=2)
        if self.blends:
            for first, second in STYLE_STRIPES:
                a, b = (np.asarray(STYLE_PALETTE[n], dtype=np.float32) for n in (first, second))
                d = np.minimum(d, _segment_distances(rgb, a, b))
        return d <= self.distance

    def score(self, *, images: Sequence[Any]) -> StyleScore:
        rgbs = as_rgb_list(images)
        if not rgbs:
            raise ValueError("images is empty; pass at least one image to score")
        fractions = [float(self._match(rgb).mean()) for rgb in rgbs]
        return StyleScore(float(np.mean(fractions)), tuple(fractions))

    def score_items(self, *, images: Sequence[Any], items: Sequence[Mapping[str, Any]] | None = None) -> StyleScore:
        """``score``; ``items`` is accepted for a uniform interface and not needed."""
        return self.score(images=images)


# ---------------------------------------------------------------------------------------------
# registry

#: Dataset name -> analyzer class; every class has ``score_items(*, images, items)`` whose result
#: has a ``value`` (the headline number, higher is better).
ANALYZERS: Mapping[str, type] = MappingProxyType({
    "shapes": ShapesAnalyzer,
    "circles": CirclesAnalyzer,
    "digits": DigitsAnalyzer,
    "mnist": MnistAnalyzer,
    "style": StyleAnalyzer,
})


def analyzer_for(name: str) -> type:
    """The analyzer class for the procedural set ``name`` (one of ANALYZERS)."""
    if name not in ANALYZERS:
        raise ValueError(f"name={name!r} has no analyzer; supported names: {', '.join(sorted(ANALYZERS))}")
    return ANALYZERS[name]
