"""Small helpers for writing image folders in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _noise_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


@pytest.fixture
def write_image():
    """write_image(path, width=.., height=.., seed=.., mode=..) -> Path: a random-noise image."""

    def write(path: Path, *, width: int = 64, height: int = 64, seed: int = 0, mode: str = "RGB") -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _noise_image(width, height, seed, mode).save(path)
        return path

    return write
