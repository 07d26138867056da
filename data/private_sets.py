"""Private sets for utility measurements: ``digits`` and ``style``, both outside the public domain.

privdiff-tiny is pretrained on the public ``shapes`` grammar: PUBLIC_SHAPES drawn with
PUBLIC_SIZE_RANGE in the full PALETTE on plain backgrounds. A private fine-tune only shows utility
on data the base model cannot already draw, so:

- ``digits``: scikit-learn's bundled handwritten digits (1797 8x8 images, 16 grey levels), upscaled
  and drawn light on dark, captioned "a handwritten digit 3". The 1797 images are split once, by a
  fixed permutation that no dataset seed changes, into ``train`` (what private fine-tunes see) and
  ``classifier`` (seen only by ``DigitsAnalyzer``'s classifier), so the scorer never scores its own
  training data.
- ``style``: the public grammar (one shape on a background) in a palette and texture that
  pretraining never shows: diagonal stripes in two STYLE_PALETTE colours behind a shape striped the
  other way in the other two. Every STYLE_PALETTE colour, and every blend of a stripe pair (what a
  blurry rendering of the stripes gives), is at least STYLE_MIN_DISTANCE from every PALETTE colour
  (checked at import), so ``StyleAnalyzer`` can tell the two palettes apart per pixel.

Both are lazy and deterministic in (seed, index), like the sets in ``privdiff.data.procedural``.
scikit-learn is needed only when a ``digits`` set is built (``pip install privdiff[analysis]``).
"""

from __future__ import annotations

import abc
import functools
import itertools
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image

from .procedural import PALETTE, SHAPES, ProceduralDataset, ShapesConfig, _grid, _polygon_mask
from .registry import config_factory, register_procedural_dataset

__all__ = [
    "PUBLIC_SHAPES",
    "PUBLIC_SIZE_RANGE",
    "public_shapes_config",
    "DIGITS_TOTAL",
    "DIGITS_TRAIN_SIZE",
    "DIGITS_SPLIT_SEED",
    "DIGITS_SPLITS",
    "digits_source",
    "digits_split",
    "render_digit",
    "DigitsConfig",
    "DigitSpec",
    "DigitsDataset",
    "STYLE_PALETTE",
    "STYLE_STRIPES",
    "STYLE_MIN_DISTANCE",
    "segment_distance",
    "StyleConfig",
    "StyleSpec",
    "StyleDataset",
]

RGB = tuple[int, int, int]

# ---------------------------------------------------------------------------------------------
# the public domain that private sets stay out of

#: The shapes privdiff-tiny is pretrained on ("diamond" is kept out for held-out tests).
PUBLIC_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
#: The shape sizes of public pretraining, as fractions of the resolution.
PUBLIC_SIZE_RANGE: tuple[float, float] = (0.2, 0.4)


def public_shapes_config(*, num_items: int, seed: int, resolution: int = 64) -> ShapesConfig:
    """The ``shapes`` config of public pretraining (full PALETTE, PUBLIC_SHAPES, PUBLIC_SIZE_RANGE)."""
    return ShapesConfig(num_items=num_items, resolution=resolution, seed=seed, shapes=PUBLIC_SHAPES,
                        size_range=PUBLIC_SIZE_RANGE)


def _check_ints(cfg: Any, lows: Mapping[str, int]) -> None:
    for name, low in lows.items():
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name}={value!r} must be an int >= {low}")
        object.__setattr__(cfg, name, int(value))


class _PrivateProcedural(ProceduralDataset):
    """ProceduralDataset without a palette: ProceduralDataset.__init__ normalises ``config.palette``,
    which these configs do not have (their colours are fixed), so set up the rest here."""

    def __init__(self, config: Any):
        self.config = config
        self._stream = zlib.crc32(self.name.encode())
        self._x, self._y = _grid(config.resolution)


# ---------------------------------------------------------------------------------------------
# digits

DIGITS_TOTAL = 1797
#: Images in the ``train`` split; the other 797 form the ``classifier`` split.
DIGITS_TRAIN_SIZE = 1000
#: Seeds the one permutation that splits the digits; independent of every dataset seed, so no
#: choice of seed can move a classifier image into training.
DIGITS_SPLIT_SEED = 20_240_521
DIGITS_SPLITS = ("train", "classifier")


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the 'digits' dataset needs scikit-learn's bundled digits; install it with "
                          "`pip install scikit-learn` (or `pip install privdiff[analysis]`)") from exc
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)
    labels = np.asarray(bunch.target, dtype=np.int64)
    if images.shape != (DIGITS_TOTAL, 8, 8):  # pragma: no cover - guards a changed scikit-learn
        raise RuntimeError(f"scikit-learn's load_digits() returned images of shape {images.shape}, "
                           f"expected ({DIGITS_TOTAL}, 8, 8); the digits split assumes that layout")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def digits_source() -> tuple[np.ndarray, np.ndarray]:
    """All of scikit-learn's digits: images float32 [1797, 8, 8] in 0..16 and labels int64 [1797]
    (read-only arrays, loaded once)."""
    return _digits_arrays()


@functools.lru_cache(maxsize=None)
def _split_indices(split: str) -> np.ndarray:
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(DIGITS_TOTAL)
    out = perm[:DIGITS_TRAIN_SIZE] if split == "train" else perm[DIGITS_TRAIN_SIZE:]
    out.setflags(write=False)
    return out


def digits_split(*, split: str) -> np.ndarray:
    """Indices into ``digits_source()`` of ``split`` ('train' or 'classifier'), in split order."""
    if split not in DIGITS_SPLITS:
        raise ValueError(f"split={split!r} must be one of {DIGITS_SPLITS}: 'train' for fine-tuning, "
                         "'classifier' for the analyzer's held-out classifier")
    return _split_indices(split)


def render_digit(*, image: np.ndarray, resolution: int) -> np.ndarray:
    """An 8x8 digit in 0..16 -> uint8 [resolution, resolution, 3], grey ink on black.

    Bicubic upscaling keeps strokes smooth (nearest would draw 8x8 blocks, a texture of its own).
    """
    arr = np.asarray(image, dtype=np.float32)
    if arr.shape != (8, 8):
        raise ValueError(f"image has shape {arr.shape}; pass one 8x8 digit from digits_source()")
    return upscale_grey(values=arr / np.float32(16.0), resolution=resolution)


def upscale_grey(*, values: np.ndarray, resolution: int) -> np.ndarray:
    """A grey image in 0..1 -> uint8 [resolution, resolution, 3], upscaled bicubically (shared by
    ``digits`` and ``mnist``, so both sets' strokes are drawn alike)."""
    big = Image.fromarray(np.asarray(values, dtype=np.float32)).resize((resolution, resolution),
                                                                        Image.Resampling.BICUBIC)
    grey = np.clip(np.rint(np.asarray(big) * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def check_split_config(cfg: Any, *, splits: Sequence[str], size: int) -> None:
    """Validate a labelled-split config (split, num_items <= size with None for all, resolution, seed,
    num_subjects), shared by ``digits`` and ``mnist``."""
    if cfg.split not in splits:
        raise ValueError(f"split={cfg.split!r} must be one of {tuple(splits)}")
    if cfg.num_items is None:
        object.__setattr__(cfg, "num_items", size)
    _check_ints(cfg, {"num_items": 1, "resolution": 8, "seed": 0, "num_subjects": 0})
    if cfg.num_items > size:
        raise ValueError(f"num_items={cfg.num_items} exceeds the {size} images of split "
                         f"{cfg.split!r}; pass num_items <= {size} (or None for all)")


@dataclass(frozen=True)
class DigitsConfig:
    """The ``digits`` set. Validated on construction.

    split: 'train' (private fine-tuning, DIGITS_TRAIN_SIZE images) or 'classifier' (the analyzer's
    held-out images; never train on them). num_items: how many of the split's images (None: all).
    resolution: side in pixels. seed: orders the images (item i is the split's image
    ``order[i]`` of a seeded permutation); it never changes the split itself.
    num_subjects: 0 for no subject ids, else item i belongs to ``f"subject-{i % num_subjects}"``.
    """

    num_items: int | None = None
    resolution: int = 64
    seed: int = 0
    split: str = "train"
    num_subjects: int = 0

    def __post_init__(self) -> None:
        size = len(_split_indices(self.split)) if self.split in DIGITS_SPLITS else 0
        check_split_config(self, splits=DIGITS_SPLITS, size=size)


@dataclass(frozen=True)
class DigitSpec:
    """One labelled digit item (``digits`` or ``mnist``): its label, source index and split."""

    label: int
    source_index: int
    split: str

    @property
    def caption(self) -> str:
        return f"a handwritten digit {self.label}"


class LabelledDigitsDataset(_PrivateProcedural):
    """A split of labelled digit images in a seeded order; items carry ``label`` and ``source_index``.

    Subclasses set ``name`` and ``config_type`` and implement ``split_indices(split)``,
    ``source()`` -> (images, labels) and ``render_source(image, resolution)``.
    """

    config_type: type = type(None)

    def __init__(self, config: Any = None):
        if config is None:
            config = self.config_type()
        if not isinstance(config, self.config_type):
            raise TypeError(f"config={config!r} must be a {self.config_type.__name__}(...)")
        super().__init__(config)
        split = self.split_indices(config.split)
        order = np.random.default_rng([config.seed, self._stream]).permutation(len(split))
        self._sources = split[order[: config.num_items]]
        self._images, self._labels = self.source()

    @abc.abstractmethod
    def split_indices(self, split: str) -> np.ndarray: ...

    @abc.abstractmethod
    def source(self) -> tuple[np.ndarray, np.ndarray]: ...

    @abc.abstractmethod
    def render_source(self, image: np.ndarray, resolution: int) -> np.ndarray: ...

    def attributes(self, index: int) -> DigitSpec:
        src = int(self._sources[self._check_index(index)])
        return DigitSpec(int(self._labels[src]), src, self.config.split)

    def labels(self) -> list[int]:
        """Every item's label, in index order."""
        return [int(v) for v in self._labels[self._sources]]

    def render(self, spec: DigitSpec) -> tuple[np.ndarray, None]:
        return self.render_source(self._images[spec.source_index], self.config.resolution), None

    def _extra(self, spec: DigitSpec) -> dict[str, Any]:
        return {"label": spec.label, "source_index": spec.source_index}


class DigitsDataset(LabelledDigitsDataset):
    """scikit-learn's handwritten digits, light on dark; items carry ``label`` and ``source_index``."""

    name = "digits"
    has_hints = False
    config_type = DigitsConfig

    def split_indices(self, split: str) -> np.ndarray:
        return digits_split(split=split)

    def source(self) -> tuple[np.ndarray, np.ndarray]:
        return digits_source()

    def render_source(self, image: np.ndarray, resolution: int) -> np.ndarray:
        return render_digit(image=image, resolution=resolution)


# ---------------------------------------------------------------------------------------------
# style

#: Colours of the ``style`` set, named with words in privdiff's tokenizer vocabulary. The
#: background is striped in STYLE_STRIPES[0], the shape the other way in STYLE_STRIPES[1].
STYLE_PALETTE: Mapping[str, RGB] = MappingProxyType({
    "magenta": (255, 0, 255),
    "pink": (255, 165, 165),
    "cyan": (15, 255, 240),
    "lime": (120, 255, 15),
})
#: The two stripe pairs: (background stripes, shape stripes).
STYLE_STRIPES: tuple[tuple[str, str], tuple[str, str]] = (("magenta", "pink"), ("cyan", "lime"))
#: Least RGB distance from any STYLE_PALETTE colour, and from any blend of a stripe pair (a
#: blurred stripe), to any PALETTE colour.
STYLE_MIN_DISTANCE = 90.0


def segment_distance(*, point: Sequence[float], a: Sequence[float], b: Sequence[float]) -> float:
    """RGB distance from ``point`` to the nearest blend (1 - t) * a + t * b, 0 <= t <= 1."""
    p, a, b = (np.asarray(v, dtype=np.float64) for v in (point, a, b))
    ab = b - a
    t = float(np.clip(np.dot(p - a, ab) / max(float(np.dot(ab, ab)), 1e-12), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))


def _check_style_palette() -> None:
    # An edit that brings a style colour (or a blend of a stripe pair) near a public colour would
    # silently let public images pass StyleAnalyzer.
    for pname, prgb in PALETTE.items():
        for name, rgb in STYLE_PALETTE.items():
            d = math.dist(rgb, prgb)
            if d < STYLE_MIN_DISTANCE:
                raise RuntimeError(f"STYLE_PALETTE colour {name} {rgb} is only {d:.0f} from PALETTE colour "
                                   f"{pname} {prgb}; choose one at least {STYLE_MIN_DISTANCE:.0f} away")
        for first, second in STYLE_STRIPES:
            d = segment_distance(point=prgb, a=STYLE_PALETTE[first], b=STYLE_PALETTE[second])
            if d < STYLE_MIN_DISTANCE:
                raise RuntimeError(f"blends of the stripe pair {first}/{second} come within {d:.0f} of PALETTE "
                                   f"colour {pname} {prgb}; choose a pair whose blends stay at least "
                                   f"{STYLE_MIN_DISTANCE:.0f} away")


_check_style_palette()


@dataclass(frozen=True)
class StyleConfig:
    """The ``style`` set. Validated on construction.

    shapes / size_range: as in ShapesConfig, defaulting to the public grammar (PUBLIC_SHAPES,
    PUBLIC_SIZE_RANGE) so that only palette and texture are new. stripe_period: pixels per stripe
    pair along x (None: 7 px at 64 px, scaled with the resolution). shape_texture: stripe the
    shape (True) or fill it plainly with its first colour (False). num_subjects as in DigitsConfig.
    """

    num_items: int = 100
    resolution: int = 64
    seed: int = 0
    shapes: tuple[str, ...] = PUBLIC_SHAPES
    size_range: tuple[float, float] = PUBLIC_SIZE_RANGE
    stripe_period: float | None = None
    shape_texture: bool = True
    num_subjects: int = 0

    def __post_init__(self) -> None:
        _check_ints(self, {"num_items": 1, "resolution": 16, "seed": 0, "num_subjects": 0})
        # ShapesConfig validates shapes and size_range the same way for both sets.
        ref = ShapesConfig(num_items=1, resolution=self.resolution, shapes=self.shapes,
                           size_range=self.size_range)
        object.__setattr__(self, "shapes", ref.shapes)
        object.__setattr__(self, "size_range", ref.size_range)
        if self.stripe_period is None:
            object.__setattr__(self, "stripe_period", max(4.0, 7.0 * self.resolution / 64))
        elif isinstance(self.stripe_period, bool) or not isinstance(self.stripe_period, (int, float)) \
                or not 2 <= self.stripe_period <= self.resolution / 2:
            raise ValueError(f"stripe_period={self.stripe_period!r} must be a number of pixels in "
                             f"[2, {self.resolution / 2}], or None for 7 px per 64 px")
        else:
            object.__setattr__(self, "stripe_period", float(self.stripe_period))
        if not isinstance(self.shape_texture, bool):
            raise ValueError(f"shape_texture={self.shape_texture!r} must be True or False")


@dataclass(frozen=True)
class StyleSpec:
    """One style item: the shape, its size and centre in pixels, and the stripes' phase in pixels."""

    shape: str
    size: float
    center: tuple[float, float]
    phase: float

    @property
    def caption(self) -> str:
        return f"a {self.shape} on a striped background"


def _stripes(u: np.ndarray, period: float, a: RGB, b: RGB) -> np.ndarray:
    first = np.mod(u, period) < period / 2
    return np.where(first[..., None], np.asarray(a, np.uint8), np.asarray(b, np.uint8))


class StyleDataset(_PrivateProcedural):
    """Public-grammar shapes in an unseen palette and texture; captions never name the colours."""

    name = "style"
    has_hints = False

    def __init__(self, config: StyleConfig | None = None):
        if config is None:
            config = StyleConfig()
        if not isinstance(config, StyleConfig):
            raise TypeError(f"config={config!r} must be a StyleConfig(...)")
        super().__init__(config)

    def attributes(self, index: int) -> StyleSpec:
        rng = self.rng(index)
        shape = self.config.shapes[int(rng.integers(len(self.config.shapes)))]
        cx, cy, size = self._place(rng)
        phase = float(rng.random() * self.config.stripe_period)
        return StyleSpec(shape, size, (cx, cy), phase)

    def _mask(self, spec: StyleSpec) -> np.ndarray:
        cx, cy = spec.center
        unit = SHAPES[spec.shape]
        if unit is None:
            return np.hypot(self._x - cx, self._y - cy) <= spec.size
        return _polygon_mask(self._x, self._y, [(cx + spec.size * u, cy + spec.size * v) for u, v in unit])

    def mask(self, index: int) -> np.ndarray:
        """Boolean [H, W]: the pixels of the shape."""
        return self._mask(self.attributes(index))

    def render(self, spec: StyleSpec) -> tuple[np.ndarray, None]:
        (a, b), (c, d) = ((STYLE_PALETTE[x], STYLE_PALETTE[y]) for x, y in STYLE_STRIPES)
        period = self.config.stripe_period
        image = _stripes(self._x + self._y + spec.phase, period, a, b)  # "\" diagonals
        if self.config.shape_texture:
            fill = _stripes(self._x - self._y + spec.phase, period, c, d)  # "/" diagonals
        else:
            fill = np.broadcast_to(np.asarray(c, np.uint8), image.shape)
        mask = self._mask(spec)
        image[mask] = fill[mask]
        return image, None


register_procedural_dataset(name="digits", factory=config_factory(DigitsConfig, DigitsDataset))
register_procedural_dataset(name="style", factory=config_factory(StyleConfig, StyleDataset))
