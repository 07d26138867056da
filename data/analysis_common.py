"""What every analyzer shares: the analysis resolution, the colour distances, the evaluation seed
offset, and turning images (PIL, numpy, tensors) into float RGB arrays at that resolution."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .transforms import to_rgb

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


# ---------------------------------------------------------------------------------------------
# image input


def as_rgb(image: Any, *, where: str) -> np.ndarray:
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


def as_rgb_list(images: Any) -> list[np.ndarray]:
    if isinstance(images, Image.Image) or (hasattr(images, "ndim") and images.ndim < 4):
        raise ValueError("images must be a sequence of images (a list, or an [N, H, W, 3] array); "
                         "wrap a single image in a list")
    return [as_rgb(im, where=f"images[{i}]") for i, im in enumerate(images)]


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


def check_lengths(images: Sequence[Any], targets: Sequence[Any], name: str) -> None:
    if len(images) != len(targets):
        raise ValueError(f"got {len(images)} images and {len(targets)} {name}; pass one target per image")
    if len(images) == 0:
        raise ValueError("images is empty; pass at least one image to score")


def border_median(rgb: np.ndarray) -> np.ndarray:
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]], axis=0)
    return np.median(border, axis=0)


def nearest(rgb: np.ndarray, table: np.ndarray) -> int:
    return int(np.argmin(np.linalg.norm(table - rgb[None, :], axis=1)))


def foreground(rgb: np.ndarray, background: np.ndarray, distance: float) -> np.ndarray:
    return np.linalg.norm(rgb - background[None, None, :], axis=2) > distance


def check_distance(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 442:
        raise ValueError(f"{name}={value!r} must be an RGB distance in (0, 442), e.g. 50")
    return float(value)


def check_seed(name: str, value: Any, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")
    return int(value)
