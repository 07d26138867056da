"""Pictures people look at: sample grids and simple line charts, drawn with Pillow alone.

PNGs are written with no text chunks: a privdiff image never carries prompts, paths or settings
unless the caller passes them explicitly as `metadata`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin


def to_pil(image) -> Image.Image:
    """A PIL image from PIL, a HWC array (uint8 or float in 0..1) or a CHW tensor in -1..1."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if hasattr(image, "detach"):  # torch tensor, CHW in [-1, 1] as the datasets return them
        array = ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    else:
        array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return Image.fromarray(array).convert("RGB")


def _wrap(text: str, width_chars: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width_chars:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def make_grid(
    images: Sequence,
    *,
    columns: int | None = None,
    labels: Sequence[str] | None = None,
    cell_size: int | None = None,
    padding: int = 2,
) -> Image.Image:
    """Lay images out in a grid, optionally with a short label under each."""
    if not images:
        raise ValueError("make_grid needs at least one image.")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images: pass one label per image.")
    pictures = [to_pil(im) for im in images]
    size = cell_size or max(max(p.size) for p in pictures)
    pictures = [p.resize((size, size), Image.NEAREST) if p.size != (size, size) else p for p in pictures]
    columns = columns or int(np.ceil(np.sqrt(len(pictures))))
    rows = int(np.ceil(len(pictures) / columns))
    font = ImageFont.load_default()
    label_lines = [_wrap(t, max(4, size // 6)) for t in labels] if labels else [[] for _ in pictures]
    label_height = 11 * max((len(lines) for lines in label_lines), default=0)
    cell_h = size + label_height
    grid = Image.new("RGB", (columns * (size + padding) + padding, rows * (cell_h + padding) + padding), "white")
    draw = ImageDraw.Draw(grid)
    for index, (picture, lines) in enumerate(zip(pictures, label_lines)):
        x = padding + (index % columns) * (size + padding)
        y = padding + (index // columns) * (cell_h + padding)
        grid.paste(picture, (x, y))
        for n, line in enumerate(lines):
            draw.text((x + 1, y + size + 11 * n), line, fill="black", font=font)
    return grid


def save_png(image: Image.Image, path: str | Path, *, metadata: dict[str, str] | None = None) -> Path:
    """Save a PNG with no metadata unless asked (no prompts, paths or workflow in the file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, value)
    image.save(path, format="PNG", pnginfo=info)
    return path


def line_chart(
    series: dict[str, Sequence[float]],
    *,
    title: str,
    x_label: str = "step",
    note: str | None = None,
    size: tuple[int, int] = (480, 300),
) -> Image.Image:
    """A small line chart (loss curves and the like); `note` is printed under the title."""
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"]
    width, height = size
    left, right, top, bottom = 52, 12, 40 if note else 26, 30
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((left, 6), title, fill="black", font=font)
    if note:
        draw.text((left, 20), note, fill="#b00000", font=font)
    values = [v for ys in series.values() for v in ys if np.isfinite(v)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    longest = max((len(ys) for ys in series.values()), default=1)
    plot_w, plot_h = width - left - right, height - top - bottom
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    for frac in (0.0, 0.5, 1.0):
        y = top + plot_h * (1 - frac)
        draw.text((4, y - 5), f"{lo + frac * (hi - lo):.3g}", fill="black", font=font)
    draw.text((left, height - 14), f"{x_label}: 0 .. {max(longest - 1, 0)}", fill="black", font=font)
    for n, (name, ys) in enumerate(series.items()):
        color = colors[n % len(colors)]
        points = [
            (left + plot_w * i / max(longest - 1, 1), top + plot_h * (1 - (v - lo) / (hi - lo)))
            for i, v in enumerate(ys)
            if np.isfinite(v)
        ]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        elif points:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=color)
        draw.text((width - right - 120, top + 4 + 12 * n), name, fill=color, font=font)
    return image
