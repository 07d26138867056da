"""The public corpus privdiff-tiny 2 is pretrained on: broad, deterministic, captioned in the
tokenizer's words, and free of digits (the private `mnist` and `digits` sets must stay unseen)."""

import numpy as np
import pytest

from privdiff.data import load_dataset
from privdiff.data.public_corpus import (
    COLOUR_NAMES,
    GLYPH_SYMBOLS,
    GlyphsConfig,
    GlyphsDataset,
    LettersConfig,
    LettersDataset,
    PublicConfig,
    PublicDataset,
    TexturesConfig,
    TexturesDataset,
    colour_name,
)
from privdiff.models.tokenizer import DEFAULT_WORDS


def test_the_mix_has_its_shares_and_no_caption_or_glyph_has_a_digit():
    corpus = PublicDataset(PublicConfig(num_items=2000, seed=0))
    parts = [corpus.part(i) for i in range(len(corpus))]
    assert parts.count("shapes") == 900 and parts.count("glyphs") == 700 and parts.count("textures") == 400
    words = set()
    for i in range(len(corpus)):
        caption = corpus.caption(i)
        assert not any(ch.isdigit() for ch in caption), caption
        words.update(w.lower() for w in caption.split())
    unknown = sorted(w for w in words if w not in DEFAULT_WORDS and len(w) > 1)
    assert not unknown, f"caption words outside the tokenizer's vocabulary: {unknown}"
    assert {"capital", "small", "stripes", "checkered", "dotted", "gradient"} <= words


def test_items_are_deterministic_in_seed_and_index_and_seeds_differ():
    a, b = (PublicDataset(PublicConfig(num_items=50, seed=3)) for _ in range(2))
    other = PublicDataset(PublicConfig(num_items=50, seed=4))
    for i in (0, 7, 49):
        assert np.array_equal(a[i]["pixel_values"].numpy(), b[i]["pixel_values"].numpy())
        assert a[i]["caption"] == b[i]["caption"]
    assert any(a.caption(i) != other.caption(i) for i in range(50))


def test_glyphs_draw_their_colours_inside_the_frame_and_name_them():
    ds = GlyphsDataset(GlyphsConfig(num_items=60, seed=1))
    for i in range(60):
        spec = ds.attributes(i)
        mask = ds.mask(i)
        assert 0.01 < mask.mean() < 0.6, (spec, mask.mean())  # visible, never the whole frame
        image = (ds[i]["pixel_values"].numpy().transpose(1, 2, 0) + 1) * 127.5
        solid = image[mask > 0.99]
        assert np.abs(solid - np.asarray(spec.color_rgb)).max() <= 3.0  # 1 % coverage short of full: <= 2.55
        assert spec.color in spec.caption and spec.background in spec.caption
        if spec.glyph in GLYPH_SYMBOLS:
            assert GLYPH_SYMBOLS[spec.glyph] in spec.caption
        else:
            assert ("capital" in spec.caption) == spec.glyph.isupper()


def test_colour_names_are_the_nearest_table_entry():
    for name, rgb in COLOUR_NAMES.items():
        assert colour_name(rgb) == name
    assert colour_name((250, 5, 5)) == "red" and colour_name((10, 10, 12)) == "black"


def test_textures_use_two_colours_in_their_period():
    ds = TexturesDataset(TexturesConfig(num_items=40, seed=2))
    for i in range(40):
        spec = ds.attributes(i)
        image = np.rint((ds[i]["pixel_values"].numpy().transpose(1, 2, 0) + 1) * 127.5)
        if spec.kind == "gradient":
            continue
        colours = {tuple(int(v) for v in px) for px in image.reshape(-1, 3)}
        assert colours <= {tuple(spec.first_rgb), tuple(spec.second_rgb)}, spec
        assert 8.0 <= spec.period <= 24.0


def test_letters_are_drawn_the_way_mnist_draws_digits():
    """Light ink on black, fitted into 20x20 and centred by mass in 28x28 (MNIST's normalisation),
    captioned in the tokenizer's words, never a digit, the same for the same seed."""
    ds = LettersDataset(LettersConfig(num_items=40, seed=5))
    again = LettersDataset(LettersConfig(num_items=40, seed=5))
    for i in range(40):
        spec = ds.attributes(i)
        ink = ds.coverage(spec)
        rows, cols = np.nonzero(ink > 0.05)
        assert rows.max() - rows.min() < 21 and cols.max() - cols.min() < 21 and max(
            rows.max() - rows.min(), cols.max() - cols.min()) >= 17, spec
        yy, xx = np.mgrid[:28, :28]
        centre = ((yy * ink).sum() / ink.sum(), (xx * ink).sum() / ink.sum())
        assert abs(centre[0] - 13.5) <= 1.0 and abs(centre[1] - 13.5) <= 1.0, (spec, centre)
        image = (ds[i]["pixel_values"].numpy() + 1) * 127.5
        assert np.allclose(image[0], image[1]) and np.allclose(image[0], image[2])  # grey, like mnist
        assert np.median(image) < 5 and image.max() > 200  # black ground, light strokes
        assert not spec.glyph.isdigit() and spec.caption.startswith("a handwritten ")
        assert spec.caption.split()[-1] == spec.glyph.lower() and ("capital" in spec.caption) == spec.glyph.isupper()
        assert all(w in DEFAULT_WORDS or len(w) == 1 for w in spec.caption.split())
        assert np.array_equal(ds[i]["pixel_values"].numpy(), again[i]["pixel_values"].numpy())


@pytest.mark.parametrize("bad", [{"stroke_range": (3, 1)}, {"stroke_range": (0, 40)}, {"max_rotation": 90.0},
                                 {"num_items": 0}])
def test_letters_config_is_validated(bad):
    with pytest.raises(ValueError):
        LettersConfig(**bad)


@pytest.mark.parametrize("name", ["glyphs", "textures", "public", "letters"])
def test_the_sets_load_by_name(name):
    ds = load_dataset(data=name, resolution=32, seed=0, num_items=5)
    assert len(ds) == 5 and ds[0]["pixel_values"].shape == (3, 32, 32)


@pytest.mark.parametrize("bad", [{"mix": (0.5, 0.5, 0.5)}, {"mix": (1.0, 0.0)}, {"num_items": 0}])
def test_public_config_is_validated(bad):
    with pytest.raises(ValueError):
        PublicConfig(**bad)
