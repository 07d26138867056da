"""A dataset over images already in memory: a channels-last float batch (ComfyUI's IMAGE layout,
also numpy's) with one caption per image, or one caption for all."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .base import CaptionedImageDataset, DatasetError


def split_captions(text: str, *, count: int) -> list[str]:
    """One caption per line; a single line is every image's caption. Blank lines are ignored."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise DatasetError(f"{count} images but {len(lines)} caption lines: give one caption per image "
                           "(one per line, in batch order), or a single line for all of them.")
    return lines


def _square(images: torch.Tensor, *, resolution: int) -> torch.Tensor:
    """[B,H,W,C] in 0..1 -> [B,C,r,r]: resize the short side to r, then crop the centre."""
    x = images.permute(0, 3, 1, 2).float()
    height, width = x.shape[-2:]
    scale = resolution / min(height, width)
    size = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
    if size != (height, width):
        x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return x[..., top:top + resolution, left:left + resolution].clamp(0, 1)


class ImageBatchDataset(CaptionedImageDataset):
    """`images` [B,H,W,3] floats in 0..1 (RGBA and grey are refused), `captions` one per image;
    optional `hints` in the same layout (ControlNet's control images), `subjects` one per image."""

    def __init__(self, *, images: torch.Tensor, captions: Sequence[str], resolution: int = 64,
                 hints: torch.Tensor | None = None, subjects: Sequence[str | None] | None = None):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise DatasetError(f"images must be a [batch, height, width, 3] RGB batch, got shape {tuple(images.shape)}.")
        if len(captions) != len(images):
            raise DatasetError(f"{len(images)} images but {len(captions)} captions: give one caption per image.")
        if hints is not None and (hints.ndim != 4 or len(hints) != len(images) or hints.shape[-1] != 3):
            raise DatasetError(f"hints must be a [{len(images)}, height, width, 3] batch like the images, "
                               f"got shape {tuple(hints.shape)}.")
        if subjects is not None and len(subjects) != len(images):
            raise DatasetError(f"{len(images)} images but {len(subjects)} subjects.")
        if resolution < 8:
            raise DatasetError(f"resolution={resolution} must be at least 8 pixels.")
        self._pixels = _square(images.detach().cpu(), resolution=resolution) * 2 - 1
        self._hints = None if hints is None else _square(hints.detach().cpu(), resolution=resolution)
        self._captions = [str(c) for c in captions]
        self._subjects = list(subjects) if subjects is not None else [None] * len(images)
        self.has_hints = hints is not None

    def __len__(self) -> int:
        return len(self._captions)

    def caption(self, index: int) -> str:
        return self._captions[self._check_index(index)]

    def subject(self, index: int) -> str | None:
        return self._subjects[self._check_index(index)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = self._check_index(index)
        return {"pixel_values": self._pixels[i], "caption": self._captions[i],
                "hint": None if self._hints is None else self._hints[i], "subject": self._subjects[i],
                "index": i, "path": f"memory:{i}"}


def dataset_image_batches(dataset, *, count: int) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """The first `count` items of a dataset as IMAGE batches ([B,H,W,3] in 0..1): images, hints (None
    when the set has none) and captions, e.g. to look at a set, or to take hints for generation."""
    if count < 1:
        raise DatasetError(f"count={count} must be at least 1.")
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    images = torch.stack([(it["pixel_values"] + 1) / 2 for it in items]).permute(0, 2, 3, 1).clamp(0, 1)
    has_hints = all(it.get("hint") is not None for it in items)
    hints = torch.stack([it["hint"] for it in items]).permute(0, 2, 3, 1).clamp(0, 1) if has_hints else None
    return images, hints, [str(it.get("caption", "")) for it in items]
