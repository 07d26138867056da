"""Captioned datasets drawn in code: ``circles`` (fill50k-style hint -> image) and ``shapes``.

Nothing is stored: item i is drawn from a numpy generator seeded with (seed, dataset, i), so a
50,000-item set costs nothing to build, any item can be redrawn alone, and DataLoader workers
need no shared state. Geometry uses pixel centres: pixel (x, y) covers [x, x+1) x [y, y+1) and
is inside a shape when its centre (x + 0.5, y + 0.5) is, so analyzers can rebuild every mask
from the exposed attributes (or call ``mask(index)``). Edges are not anti-aliased, so every
pixel is exactly the shape colour or the background colour.
"""

from __future__ import annotations

import abc

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from .base import CaptionedImageDataset
from .registry import config_factory, register_procedural_dataset
from .transforms import array_to_tensor

__all__ = [
    "PALETTE",
    "SHAPES",
    "CirclesConfig",
    "CircleSpec",
    "CirclesDataset",
    "ShapesConfig",
    "ShapeSpec",
    "ShapesDataset",
    "ProceduralDataset",
    "caption_for",
]

RGB = tuple[int, int, int]

#: Named colours, pairwise at least ~100 apart in RGB so a drawn colour maps back to one name.
PALETTE: Mapping[str, RGB] = MappingProxyType({
    "red": (215, 30, 35),
    "orange": (250, 140, 10),
    "yellow": (250, 235, 60),
    "green": (30, 160, 60),
    "light blue": (120, 195, 245),
    "blue": (30, 60, 210),
    "purple": (150, 50, 170),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
})


def _star(n_points: int = 5, inner: float = 0.45) -> tuple[tuple[float, float], ...]:
    pts = []
    for k in range(2 * n_points):
        radius = 1.0 if k % 2 == 0 else inner
        a = -math.pi / 2 + k * math.pi / n_points  # first point straight up
        pts.append((radius * math.cos(a), radius * math.sin(a)))
    return tuple(pts)


_SIN60 = math.sqrt(3) / 2
#: Shapes as polygons in unit coordinates (y down), centred on (0, 0) and within radius 1;
#: None is the circle. ``size`` scales them: circle radius, square half-side, polygon circumradius.
SHAPES: Mapping[str, tuple[tuple[float, float], ...] | None] = MappingProxyType({
    "circle": None,
    "square": ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)),
    "triangle": ((0.0, -1.0), (_SIN60, 0.5), (-_SIN60, 0.5)),
    "diamond": ((0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)),
    "star": _star(),
})


def caption_for(*, shape: str, color: str, background: str) -> str:
    """'a red circle on a light blue background' (with 'an' before a vowel)."""
    article = "an" if color[0].lower() in "aeiou" else "a"
    bg_article = "an" if background[0].lower() in "aeiou" else "a"
    return f"{article} {color} {shape} on {bg_article} {background} background"


# ---------------------------------------------------------------------------------------------
# configs


def _normalise_palette(palette: Any) -> tuple[tuple[str, RGB], ...]:
    if palette is None:
        return tuple(PALETTE.items())
    if isinstance(palette, Mapping):
        items = list(palette.items())
    elif isinstance(palette, Sequence) and not isinstance(palette, str):
        if all(isinstance(p, str) for p in palette):
            unknown = [p for p in palette if p not in PALETTE]
            if unknown:
                raise ValueError(f"palette colours {unknown} are not in PALETTE; use names from "
                                 f"{list(PALETTE)} or pass a mapping name -> (r, g, b)")
            items = [(p, PALETTE[p]) for p in palette]
        else:
            items = list(palette)  # (name, rgb) pairs, e.g. a normalised palette passed back in
    else:
        raise ValueError(f"palette={palette!r} must be None, a list of PALETTE names or a mapping "
                         "name -> (r, g, b)")
    out: list[tuple[str, RGB]] = []
    for item in items:
        try:
            name, rgb = item
            rgb = tuple(int(c) for c in rgb) if all(
                isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in rgb) else None
        except (TypeError, ValueError):
            name, rgb = item, None
        if not isinstance(name, str) or not name.strip() or rgb is None or len(rgb) != 3 \
                or not all(0 <= c <= 255 for c in rgb):
            raise ValueError(f"palette entry {item!r} must be a colour name and an (r, g, b) of ints "
                             "in 0..255, e.g. ('teal', (0, 128, 128))")
        out.append((name, rgb))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"palette names {names} repeat; give each colour one name")
    if len(out) < 2:
        raise ValueError(f"palette {names} needs at least 2 colours (a shape and its background)")
    return tuple(out)


def _check_common(cfg: Any) -> None:
    for name, low in (("num_items", 1), ("resolution", 16), ("seed", 0), ("num_subjects", 0)):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name}={value!r} must be an int >= {low}")
        object.__setattr__(cfg, name, int(value))
    object.__setattr__(cfg, "palette", _normalise_palette(cfg.palette))
    try:
        lo, hi = (float(v) for v in cfg.size_range)
    except (TypeError, ValueError):
        lo = hi = float("nan")
    if not 0.0 < lo <= hi <= 0.5:
        raise ValueError(f"size_range={cfg.size_range!r} must be (low, high) fractions of the resolution "
                         "with 0 < low <= high <= 0.5, e.g. (0.12, 0.4)")
    object.__setattr__(cfg, "size_range", (lo, hi))


@dataclass(frozen=True)
class CirclesConfig:
    """The ``circles`` task (fill50k-style). Validated on construction.

    num_items: how many items; resolution: side in pixels; seed: any int >= 0.
    palette: None (all of PALETTE), a list of PALETTE names, or a mapping name -> (r, g, b).
    size_range: radius range as fractions of the resolution; every circle lies fully inside.
    outline_width: hint outline width in pixels; None means max(1, resolution / 32).
    num_subjects: 0 for no subject ids, else item i belongs to ``f"subject-{i % num_subjects}"``.
    """

    num_items: int = 50_000
    resolution: int = 64
    seed: int = 0
    palette: Any = None
    size_range: tuple[float, float] = (0.1, 0.35)
    outline_width: float | None = None
    num_subjects: int = 0

    def __post_init__(self) -> None:
        _check_common(self)
        if self.outline_width is None:
            object.__setattr__(self, "outline_width", max(1.0, self.resolution / 32))
        elif isinstance(self.outline_width, bool) or not isinstance(self.outline_width, (int, float)) \
                or not 0 < self.outline_width <= self.resolution / 4:
            raise ValueError(f"outline_width={self.outline_width!r} must be a number of pixels in "
                             f"(0, {self.resolution / 4}], or None for max(1, resolution / 32)")
        else:
            object.__setattr__(self, "outline_width", float(self.outline_width))


@dataclass(frozen=True)
class ShapesConfig:
    """The ``shapes`` set: one shape of one colour on a plain background. Validated on construction.

    shapes: names from SHAPES to draw from (default: all). size_range: the shape's size (see
    SHAPES) as fractions of the resolution; every shape lies fully inside. Other fields as in
    CirclesConfig.
    """

    num_items: int = 10_000
    resolution: int = 64
    seed: int = 0
    palette: Any = None
    shapes: tuple[str, ...] = tuple(SHAPES)
    size_range: tuple[float, float] = (0.12, 0.4)
    num_subjects: int = 0

    def __post_init__(self) -> None:
        _check_common(self)
        shapes = (self.shapes,) if isinstance(self.shapes, str) else self.shapes
        try:
            shapes = tuple(shapes)
        except TypeError:
            shapes = ()
        unknown = [s for s in shapes if s not in SHAPES]
        if not shapes or unknown or len(set(shapes)) != len(shapes):
            raise ValueError(f"shapes={self.shapes!r} must be distinct names from {list(SHAPES)}")
        object.__setattr__(self, "shapes", shapes)


# ---------------------------------------------------------------------------------------------
# item specs


@dataclass(frozen=True)
class CircleSpec:
    """One circles item: fill colour, background colour, centre (cx, cy) and radius r in pixels."""

    color: str
    background: str
    color_rgb: RGB
    background_rgb: RGB
    cx: float
    cy: float
    r: float

    @property
    def caption(self) -> str:
        return caption_for(shape="circle", color=self.color, background=self.background)


@dataclass(frozen=True)
class ShapeSpec:
    """One shapes item: which shape, its colour, the background, its size and centre in pixels."""

    shape: str
    color: str
    background: str
    color_rgb: RGB
    background_rgb: RGB
    size: float
    center: tuple[float, float]

    @property
    def caption(self) -> str:
        return caption_for(shape=self.shape, color=self.color, background=self.background)


# ---------------------------------------------------------------------------------------------
# drawing (numpy masks on pixel centres)


def _grid(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(resolution, dtype=np.float64) + 0.5
    return c[None, :], c[:, None]  # x [1, W], y [H, 1]: broadcast to [H, W]


def _polygon_mask(xs: np.ndarray, ys: np.ndarray, poly: Sequence[tuple[float, float]]) -> np.ndarray:
    """Even-odd rule; handles the non-convex star."""
    inside = np.zeros(np.broadcast_shapes(xs.shape, ys.shape), dtype=bool)
    n = len(poly)
    for k in range(n):
        (x0, y0), (x1, y1) = poly[k], poly[(k + 1) % n]
        if y0 == y1:
            continue
        crosses = (ys >= min(y0, y1)) & (ys < max(y0, y1))
        x_at = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xs < x_at)
    return inside


def _compose(mask: np.ndarray, color: RGB, background: RGB) -> np.ndarray:
    out = np.empty((*mask.shape, 3), dtype=np.uint8)
    out[...] = np.asarray(background, dtype=np.uint8)
    out[mask] = np.asarray(color, dtype=np.uint8)
    return out


# ---------------------------------------------------------------------------------------------
# datasets


class ProceduralDataset(CaptionedImageDataset):
    """Base of the procedural sets: lazily drawn items, deterministic in (seed, index).

    Subclasses set ``name`` and implement ``attributes(index)`` (cheap: draws no pixels) and
    ``render(spec)`` -> (image uint8 [H, W, 3], hint uint8 [H, W, 3] or None).
    """

    name: str = ""

    def __init__(self, config: Any):
        self.config = config
        self._stream = zlib.crc32(self.name.encode())  # different sets never share random streams
        self._x, self._y = _grid(config.resolution)
        self._palette = config.palette

    def __len__(self) -> int:
        return self.config.num_items

    def rng(self, index: int) -> np.random.Generator:
        """The generator item ``index`` is drawn from."""
        return np.random.default_rng([self.config.seed, self._stream, self._check_index(index)])

    def _pick_colors(self, rng: np.random.Generator) -> tuple[tuple[str, RGB], tuple[str, RGB]]:
        # Two distinct colours; cheaper than rng.choice(replace=False), which matters for captions().
        n = len(self._palette)
        fg = int(rng.integers(n))
        bg = int(rng.integers(n - 1))
        bg += bg >= fg
        return self._palette[fg], self._palette[bg]

    def _place(self, rng: np.random.Generator) -> tuple[float, float, float]:
        res = self.config.resolution
        lo, hi = self.config.size_range
        u = rng.random(3)
        size = float(lo + (hi - lo) * u[0]) * res
        cx, cy = (float(size + (res - 2 * size) * v) for v in u[1:])
        return cx, cy, size

    @abc.abstractmethod
    def attributes(self, index: int) -> Any: ...

    @abc.abstractmethod
    def render(self, spec: Any) -> tuple[np.ndarray, np.ndarray | None]: ...

    def caption(self, index: int) -> str:
        return self.attributes(index).caption

    def subject(self, index: int) -> str | None:
        i = self._check_index(index)
        return f"subject-{i % self.config.num_subjects}" if self.config.num_subjects else None

    def _extra(self, spec: Any) -> dict[str, Any]:
        return {}

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = self._check_index(index)
        spec = self.attributes(i)
        image, hint = self.render(spec)
        return {
            "pixel_values": array_to_tensor(image, value_range=(-1.0, 1.0)),
            "caption": spec.caption,
            "hint": None if hint is None else array_to_tensor(hint, value_range=(0.0, 1.0)),
            "subject": self.subject(i),
            "index": i,
            "path": f"procedural:{self.name}/{i}",
            "attributes": spec,
            **self._extra(spec),
        }


class CirclesDataset(ProceduralDataset):
    """fill50k-style items: the hint is a white circle outline on black, the image the same circle
    filled with one palette colour on a background of another; items carry ``circle`` = (cx, cy, r)."""

    name = "circles"
    has_hints = True

    def __init__(self, config: CirclesConfig | None = None):
        if config is None:
            config = CirclesConfig()
        if not isinstance(config, CirclesConfig):
            raise TypeError(f"config={config!r} must be a CirclesConfig(...)")
        super().__init__(config)

    def attributes(self, index: int) -> CircleSpec:
        rng = self.rng(index)
        (fg, fg_rgb), (bg, bg_rgb) = self._pick_colors(rng)
        cx, cy, r = self._place(rng)
        return CircleSpec(fg, bg, fg_rgb, bg_rgb, cx, cy, r)

    def _distance(self, spec: CircleSpec) -> np.ndarray:
        return np.hypot(self._x - spec.cx, self._y - spec.cy)

    def mask(self, index: int) -> np.ndarray:
        """Boolean [H, W]: the pixels of the filled circle."""
        spec = self.attributes(index)
        return self._distance(spec) <= spec.r

    def render(self, spec: CircleSpec) -> tuple[np.ndarray, np.ndarray]:
        d = self._distance(spec)
        image = _compose(d <= spec.r, spec.color_rgb, spec.background_rgb)
        outline = np.abs(d - spec.r) <= self.config.outline_width / 2
        hint = _compose(outline, (255, 255, 255), (0, 0, 0))
        return image, hint

    def _extra(self, spec: CircleSpec) -> dict[str, Any]:
        return {"circle": (spec.cx, spec.cy, spec.r)}


class ShapesDataset(ProceduralDataset):
    """One shape (circle, square, triangle, diamond, star) of one colour on another; no hints."""

    name = "shapes"
    has_hints = False

    def __init__(self, config: ShapesConfig | None = None):
        if config is None:
            config = ShapesConfig()
        if not isinstance(config, ShapesConfig):
            raise TypeError(f"config={config!r} must be a ShapesConfig(...)")
        super().__init__(config)

    def attributes(self, index: int) -> ShapeSpec:
        rng = self.rng(index)
        shape = self.config.shapes[int(rng.integers(len(self.config.shapes)))]
        (fg, fg_rgb), (bg, bg_rgb) = self._pick_colors(rng)
        cx, cy, size = self._place(rng)
        return ShapeSpec(shape, fg, bg, fg_rgb, bg_rgb, size, (cx, cy))

    def _mask(self, spec: ShapeSpec) -> np.ndarray:
        cx, cy = spec.center
        unit = SHAPES[spec.shape]
        if unit is None:
            return np.hypot(self._x - cx, self._y - cy) <= spec.size
        poly = [(cx + spec.size * u, cy + spec.size * v) for u, v in unit]
        return _polygon_mask(self._x, self._y, poly)

    def mask(self, index: int) -> np.ndarray:
        """Boolean [H, W]: the pixels of the shape."""
        return self._mask(self.attributes(index))

    def render(self, spec: ShapeSpec) -> tuple[np.ndarray, None]:
        return _compose(self._mask(spec), spec.color_rgb, spec.background_rgb), None


register_procedural_dataset(name="circles", factory=config_factory(CirclesConfig, CirclesDataset))
register_procedural_dataset(name="shapes", factory=config_factory(ShapesConfig, ShapesDataset))
