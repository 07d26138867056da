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

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from PIL import Image

from .mnist import mnist_source, mnist_split, render_mnist
from .procedural import PALETTE, CirclesConfig, CirclesDataset, ShapesConfig, ShapesDataset, ShapeSpec
from .private_sets import (
    PUBLIC_SHAPES,
    PUBLIC_SIZE_RANGE,
    STYLE_PALETTE,
    STYLE_STRIPES,
    digits_source,
    digits_split,
    public_shapes_config,
    render_digit,
)
from .transforms import to_rgb

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

#: Side every image is resized to before analysis (privdiff-tiny's resolution).
ANALYSIS_RESOLUTION = 64
#: A pixel is foreground when it is this far (RGB distance) from the background colour: half the
#: least gap between PALETTE colours (~100), so any other palette colour counts and noise does not.
FOREGROUND_DISTANCE = 50.0
#: A pixel matches the style when it is this close to a STYLE_PALETTE colour (or a stripe blend);
#: those stay >= 90 from PALETTE, so no public colour is within this distance.
STYLE_DISTANCE = 45.0
#: Evaluation prompts and baselines use seed EVAL_SEED_OFFSET + seed, away from training seeds.
EVAL_SEED_OFFSET = 10_000
#: Seed of the renders ShapesAnalyzer's classifier is fitted on (another stream than evaluation).
_SHAPES_TRAIN_SEED = 777_000

_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.asarray(list(PALETTE.values()), dtype=np.float32)
_STYLE_RGB = np.asarray(list(STYLE_PALETTE.values()), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# image input


def _as_rgb(image: Any, *, where: str) -> np.ndarray:
    """One image -> float32 [64, 64, 3] in 0..255."""
    if isinstance(image, Image.Image):
        arr = np.asarray(to_rgb(image), dtype=np.float32)
    else:
        arr = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.size == 0:
            raise ValueError(f"{where} has shape {arr.shape}; pass [H, W, 3] arrays or PIL images "
                             "(for [3, H, W] tensors in [-1, 1] use images_from_pixel_values)")
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32)
        elif np.issubdtype(arr.dtype, np.floating):
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            if np.isnan(arr).any() or lo < -1e-3 or hi > 1 + 1e-3:
                raise ValueError(f"{where} is a float array with values in [{lo:.3g}, {hi:.3g}]; float "
                                 "images must lie in [0, 1] (convert [-1, 1] with (x + 1) / 2)")
            arr = np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0
        else:
            raise ValueError(f"{where} has dtype {arr.dtype}; pass uint8 (0..255) or float (0..1)")
    if arr.shape[:2] != (ANALYSIS_RESOLUTION, ANALYSIS_RESOLUTION):
        size = (ANALYSIS_RESOLUTION, ANALYSIS_RESOLUTION)
        # Per channel in float mode: no rounding to uint8 before the analysis.
        arr = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(arr[:, :, c]))
                                   .resize(size, Image.Resampling.BILINEAR)) for c in range(3)], axis=2)
    return arr


def _as_rgb_list(images: Any) -> list[np.ndarray]:
    if isinstance(images, Image.Image) or (hasattr(images, "ndim") and images.ndim < 4):
        raise ValueError("images must be a sequence of images (a list, or an [N, H, W, 3] array); "
                         "wrap a single image in a list")
    return [_as_rgb(im, where=f"images[{i}]") for i, im in enumerate(images)]


def images_from_pixel_values(*, pixel_values: Any) -> list[np.ndarray]:
    """Dataset or pipeline tensors [3, H, W] / [B, 3, H, W] in [-1, 1] -> float32 [H, W, 3] in [0, 1]."""
    if isinstance(pixel_values, torch.Tensor):
        batch = pixel_values.detach().cpu().float()
        batch = batch[None] if batch.ndim == 3 else batch
        tensors = list(batch)
    else:
        tensors = [torch.as_tensor(t).detach().cpu().float() for t in pixel_values]
    out = []
    for i, t in enumerate(tensors):
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"pixel_values[{i}] has shape {tuple(t.shape)}; expected [3, H, W] in [-1, 1]")
        out.append(((t.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy())
    return out


def _check_lengths(images: Sequence[Any], targets: Sequence[Any], name: str) -> None:
    if len(images) != len(targets):
        raise ValueError(f"got {len(images)} images and {len(targets)} {name}; pass one target per image")
    if len(images) == 0:
        raise ValueError("images is empty; pass at least one image to score")


def _border_median(rgb: np.ndarray) -> np.ndarray:
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]], axis=0)
    return np.median(border, axis=0)


def _nearest(rgb: np.ndarray, table: np.ndarray) -> int:
    return int(np.argmin(np.linalg.norm(table - rgb[None, :], axis=1)))


def _foreground(rgb: np.ndarray, background: np.ndarray, distance: float) -> np.ndarray:
    return np.linalg.norm(rgb - background[None, None, :], axis=2) > distance


def _check_distance(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 442:
        raise ValueError(f"{name}={value!r} must be an RGB distance in (0, 442), e.g. 50")
    return float(value)


def _check_seed(name: str, value: Any, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# shapes


def public_prompts(*, num: int = 200, seed: int = 0, resolution: int = 64) -> list[ShapeSpec]:
    """``num`` evaluation targets drawn like public pretraining data (public_shapes_config) with
    seed EVAL_SEED_OFFSET + seed, so they are not the training items of any small seed."""
    num = _check_seed("num", num, 1)
    ds = ShapesDataset(public_shapes_config(num_items=num, seed=EVAL_SEED_OFFSET + _check_seed("seed", seed),
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

        num_train = _check_seed("num_train", num_train, 50)
        seed = _check_seed("seed", seed)
        self.foreground_distance = _check_distance("foreground_distance", foreground_distance)
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

        mask = _foreground(rgb, background, self.foreground_distance)
        labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        if n > 1:  # keep the largest blob: generated images have specks
            sizes = np.bincount(labels.ravel())[1:]
            mask = labels == (int(np.argmax(sizes)) + 1)
        return ndimage.binary_fill_holes(mask) if n else mask

    def read(self, image: Any) -> ShapeReading:
        """The background, shape colour and shape seen in one image."""
        return self._read(_as_rgb(image, where="image"))

    def _read(self, rgb: np.ndarray) -> ShapeReading:
        bg_median = _border_median(rgb)
        background = _PALETTE_NAMES[_nearest(bg_median, _PALETTE_RGB)]
        mask = self._mask(rgb, bg_median)
        if not mask.any():
            return ShapeReading(background, None, None, tuple(map(float, bg_median)), None, 0.0)
        fg_median = np.median(rgb[mask], axis=0)
        color = _PALETTE_NAMES[_nearest(fg_median, _PALETTE_RGB)]
        if self._classifier is None:
            shape = self.shapes[0]
        else:
            shape = str(self._classifier.predict(_shape_features(mask)[None])[0])
        return ShapeReading(background, color, shape, tuple(map(float, bg_median)),
                            tuple(map(float, fg_median)), float(mask.mean()))

    def score(self, *, images: Sequence[Any], specs: Sequence[Any]) -> ShapesScore:
        """How often each image shows its spec's background, colour and shape (names compared)."""
        rgbs = _as_rgb_list(images)
        _check_lengths(rgbs, specs, "specs")
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
    num = _check_seed("num", num, 1)
    seed = _check_seed("seed", seed)
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
        self.resolution = _check_seed("resolution", resolution, 1)
        self.foreground_distance = _check_distance("foreground_distance", foreground_distance)

    def foreground(self, image: Any) -> np.ndarray:
        """Boolean [64, 64]: the pixels that differ from the image's background."""
        rgb = _as_rgb(image, where="image")
        return _foreground(rgb, _border_median(rgb), self.foreground_distance)

    def score(self, *, images: Sequence[Any], circles: Sequence[tuple[float, float, float]]) -> CirclesScore:
        rgbs = _as_rgb_list(images)
        _check_lengths(rgbs, circles, "circles")
        k = ANALYSIS_RESOLUTION / self.resolution
        ious = []
        for i, (rgb, circle) in enumerate(zip(rgbs, circles)):
            try:
                cx, cy, r = (float(v) for v in circle)
            except (TypeError, ValueError):
                raise ValueError(f"circles[{i}] = {circle!r} must be (cx, cy, r) in pixels") from None
            mask = _foreground(rgb, _border_median(rgb), self.foreground_distance)
            ious.append(_iou(mask, _disc(cx * k, cy * k, r * k, ANALYSIS_RESOLUTION)))
        return CirclesScore(float(np.mean(ious)), tuple(ious))

    def score_items(self, *, images: Sequence[Any], items: Sequence[Mapping[str, Any]]) -> CirclesScore:
        """``score`` with targets taken from ``circles`` dataset items (their ``circle``)."""
        return self.score(images=images, circles=[it["circle"] for it in items])

    def random_circle_iou(self, *, num: int = 1000, seed: int = 0) -> float:
        """``random_circle_iou`` at this analyzer's resolution with CirclesConfig's size range."""
        return random_circle_iou(num=num, seed=seed, resolution=self.resolution)


# ---------------------------------------------------------------------------------------------
# digits


@dataclass(frozen=True)
class DigitsScore:
    """Fraction of images the classifier reads as their label, and what it read for each."""

    accuracy: float
    predictions: tuple[int, ...]

    @property
    def value(self) -> float:
        return self.accuracy


def _digit_features(rgb: np.ndarray) -> np.ndarray:
    """[64, 64, 3] -> 64 values in 0..16 laid out like load_digits (8x8 cell means of the grey
    image, contrast-stretched so a dim or lifted background reads the same)."""
    grey = rgb.mean(axis=2)
    lo, hi = grey.min(), grey.max()
    grey = (grey - lo) / (hi - lo) if hi - lo > 1e-6 else np.zeros_like(grey)
    cell = ANALYSIS_RESOLUTION // 8
    return (grey.reshape(8, cell, 8, cell).mean(axis=(1, 3)) * 16.0).ravel().astype(np.float32)


class DigitsAnalyzer:
    """Reads handwritten digits with an SVM fitted only on the ``classifier`` split.

    At construction the split's images are drawn as the ``digits`` set draws them; the last
    ``holdout`` (in split order) are held back, the rest fit the SVM (with copies shifted by
    ``shift`` pixels, so a digit drawn a little off-centre is still read). ``classifier_accuracy``
    is its accuracy on the held-back images. No ``train``-split image is ever used.
    """

    def __init__(self, *, holdout: int = 200, shift: int = 4):
        from sklearn.svm import SVC

        split = digits_split(split="classifier")
        holdout = _check_seed("holdout", holdout, 1)
        if holdout >= len(split) - 100:
            raise ValueError(f"holdout={holdout} leaves fewer than 100 of the {len(split)} classifier "
                             f"images to fit on; pass holdout <= {len(split) - 101}")
        shift = _check_seed("shift", shift)
        images, labels = digits_source()
        rgbs = [render_digit(image=images[s], resolution=ANALYSIS_RESOLUTION).astype(np.float32)
                for s in split]
        fit_rgbs, held_rgbs = rgbs[:-holdout], rgbs[-holdout:]
        fit_y, held_y = labels[split[:-holdout]], labels[split[-holdout:]]
        offsets = [(0, 0)] + ([(shift, 0), (-shift, 0), (0, shift), (0, -shift)] if shift else [])
        x = np.stack([_digit_features(_shifted(rgb, dy, dx)) for dy, dx in offsets for rgb in fit_rgbs])
        y = np.concatenate([fit_y] * len(offsets))
        self._classifier = SVC(C=10.0, gamma=0.001).fit(x, y)
        held = self._classifier.predict(np.stack([_digit_features(r) for r in held_rgbs]))
        self._classifier_accuracy = float(np.mean(held == held_y))
        self.source_indices: tuple[int, ...] = tuple(int(s) for s in split)

    @property
    def classifier_accuracy(self) -> float:
        """Accuracy on the held-back part of the classifier split."""
        return self._classifier_accuracy

    def predict(self, *, images: Sequence[Any]) -> list[int]:
        """The digit read in each image."""
        return self._predict(_as_rgb_list(images))

    def _predict(self, rgbs: list[np.ndarray]) -> list[int]:
        if not rgbs:
            return []
        return [int(v) for v in self._classifier.predict(np.stack([_digit_features(r) for r in rgbs]))]

    def score(self, *, images: Sequence[Any], labels: Sequence[int]) -> DigitsScore:
        rgbs = _as_rgb_list(images)
        _check_lengths(rgbs, labels, "labels")
        bad = [v for v in labels if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= 9]
        if bad:
            raise ValueError(f"labels {bad[:5]} are not digits; pass ints 0..9 (items' 'label')")
        predictions = self._predict(rgbs)
        accuracy = float(np.mean([p == int(t) for p, t in zip(predictions, labels)]))
        return DigitsScore(accuracy, tuple(predictions))

    def score_items(self, *, images: Sequence[Any], items: Sequence[Mapping[str, Any]]) -> DigitsScore:
        """``score`` with targets taken from ``digits`` dataset items (their ``label``)."""
        return self.score(images=images, labels=[it["label"] for it in items])


def _shifted(rgb: np.ndarray, dy: int, dx: int) -> np.ndarray:
    # Shift in black (the digits' background) instead of wrapping strokes around the edge.
    out = np.zeros_like(rgb)
    h, w = rgb.shape[:2]
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        rgb[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


# ---------------------------------------------------------------------------------------------
# mnist

#: Side of the grey image MnistAnalyzer's SVM reads: at 16x16 it matches 28x28 in accuracy on the
#: held-out digits (0.97) and fits in half the time.
_MNIST_FEATURE_SIDE = 16


def _mnist_features(rgb: np.ndarray) -> np.ndarray:
    """[64, 64, 3] -> 256 values in 0..1: the grey image, contrast-stretched (a dim or lifted
    background reads the same) and downsampled to 16x16."""
    grey = rgb.mean(axis=2)
    lo, hi = grey.min(), grey.max()
    grey = (grey - lo) / (hi - lo) if hi - lo > 1e-6 else np.zeros_like(grey)
    small = Image.fromarray(grey.astype(np.float32)).resize((_MNIST_FEATURE_SIDE, _MNIST_FEATURE_SIDE),
                                                           Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.float32).ravel()


@functools.lru_cache(maxsize=4)
def _fit_mnist_classifier(holdout_per_digit: int, shift: int,
                          split_name: str = "classifier") -> tuple[Any, float, tuple[int, ...]]:
    # Cached: evaluation builds a fresh analyzer per call (analyzer_for(name)()), and the fit takes
    # a few seconds; a fitted SVC is only read afterwards, so instances can share it.
    from sklearn.svm import SVC
    from threadpoolctl import threadpool_limits

    images, labels = mnist_source()
    split = mnist_split(split=split_name)
    y = labels[split]
    held = np.zeros(len(split), dtype=bool)
    for digit in range(10):  # the last holdout_per_digit of each digit, in split order
        held[np.flatnonzero(y == digit)[-holdout_per_digit:]] = True
    rgbs = [render_mnist(image=images[s], resolution=ANALYSIS_RESOLUTION).astype(np.float32) for s in split]
    fit_rgbs = [r for r, h in zip(rgbs, held) if not h]
    offsets = [(0, 0)] + ([(shift, 0), (-shift, 0), (0, shift), (0, -shift)] if shift else [])
    x = np.stack([_mnist_features(_shifted(rgb, dy, dx)) for dy, dx in offsets for rgb in fit_rgbs])
    # One BLAS thread: on small problems numpy's thread pools fight (see ShapesAnalyzer).
    with threadpool_limits(limits=1):
        classifier = SVC(C=10.0, gamma="scale").fit(x, np.concatenate([y[~held]] * len(offsets)))
        predicted = classifier.predict(np.stack([_mnist_features(r) for r, h in zip(rgbs, held) if h]))
    return classifier, float(np.mean(predicted == y[held])), tuple(int(s) for s in split)


class MnistAnalyzer(DigitsAnalyzer):
    """Reads real MNIST digits with an RBF SVM fitted only on the ``mnist`` ``classifier`` split.

    Of the split's 1,500 images (150 per digit), the last ``holdout_per_digit`` of each digit (in
    split order) are held back; the rest (1,200 by default) fit the SVM on 16x16 grey images, with
    copies shifted by ``shift`` pixels at 64 px so an off-centre digit is still read.
    ``classifier_accuracy`` is its accuracy on the held-back 300 (0.97). No ``train`` or
    ``validation`` image is ever used. The fit (~3 s) is cached per (holdout_per_digit, shift).
    ``predict``, ``score`` and ``score_items`` are DigitsAnalyzer's, so results are DigitsScore.

    ``split='validation'`` fits the same SVM on the 500-image validation split instead (40 of each
    digit, 10 held back): the score recipe sweeps are chosen by, so that no recipe choice ever looks
    at the classifier split the published figures come from (DPImageBench's rule).
    """

    def __init__(self, *, holdout_per_digit: int | None = None, shift: int = 2, split: str = "classifier"):
        if split not in ("classifier", "validation"):
            raise ValueError(f"split={split!r}: an analyzer fits on 'classifier' (published figures) or "
                             "'validation' (recipe choices); never on 'train'")
        per_digit = 150 if split == "classifier" else 50
        if holdout_per_digit is None:
            holdout_per_digit = 30 if split == "classifier" else 10
        holdout_per_digit = _check_seed("holdout_per_digit", holdout_per_digit, 1)
        if holdout_per_digit > per_digit - 30:
            raise ValueError(f"holdout_per_digit={holdout_per_digit} leaves fewer than 30 of each digit's {per_digit} "
                             f"{split} images to fit on; pass holdout_per_digit <= {per_digit - 30}")
        shift = _check_seed("shift", shift)
        if shift > ANALYSIS_RESOLUTION // 4:
            raise ValueError(f"shift={shift} pixels would push digits out of the {ANALYSIS_RESOLUTION}-px frame; "
                             f"pass 0..{ANALYSIS_RESOLUTION // 4} (default 2)")
        self._classifier, self._classifier_accuracy, self.source_indices = \
            _fit_mnist_classifier(holdout_per_digit, shift, split)
        self._holdout_per_digit = holdout_per_digit

    @property
    def held_out_indices(self) -> tuple[int, ...]:
        """``mnist_source()`` indices of the held-back images ``classifier_accuracy`` is measured on."""
        from .mnist import mnist_source

        labels = mnist_source()[1][list(self.source_indices)]
        held = [np.flatnonzero(labels == digit)[-self._holdout_per_digit:] for digit in range(10)]
        return tuple(self.source_indices[i] for i in sorted(np.concatenate(held).tolist()))

    def _predict(self, rgbs: list[np.ndarray]) -> list[int]:
        if not rgbs:
            return []
        return [int(v) for v in self._classifier.predict(np.stack([_mnist_features(r) for r in rgbs]))]


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
        self.distance = _check_distance("distance", distance)
        if not isinstance(blends, bool):
            raise ValueError(f"blends={blends!r} must be True or False")
        self.blends = blends

    def match(self, image: Any) -> np.ndarray:
        """Boolean [64, 64]: the pixels drawn in the style's colours."""
        return self._match(_as_rgb(image, where="image"))

    def _match(self, rgb: np.ndarray) -> np.ndarray:
        d = np.linalg.norm(rgb[:, :, None, :] - _STYLE_RGB[None, None], axis=3).min(axis=2)
        if self.blends:
            for first, second in STYLE_STRIPES:
                a, b = (np.asarray(STYLE_PALETTE[n], dtype=np.float32) for n in (first, second))
                d = np.minimum(d, _segment_distances(rgb, a, b))
        return d <= self.distance

    def score(self, *, images: Sequence[Any]) -> StyleScore:
        rgbs = _as_rgb_list(images)
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
