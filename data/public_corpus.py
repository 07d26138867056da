"""privdiff-tiny 2's public pretraining corpus, drawn in code: shapes, printed glyphs and textures.

A base model shows private utility only when it is broad the way SD's corpus is and still has never
seen the private domain. So the corpus mixes three public sets, none with a digit in it:

- ``shapes``: today's grammar (PUBLIC_SHAPES in the named PALETTE, plain backgrounds), which the
  caption-adherence analyzer scores;
- ``glyphs``: Latin letters in both cases and a few symbols in Pillow's built-in scalable font (one
  typeface, so size, stroke width, shear and rotation vary instead), in colours drawn from the whole
  RGB cube, captioned with the nearest colour name ("the capital letter K in dark red on a light
  yellow background");
- ``textures``: stripes, checks, dots and gradients in continuous random colours, captioned by kind
  only ("diagonal stripes"), so the autoencoder learns to reproduce colours nobody named.

Outside the mixture, ``letters`` draws the same font's letters the way MNIST draws digits (light ink
on black, pen-width strokes, fitted to 20x20 and centred by mass in 28x28, then upscaled like
``mnist``): the public set a DP fine-tune on handwriting starts from, as DP-LDM starts MNIST from
EMNIST letters, so the private budget is not spent learning "light strokes on black".

``public`` interleaves them (PUBLIC_MIX). Like every procedural set, item i is drawn from a generator
seeded with (seed, set, i): nothing is stored and any item can be redrawn alone.
"""

from __future__ import annotations

import functools
import math
import string
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .private_sets import _check_ints, _PrivateProcedural, public_shapes_config, upscale_grey
from .procedural import ShapesDataset
from .registry import config_factory, register_procedural_dataset

__all__ = [
    "COLOUR_NAMES",
    "colour_name",
    "GLYPH_LETTERS",
    "GLYPH_SYMBOLS",
    "GlyphsConfig",
    "GlyphSpec",
    "GlyphsDataset",
    "LettersConfig",
    "LetterSpec",
    "LettersDataset",
    "TEXTURE_KINDS",
    "TexturesConfig",
    "TextureSpec",
    "TexturesDataset",
    "PUBLIC_MIX",
    "PublicConfig",
    "PublicDataset",
]

RGB = tuple[int, int, int]

#: Base colour names (all single tokens of privdiff's vocabulary); "dark" and "light" variants are
#: derived from the chromatic ones, so a random colour gets one of ~50 names.
_BASE_COLOURS: Mapping[str, RGB] = MappingProxyType({
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (245, 230, 40), "lime": (150, 230, 40),
    "green": (40, 160, 60), "teal": (20, 140, 140), "cyan": (40, 220, 230), "blue": (40, 80, 220),
    "purple": (130, 50, 180), "magenta": (230, 40, 220), "pink": (245, 150, 190), "brown": (140, 85, 40),
})
_NEUTRALS: Mapping[str, RGB] = MappingProxyType({
    "black": (20, 20, 20), "dark gray": (80, 80, 80), "gray": (135, 135, 135), "light gray": (195, 195, 195),
    "white": (245, 245, 245),
})


def _colour_table() -> dict[str, RGB]:
    table: dict[str, RGB] = {}
    for name, rgb in _BASE_COLOURS.items():
        table[name] = rgb
        table[f"dark {name}"] = tuple(int(round(c * 0.5)) for c in rgb)
        table[f"light {name}"] = tuple(int(round(c + 0.55 * (255 - c))) for c in rgb)
    table.update(_NEUTRALS)
    return table


#: Every name a random colour can get, and the RGB it stands for.
COLOUR_NAMES: Mapping[str, RGB] = MappingProxyType(_colour_table())
_NAMES = tuple(COLOUR_NAMES)
_TABLE = np.asarray(list(COLOUR_NAMES.values()), dtype=np.float64)


def colour_name(rgb: Any) -> str:
    """The nearest COLOUR_NAMES entry to an (r, g, b) (plain RGB distance)."""
    d = np.linalg.norm(_TABLE - np.asarray(rgb, dtype=np.float64)[None, :3], axis=1)
    return _NAMES[int(np.argmin(d))]


def _random_colour(rng: np.random.Generator) -> RGB:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def _contrasting_pair(rng: np.random.Generator, min_distance: float) -> tuple[RGB, RGB]:
    # Rejection keeps foreground and background apart; 64 tries essentially never run out.
    first = _random_colour(rng)
    for _ in range(64):
        second = _random_colour(rng)
        if math.dist(first, second) >= min_distance:
            return first, second
    return first, tuple(255 - c for c in first)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---------------------------------------------------------------------------------------------
# glyphs

#: Letters drawn (both cases); digits stay out of the public corpus on purpose.
GLYPH_LETTERS: str = string.ascii_lowercase + string.ascii_uppercase
#: Symbols drawn, and how captions name them.
GLYPH_SYMBOLS: Mapping[str, str] = MappingProxyType({
    "&": "ampersand", "?": "question mark", "+": "plus sign", "#": "hash sign", "@": "at sign",
    "%": "percent sign", "!": "exclamation mark", "*": "asterisk", "=": "equals sign", "$": "dollar sign",
})
_GLYPHS = tuple(GLYPH_LETTERS) + tuple(GLYPH_SYMBOLS)


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


@dataclass(frozen=True)
class GlyphsConfig:
    """The ``glyphs`` set. Validated on construction.

    size_range: the font's em size as fractions of the resolution. max_rotation: degrees either way.
    max_shear: horizontal shear factor either way. max_stroke: the widest stroke outline in pixels
    (scaled with the resolution). min_contrast: least RGB distance between glyph and background.
    """

    num_items: int = 10_000
    resolution: int = 64
    seed: int = 0
    size_range: tuple[float, float] = (0.45, 0.9)
    max_rotation: float = 15.0
    max_shear: float = 0.3
    max_stroke: int = 2
    min_contrast: float = 120.0
    num_subjects: int = 0

    def __post_init__(self) -> None:
        _check_ints(self, {"num_items": 1, "resolution": 16, "seed": 0, "max_stroke": 0, "num_subjects": 0})
        lo, hi = (float(v) for v in self.size_range)
        if not 0.1 <= lo <= hi <= 1.0:
            raise ValueError(f"size_range={self.size_range!r} must be (low, high) with 0.1 <= low <= high <= 1.0")
        object.__setattr__(self, "size_range", (lo, hi))
        for name, top in (("max_rotation", 45.0), ("max_shear", 0.6), ("min_contrast", 300.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= top:
                raise ValueError(f"{name}={value!r} must be a number in [0, {top}]")


@dataclass(frozen=True)
class GlyphSpec:
    """One glyphs item: the character, its colours, size, stroke, rotation, shear and placement."""

    glyph: str
    color_rgb: RGB
    background_rgb: RGB
    font_size: int
    stroke: int
    rotation: float
    shear: float
    position: tuple[float, float]  # where the glyph's box goes, as fractions of the free space

    @property
    def color(self) -> str:
        return colour_name(self.color_rgb)

    @property
    def background(self) -> str:
        return colour_name(self.background_rgb)

    @property
    def caption(self) -> str:
        if self.glyph in GLYPH_SYMBOLS:
            what = f"{_article(GLYPH_SYMBOLS[self.glyph])} {GLYPH_SYMBOLS[self.glyph]}"
        elif self.glyph.isupper():
            what = f"the capital letter {self.glyph}"
        else:
            what = f"the small letter {self.glyph}"
        return f"{what} in {self.color} on {_article(self.background)} {self.background} background"


def glyph_mask(spec: GlyphSpec, resolution: int) -> np.ndarray:
    """float32 [H, W] coverage in 0..1 of the drawn glyph (anti-aliased edges)."""
    font = _font(spec.font_size)
    canvas = 2 * resolution
    layer = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(layer).text((canvas / 2, canvas / 2), spec.glyph, font=font, fill=255, anchor="mm",
                               stroke_width=spec.stroke, stroke_fill=255)
    # Shear then rotate about the canvas centre (PIL's affine maps output to input coordinates).
    c = canvas / 2
    a = math.radians(spec.rotation)
    cos, sin, k = math.cos(a), math.sin(a), spec.shear
    # inverse of R(a) @ S(k), with S = [[1, k], [0, 1]]
    inv = np.linalg.inv(np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, k], [0.0, 1.0]]))
    offset = np.array([c, c]) - inv @ np.array([c, c])
    layer = layer.transform((canvas, canvas), Image.Transform.AFFINE,
                            (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1]),
                            resample=Image.Resampling.BILINEAR)
    box = layer.getbbox()
    out = np.zeros((resolution, resolution), dtype=np.float32)
    if box is None:
        return out
    glyph = np.asarray(layer.crop(box), dtype=np.float32) / 255.0
    h, w = glyph.shape
    if h > resolution or w > resolution:  # an extreme rotation: shrink to fit
        scale = resolution / max(h, w)
        small = Image.fromarray((glyph * 255).astype(np.uint8)).resize(
            (max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.BILINEAR)
        glyph = np.asarray(small, dtype=np.float32) / 255.0
        h, w = glyph.shape
    top = int(round(spec.position[1] * (resolution - h)))
    left = int(round(spec.position[0] * (resolution - w)))
    out[top:top + h, left:left + w] = glyph
    return out


def _blend(coverage: np.ndarray, color: RGB, background: RGB) -> np.ndarray:
    m = coverage[..., None]
    out = (1.0 - m) * np.asarray(background, np.float32) + m * np.asarray(color, np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class GlyphsDataset(_PrivateProcedural):
    """Printed letters and symbols in random colours; items carry ``glyph``."""

    name = "glyphs"
    has_hints = False

    def __init__(self, config: GlyphsConfig | None = None):
        config = GlyphsConfig() if config is None else config
        if not isinstance(config, GlyphsConfig):
            raise TypeError(f"config={config!r} must be a GlyphsConfig(...)")
        super().__init__(config)

    def attributes(self, index: int) -> GlyphSpec:
        cfg = self.config
        rng = self.rng(index)
        glyph = _GLYPHS[int(rng.integers(len(_GLYPHS)))]
        color, background = _contrasting_pair(rng, cfg.min_contrast)
        lo, hi = cfg.size_range
        u = rng.random(5)
        font_size = max(6, int(round((lo + (hi - lo) * u[0]) * cfg.resolution)))
        stroke = int(rng.integers(cfg.max_stroke + 1)) if cfg.max_stroke else 0
        stroke = int(round(stroke * cfg.resolution / 64))
        rotation = float((2 * u[1] - 1) * cfg.max_rotation)
        shear = float((2 * u[2] - 1) * cfg.max_shear)
        return GlyphSpec(glyph, color, background, font_size, stroke, rotation, shear, (float(u[3]), float(u[4])))

    def mask(self, index: int) -> np.ndarray:
        """float32 [H, W]: the glyph's coverage."""
        return glyph_mask(self.attributes(index), self.config.resolution)

    def render(self, spec: GlyphSpec) -> tuple[np.ndarray, None]:
        return _blend(glyph_mask(spec, self.config.resolution), spec.color_rgb, spec.background_rgb), None

    def _extra(self, spec: GlyphSpec) -> dict[str, Any]:
        return {"glyph": spec.glyph}


# ---------------------------------------------------------------------------------------------
# letters, drawn the way MNIST draws digits

#: MNIST's normalisation: the glyph is fitted into a LETTERS_BOX square (aspect kept) and its centre of
#: mass put at the centre of a LETTERS_SIDE square, which is then upscaled like ``mnist``.
LETTERS_SIDE = 28
LETTERS_BOX = 20
_LETTERS_EM = 64  # font size of the drawing, before the fit to LETTERS_BOX


@dataclass(frozen=True)
class LettersConfig:
    """The ``letters`` set (public; no digits). Validated on construction.

    stroke_range: the pen's outline width in pixels at a 64 px em (so strokes run from the font's thin
    line to a felt tip). max_rotation: degrees either way. max_shear: horizontal shear either way.
    """

    num_items: int = 10_000
    resolution: int = 64
    seed: int = 0
    stroke_range: tuple[int, int] = (0, 2)
    max_rotation: float = 12.0
    max_shear: float = 0.35
    num_subjects: int = 0

    def __post_init__(self) -> None:
        _check_ints(self, {"num_items": 1, "resolution": 16, "seed": 0, "num_subjects": 0})
        lo, hi = self.stroke_range
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= 12):
            raise ValueError(f"stroke_range={self.stroke_range!r} must be (low, high) ints with 0 <= low <= high <= 12")
        for name, top in (("max_rotation", 45.0), ("max_shear", 0.6)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= top:
                raise ValueError(f"{name}={value!r} must be a number in [0, {top}]")


@dataclass(frozen=True)
class LetterSpec:
    """One letters item: the letter, pen width, rotation and shear."""

    glyph: str
    stroke: int
    rotation: float
    shear: float

    @property
    def caption(self) -> str:
        size = "capital letter" if self.glyph.isupper() else "letter"
        return f"a handwritten {size} {self.glyph.lower()}"


def mnist_normalise(coverage: np.ndarray) -> np.ndarray:
    """float32 ink coverage of any size -> float32 [LETTERS_SIDE, LETTERS_SIDE]: fitted into
    LETTERS_BOX (aspect kept, anti-aliased) and centred by mass, as MNIST's digits were."""
    rows, cols = np.nonzero(coverage > 0)
    out = np.zeros((LETTERS_SIDE, LETTERS_SIDE), dtype=np.float32)
    if rows.size == 0:
        return out
    crop = coverage[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
    h, w = crop.shape
    scale = LETTERS_BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(crop.astype(np.float32), mode="F").resize(size, Image.Resampling.LANCZOS),
                       dtype=np.float32).clip(0.0, 1.0)
    total = float(small.sum())
    yy, xx = np.mgrid[: small.shape[0], : small.shape[1]]
    cy, cx = (float((yy * small).sum()) / total, float((xx * small).sum()) / total) if total > 0 else (0.0, 0.0)
    top = int(round((LETTERS_SIDE - 1) / 2 - cy))
    left = int(round((LETTERS_SIDE - 1) / 2 - cx))
    top = min(max(top, 0), LETTERS_SIDE - small.shape[0])
    left = min(max(left, 0), LETTERS_SIDE - small.shape[1])
    out[top: top + small.shape[0], left: left + small.shape[1]] = small
    return out


class LettersDataset(_PrivateProcedural):
    """Letters in pen-width strokes, light on black, normalised like MNIST; items carry ``glyph``."""

    name = "letters"
    has_hints = False

    def __init__(self, config: LettersConfig | None = None):
        config = LettersConfig() if config is None else config
        if not isinstance(config, LettersConfig):
            raise TypeError(f"config={config!r} must be a LettersConfig(...)")
        super().__init__(config)

    def attributes(self, index: int) -> LetterSpec:
        cfg = self.config
        rng = self.rng(index)
        glyph = GLYPH_LETTERS[int(rng.integers(len(GLYPH_LETTERS)))]
        stroke = int(rng.integers(cfg.stroke_range[0], cfg.stroke_range[1] + 1))
        u = rng.random(2)
        return LetterSpec(glyph, stroke, float((2 * u[0] - 1) * cfg.max_rotation),
                          float((2 * u[1] - 1) * cfg.max_shear))

    def coverage(self, spec: LetterSpec) -> np.ndarray:
        """float32 [LETTERS_SIDE, LETTERS_SIDE] ink in 0..1, before upscaling."""
        # Size the font so that every letter's box spans _LETTERS_EM pixels: a small "o" fitted to the box
        # then keeps the pen width a capital "W" has, as a pen (not a scaled font) would.
        left, top, right, bottom = _font(_LETTERS_EM).getbbox(spec.glyph)
        em = max(8, round(_LETTERS_EM * _LETTERS_EM / max(right - left, bottom - top, 1)))
        drawn = glyph_mask(GlyphSpec(spec.glyph, (255, 255, 255), (0, 0, 0), em, spec.stroke,
                                     spec.rotation, spec.shear, (0.5, 0.5)), 3 * _LETTERS_EM)
        return mnist_normalise(drawn)

    def render(self, spec: LetterSpec) -> tuple[np.ndarray, None]:
        return upscale_grey(values=self.coverage(spec), resolution=self.config.resolution), None

    def _extra(self, spec: LetterSpec) -> dict[str, Any]:
        return {"glyph": spec.glyph}


# ---------------------------------------------------------------------------------------------
# textures

#: Texture kinds, drawn with equal probability.
TEXTURE_KINDS: tuple[str, ...] = ("stripes", "checks", "dots", "gradient")


@dataclass(frozen=True)
class TexturesConfig:
    """The ``textures`` set. Validated on construction.

    period_range: pixels per repeat of stripes, checks and dots at 64 px (scaled with the
    resolution). min_contrast: least RGB distance between a texture's two colours.
    """

    num_items: int = 10_000
    resolution: int = 64
    seed: int = 0
    period_range: tuple[float, float] = (8.0, 24.0)
    min_contrast: float = 100.0
    num_subjects: int = 0

    def __post_init__(self) -> None:
        _check_ints(self, {"num_items": 1, "resolution": 16, "seed": 0, "num_subjects": 0})
        lo, hi = (float(v) for v in self.period_range)
        if not 2.0 <= lo <= hi <= 64.0:
            raise ValueError(f"period_range={self.period_range!r} must be (low, high) pixels with 2 <= low <= high <= 64")
        object.__setattr__(self, "period_range", (lo, hi))
        value = self.min_contrast
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 300:
            raise ValueError(f"min_contrast={value!r} must be a number in [0, 300]")


@dataclass(frozen=True)
class TextureSpec:
    """One textures item: the kind, its two colours, period in pixels, angle in degrees and phase."""

    kind: str
    first_rgb: RGB
    second_rgb: RGB
    period: float
    angle: float
    phase: float

    @property
    def caption(self) -> str:
        if self.kind == "stripes":
            a = self.angle % 180
            direction = "vertical" if a == 0 else "horizontal" if a == 90 else "diagonal"
            return f"{direction} stripes"
        return {"checks": "a checkered pattern", "dots": "a dotted pattern",
                "gradient": "a smooth colour gradient"}[self.kind]


class TexturesDataset(_PrivateProcedural):
    """Stripes, checks, dots and gradients in continuous random colours, captioned by kind only."""

    name = "textures"
    has_hints = False

    def __init__(self, config: TexturesConfig | None = None):
        config = TexturesConfig() if config is None else config
        if not isinstance(config, TexturesConfig):
            raise TypeError(f"config={config!r} must be a TexturesConfig(...)")
        super().__init__(config)

    def attributes(self, index: int) -> TextureSpec:
        cfg = self.config
        rng = self.rng(index)
        kind = TEXTURE_KINDS[int(rng.integers(len(TEXTURE_KINDS)))]
        first, second = _contrasting_pair(rng, cfg.min_contrast)
        lo, hi = cfg.period_range
        u = rng.random(3)
        period = float((lo + (hi - lo) * u[0]) * cfg.resolution / 64)
        if kind == "stripes":
            angle = (0.0, 90.0, 45.0, 135.0)[int(rng.integers(4))]
        elif kind == "gradient":
            angle = float(u[1] * 360.0)
        else:
            angle = 0.0
        return TextureSpec(kind, first, second, period, angle, float(u[2] * period))

    def render(self, spec: TextureSpec) -> tuple[np.ndarray, None]:
        x, y, res = self._x, self._y, self.config.resolution
        p = spec.period
        if spec.kind == "stripes":
            a = math.radians(spec.angle)
            u = x * math.cos(a) + y * math.sin(a) + spec.phase
            first = np.mod(u, p) < p / 2
        elif spec.kind == "checks":
            first = (np.floor((x + spec.phase) / p) + np.floor((y + spec.phase) / p)) % 2 == 0
        elif spec.kind == "dots":
            dx = np.mod(x + spec.phase, p) - p / 2
            dy = np.mod(y + spec.phase, p) - p / 2
            first = np.hypot(dx, dy) <= p * 0.3
        else:  # gradient: a linear blend across the image along the angle
            a = math.radians(spec.angle)
            u = (x - res / 2) * math.cos(a) + (y - res / 2) * math.sin(a)
            t = np.clip(u / (res * 0.75) + 0.5, 0.0, 1.0)
            return _blend((1.0 - t).astype(np.float32), spec.first_rgb, spec.second_rgb), None
        first = np.broadcast_to(first, (res, res))
        return _blend(first.astype(np.float32), spec.first_rgb, spec.second_rgb), None


# ---------------------------------------------------------------------------------------------
# the mixture

#: Shares of the public corpus: (shapes, glyphs, textures).
PUBLIC_MIX: tuple[float, float, float] = (0.45, 0.35, 0.2)
_PARTS = ("shapes", "glyphs", "textures")


@dataclass(frozen=True)
class PublicConfig:
    """The ``public`` corpus: ``mix`` shares of shapes, glyphs and textures (summing to 1)."""

    num_items: int = 24_000
    resolution: int = 64
    seed: int = 0
    mix: tuple[float, float, float] = PUBLIC_MIX
    num_subjects: int = 0

    def __post_init__(self) -> None:
        _check_ints(self, {"num_items": 1, "resolution": 16, "seed": 0, "num_subjects": 0})
        try:
            mix = tuple(float(v) for v in self.mix)
        except (TypeError, ValueError):
            mix = ()
        if len(mix) != 3 or min(mix) < 0 or abs(sum(mix) - 1.0) > 1e-6:
            raise ValueError(f"mix={self.mix!r} must be three shares (shapes, glyphs, textures) >= 0 summing to 1")
        object.__setattr__(self, "mix", mix)


class PublicDataset(_PrivateProcedural):
    """privdiff-tiny 2's pretraining corpus: item i is item i of one of shapes, glyphs or textures."""

    name = "public"
    has_hints = False

    def __init__(self, config: PublicConfig | None = None):
        config = PublicConfig() if config is None else config
        if not isinstance(config, PublicConfig):
            raise TypeError(f"config={config!r} must be a PublicConfig(...)")
        super().__init__(config)
        n, res, seed = config.num_items, config.resolution, config.seed
        self.parts = {
            "shapes": ShapesDataset(public_shapes_config(num_items=n, seed=seed, resolution=res)),
            "glyphs": GlyphsDataset(GlyphsConfig(num_items=n, seed=seed, resolution=res)),
            "textures": TexturesDataset(TexturesConfig(num_items=n, seed=seed, resolution=res)),
        }
        # Exact shares, in a seeded order.
        counts = np.floor(np.asarray(config.mix) * n).astype(int)
        counts[int(np.argmax(config.mix))] += n - int(counts.sum())
        kinds = np.repeat(np.arange(3), counts)
        self._kinds = np.random.default_rng([seed, self._stream]).permutation(kinds)

    def part(self, index: int) -> str:
        """Which set item ``index`` comes from."""
        return _PARTS[int(self._kinds[self._check_index(index)])]

    def attributes(self, index: int) -> Any:
        return self.parts[self.part(index)].attributes(index)

    def render(self, spec: Any) -> tuple[np.ndarray, None]:
        owner = {GlyphSpec: "glyphs", TextureSpec: "textures"}.get(type(spec), "shapes")
        return self.parts[owner].render(spec)[0], None

    def _extra(self, spec: Any) -> dict[str, Any]:
        return {"part": {GlyphSpec: "glyphs", TextureSpec: "textures"}.get(type(spec), "shapes")}


register_procedural_dataset(name="glyphs", factory=config_factory(GlyphsConfig, GlyphsDataset))
register_procedural_dataset(name="letters", factory=config_factory(LettersConfig, LettersDataset))
register_procedural_dataset(name="textures", factory=config_factory(TexturesConfig, TexturesDataset))
register_procedural_dataset(name="public", factory=config_factory(PublicConfig, PublicDataset))
