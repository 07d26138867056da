"""Geometry and tensor conversion shared by image folders and procedural sets.

The geometry (resize the short side, crop, maybe flip) is planned once per item from the image's
size and then applied to the image and to its hint, so a hint stays aligned with its image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

__all__ = [
    "RESAMPLE_FILTERS",
    "Geometry",
    "plan_geometry",
    "apply_geometry",
    "to_rgb",
    "image_to_tensor",
    "hint_to_tensor",
    "array_to_tensor",
]

RESAMPLE_FILTERS: dict[str, Image.Resampling] = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class Geometry:
    """Where an image of ``source_size`` ends up: resized to ``resized_size``, cropped to
    ``box`` (left, top, right, bottom in resized pixels), then mirrored if ``flip``."""

    source_size: tuple[int, int]
    resized_size: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool


def plan_geometry(
    *,
    size: tuple[int, int],
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = False,
    rng: np.random.Generator | None = None,
) -> Geometry:
    """Plan the resize of the short side to ``resolution`` and a square crop of that side.

    A random crop or flip needs ``rng`` (an explicit generator keeps augmentation reproducible).
    """
    w, h = (int(size[0]), int(size[1]))
    if w <= 0 or h <= 0:
        raise ValueError(f"size={size!r} must be positive (width, height)")
    if resolution <= 0:
        raise ValueError(f"resolution={resolution!r} must be a positive number of pixels")
    if (not center_crop or random_flip) and rng is None:
        raise ValueError(
            "a random crop or flip needs rng=np.random.Generator(...); pass one, "
            "or use center_crop=True and random_flip=False"
        )
    # max(): rounding must never leave the long side shorter than the crop.
    if w <= h:
        rw, rh = resolution, max(resolution, round(h * resolution / w))
    else:
        rw, rh = max(resolution, round(w * resolution / h)), resolution
    if center_crop:
        left, top = (rw - resolution) // 2, (rh - resolution) // 2
    else:
        left = int(rng.integers(0, rw - resolution + 1))
        top = int(rng.integers(0, rh - resolution + 1))
    flip = bool(rng.random() < 0.5) if random_flip else False
    return Geometry((w, h), (rw, rh), (left, top, left + resolution, top + resolution), flip)


def apply_geometry(image: Image.Image, geometry: Geometry, *, resample: str = "bicubic") -> Image.Image:
    """Apply a planned geometry to ``image`` (which must have the planned source size)."""
    if image.size != geometry.source_size:
        raise ValueError(
            f"image size {image.size} differs from the planned source size {geometry.source_size}; "
            "plan the geometry from this image's own size"
        )
    if resample not in RESAMPLE_FILTERS:
        raise ValueError(f"resample={resample!r} is not one of {sorted(RESAMPLE_FILTERS)}")
    if image.size != geometry.resized_size:
        image = image.resize(geometry.resized_size, RESAMPLE_FILTERS[resample])
    if geometry.box != (0, 0, *geometry.resized_size):
        image = image.crop(geometry.box)
    if geometry.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels become white, not their hidden colour."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def array_to_tensor(array: np.ndarray, *, value_range: tuple[float, float]) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] scaled linearly from [0, 255] to ``value_range``."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] array, got {array.dtype} {array.shape}")
    lo, hi = value_range
    if not array.flags.writeable:  # np.asarray(PIL image) is read-only; torch wants to own writable memory
        array = array.copy()
    t = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).to(torch.float32)
    # Divide first so 0 and 255 land exactly on the range's ends.
    return (t / 255.0) * (hi - lo) + lo


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 [3, H, W] in [-1, 1] (the VAE's input range)."""
    return array_to_tensor(np.asarray(to_rgb(image), dtype=np.uint8), value_range=(-1.0, 1.0))


def hint_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB hint -> float32 [3, H, W] in [0, 1] (ControlNet's conditioning range)."""
    return array_to_tensor(np.asarray(to_rgb(image), dtype=np.uint8), value_range=(0.0, 1.0))
