"""Image folders: items, captions, hints, subjects, geometry, and every bad-input error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from privdiff.data import (
    IMAGE_EXTENSIONS,
    DatasetError,
    ImageCaptionDataset,
    ImageFolderConfig,
    collate,
)


def _dataset(root: Path, **options) -> ImageCaptionDataset:
    return ImageCaptionDataset(ImageFolderConfig(root=root, **options))


def _write_metadata(root: Path, lines: list) -> None:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    (root / "metadata.jsonl").write_text(text + "\n", encoding="utf-8")


def _error(root: Path, **options) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        _dataset(root, **options)
    return info.value


# --------------------------------------------------------------------------- happy paths


def test_sidecar_captions_give_items_of_the_right_shape_dtype_and_range(tmp_path, write_image):
    write_image(tmp_path / "a.png", width=96, height=64, seed=1)
    write_image(tmp_path / "b.png", width=64, height=128, seed=2)
    write_image(tmp_path / "c.png", width=40, height=40, seed=3)  # smaller than resolution: upsampled
    for stem, text in (("a", "a cat"), ("b", "  a dog\n"), ("c", "a bird")):
        (tmp_path / f"{stem}.txt").write_text(text, encoding="utf-8")
    (tmp_path / "notes.md").write_text("not an image")

    ds = _dataset(tmp_path, resolution=32)
    assert len(ds) == 3
    assert ds.captions() == ["a cat", "a dog", "a bird"]
    assert ds.subjects() == [None, None, None]
    assert not ds.has_hints
    for i in range(3):
        item = ds[i]
        assert item["pixel_values"].shape == (3, 32, 32)
        assert item["pixel_values"].dtype == torch.float32
        assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
        assert item["pixel_values"].min() < -0.5 and item["pixel_values"].max() > 0.5  # really scaled
        assert item["hint"] is None and item["subject"] is None
        assert item["index"] == i and isinstance(item["index"], int)
        assert item["path"] == str(tmp_path / "abc"[i]) + ".png"
    assert ds[-1]["caption"] == "a bird"
    with pytest.raises(IndexError):
        ds[3]


def test_extensions_are_case_insensitive_and_every_mode_becomes_rgb(tmp_path, write_image):
    names = ["a.PNG", "b.Jpg", "c.jpeg", "d.webp", "e.BMP"]
    for k, name in enumerate(names):
        write_image(tmp_path / name, seed=k)
    write_image(tmp_path / "f.png", mode="L", seed=7)
    write_image(tmp_path / "g.png", mode="RGBA", seed=8)
    write_image(tmp_path / ".hidden.png", seed=9)  # ignored, like macOS ._ files
    ds = _dataset(tmp_path, caption_required=False, default_caption="x")
    assert [Path(r.path).name for r in ds.records] == names + ["f.png", "g.png"]
    for i in range(len(ds)):
        assert ds[i]["pixel_values"].shape == (3, 64, 64)
        assert ds[i]["caption"] == "x"
    grey = ds[5]["pixel_values"]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_metadata_gives_captions_hints_subjects_and_wins_over_sidecars(tmp_path, write_image):
    write_image(tmp_path / "train" / "0.png", seed=0)
    write_image(tmp_path / "train" / "1.png", seed=1)
    write_image(tmp_path / "top.png", seed=2)
    write_image(tmp_path / "edges" / "0.png", seed=3)
    write_image(tmp_path / "edge_top.png", seed=4)  # named as a hint, so not an image of its own
    (tmp_path / "top.txt").write_text("from the sidecar")
    _write_metadata(tmp_path, [
        {"file_name": "train/0.png", "text": "zero", "conditioning_image": "edges/0.png", "subject": "alice"},
        {"file_name": "train/1.png", "caption": "one", "subject": 7},
        "",  # blank lines are fine
        {"file_name": "top.png", "text": "from the metadata", "hint": "edge_top.png"},
    ])
    ds = _dataset(tmp_path)
    assert [Path(r.path).relative_to(tmp_path).as_posix() for r in ds.records] == [
        "top.png", "train/0.png", "train/1.png"]
    assert ds.captions() == ["from the metadata", "zero", "one"]
    assert ds.subjects() == [None, "alice", "7"]
    assert [r.hint_path for r in ds.records] == [tmp_path / "edge_top.png", tmp_path / "edges" / "0.png", None]
    assert not ds.has_hints
    assert ds[1]["hint"].shape == (3, 64, 64) and ds[2]["hint"] is None
    batch = collate([ds[0], ds[1]])
    assert batch["hint"].shape == (2, 3, 64, 64)
    mixed = collate([ds[1], ds[2]])
    assert mixed["hint"] is None
    assert mixed["subject"] == ["alice", "7"] and mixed["caption"] == ["zero", "one"]
    assert mixed["index"].tolist() == [1, 2] and mixed["index"].dtype == torch.int64


@pytest.mark.parametrize("folder", ["hints", "conditioning"])
def test_hint_folder_copy_of_image_stays_equal_after_transform(tmp_path, write_image, folder):
    write_image(tmp_path / "wide.png", width=100, height=60, seed=1)
    write_image(tmp_path / "tall.jpg", width=50, height=90, seed=2)
    (tmp_path / folder).mkdir()
    shutil.copy(tmp_path / "wide.png", tmp_path / folder / "wide.png")
    shutil.copy(tmp_path / "tall.jpg", tmp_path / folder / "tall.jpg")
    for stem in ("wide", "tall"):
        (tmp_path / f"{stem}.txt").write_text(stem)
    for options in ({}, {"center_crop": False, "random_flip": True, "augment_seed": 3}):
        ds = _dataset(tmp_path, resolution=48, **options)
        assert ds.has_hints
        for epoch in range(3):
            ds.set_epoch(epoch)
            for item in (ds[0], ds[1]):
                assert item["hint"].shape == (3, 48, 48) and item["hint"].dtype == torch.float32
                assert 0.0 <= item["hint"].min() and item["hint"].max() <= 1.0
                torch.testing.assert_close((item["pixel_values"] + 1) / 2, item["hint"], atol=1e-6, rtol=0)


def test_center_crop_takes_the_middle_after_resizing_the_short_side(tmp_path):
    # 256x128: left quarter red, middle half green, right quarter blue; the centre crop of the
    # 128x64 resize is exactly the green half.
    arr = np.zeros((128, 256, 3), np.uint8)
    arr[:, :64] = (255, 0, 0)
    arr[:, 64:192] = (0, 255, 0)
    arr[:, 192:] = (0, 0, 255)
    Image.fromarray(arr).save(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("stripes")
    pv = _dataset(tmp_path, resolution=64, resample="nearest")[0]["pixel_values"]
    assert torch.equal(pv[1], torch.ones(64, 64)) and torch.equal(pv[0], -torch.ones(64, 64))


def test_random_crop_and_flip_are_deterministic_per_seed_epoch_and_index(tmp_path, write_image):
    write_image(tmp_path / "x.png", width=160, height=64, seed=5)
    (tmp_path / "x.txt").write_text("x")
    aug = {"center_crop": False, "random_flip": True}
    a = _dataset(tmp_path, augment_seed=1, **aug)
    b = _dataset(tmp_path, augment_seed=1, **aug)
    assert torch.equal(a[0]["pixel_values"], b[0]["pixel_values"])
    views = set()
    for epoch in range(8):
        a.set_epoch(epoch)
        views.add(a[0]["pixel_values"].numpy().tobytes())
    assert len(views) > 1  # epochs see different crops/flips
    centre = _dataset(tmp_path)[0]["pixel_values"]
    assert torch.equal(centre, _dataset(tmp_path)[0]["pixel_values"])


def test_optional_captions_and_required_hints(tmp_path, write_image):
    write_image(tmp_path / "a.png")
    ds = _dataset(tmp_path, caption_required=False, default_caption="a photo")
    assert ds.captions() == ["a photo"]
    err = _error(tmp_path, caption_required=False, hint_required=True)
    assert str(tmp_path / "a.png") in str(err)
    assert "hints/a.png" in str(err) and "hint_required=False" in str(err)


def test_works_with_a_dataloader(tmp_path, write_image):
    for k in range(5):
        write_image(tmp_path / f"{k}.png", seed=k)
        write_image(tmp_path / "hints" / f"{k}.png", seed=10 + k)
        (tmp_path / f"{k}.txt").write_text(f"image {k}")
    loader = torch.utils.data.DataLoader(_dataset(tmp_path, resolution=16), batch_size=2, collate_fn=collate)
    batches = list(loader)
    assert [b["pixel_values"].shape[0] for b in batches] == [2, 2, 1]
    assert batches[0]["hint"].shape == (2, 3, 16, 16)
    assert batches[2]["caption"] == ["image 4"]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("options, named", [
    ({"resolution": 0}, "resolution=0"),
    ({"resolution": 64.0}, "resolution=64.0"),
    ({"resample": "cubic"}, "resample='cubic'"),
    ({"augment_seed": -1}, "augment_seed=-1"),
    ({"center_crop": "yes"}, "center_crop='yes'"),
])
def test_config_rejects_bad_values_by_name(tmp_path, options, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        ImageFolderConfig(root=tmp_path, **options)


def test_config_is_frozen(tmp_path):
    cfg = ImageFolderConfig(root=str(tmp_path))
    assert cfg.root == tmp_path
    with pytest.raises(Exception):
        cfg.resolution = 128


# --------------------------------------------------------------------------- bad inputs


def _truncated_png(path: Path, write_image) -> Path:
    write_image(path, width=64, height=64, seed=11)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


DECODE_FIX = "re-save it as PNG or JPEG, or delete it"


def test_truncated_png_is_reported(tmp_path, write_image):
    bad = _truncated_png(tmp_path / "cut.png", write_image)
    write_image(tmp_path / "ok.png")
    for p in (bad, tmp_path / "ok.png"):
        p.with_suffix(".txt").write_text("caption")
    Image.open(bad)  # the header alone still opens: only a full decode catches it
    err = _error(tmp_path)
    assert str(bad) in str(err) and DECODE_FIX in str(err)
    assert [p for p, _ in err.problems] == [str(bad)]
    assert isinstance(err, ValueError)


def test_text_file_renamed_png_is_reported(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("this is not an image")
    (tmp_path / "fake.txt").write_text("caption")
    err = _error(tmp_path)
    assert str(fake) in str(err) and "not a readable image" in str(err) and DECODE_FIX in str(err)


def test_missing_caption_is_reported_with_the_fix(tmp_path, write_image):
    img = write_image(tmp_path / "lonely.png")
    err = _error(tmp_path)
    msg = str(err)
    assert str(img) in msg and "has no caption" in msg
    assert "add a caption file lonely.txt beside it" in msg and "metadata.jsonl" in msg
    assert "captions train DP-LDM; Textual Inversion trains on its own template" in msg
    assert "caption_required=False" not in msg  # no such command-line option


def test_empty_caption_file_is_reported(tmp_path, write_image):
    write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  \n")
    err = _error(tmp_path)
    assert str(tmp_path / "a.txt") in str(err) and "empty" in str(err)


def test_empty_folder_names_the_folder_and_the_extensions(tmp_path):
    (tmp_path / "x.gif").write_bytes(b"GIF89a")
    err = _error(tmp_path)
    msg = str(err)
    assert str(tmp_path) in msg and "contains no images" in msg and ".gif" in msg
    for ext in IMAGE_EXTENSIONS:
        assert ext in msg


def test_missing_folder_is_reported(tmp_path):
    err = _error(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err) and "does not exist" in str(err)


def test_hint_of_another_size_is_reported(tmp_path, write_image):
    write_image(tmp_path / "a.png", width=64, height=48)
    (tmp_path / "a.txt").write_text("a")
    hint = write_image(tmp_path / "hints" / "a.png", width=32, height=32)
    err = _error(tmp_path)
    msg = str(err)
    assert str(hint) in msg and "32x32" in msg and "64x48" in msg
    assert "resize the hint to its image's size" in msg


def test_hint_referenced_but_missing_is_reported(tmp_path, write_image):
    write_image(tmp_path / "a.png")
    _write_metadata(tmp_path, [{"file_name": "a.png", "text": "a", "conditioning_image": "edges/a.png"}])
    err = _error(tmp_path)
    assert str(tmp_path / "edges" / "a.png") in str(err)
    assert "is missing" in str(err) and "add the file or remove the reference" in str(err)


def test_unreadable_hint_is_reported(tmp_path, write_image):
    write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "hints").mkdir()
    (tmp_path / "hints" / "a.png").write_text("not an image")
    err = _error(tmp_path)
    assert str(tmp_path / "hints" / "a.png") in str(err) and DECODE_FIX in str(err)


def test_bad_metadata_lines_are_reported_with_line_numbers(tmp_path, write_image):
    write_image(tmp_path / "a.png")
    _write_metadata(tmp_path, [
        {"file_name": "a.png", "text": "fine"},
        '{"file_name": "b.png", "text": ',       # line 2: broken JSON
        {"text": "no file name"},                 # line 3
        '["a", "list"]',                          # line 4
        {"file_name": "a.png", "text": "again"},  # line 5: duplicate
        {"file_name": "../outside.png", "text": "x"},  # line 6
        {"file_name": "a.png.txt", "text": "x"},  # line 7: not an image type
    ])
    err = _error(tmp_path)
    msg = str(err)
    meta = str(tmp_path / "metadata.jsonl")
    assert all(path == meta for path, _ in err.problems)
    assert "line 2 is not valid JSON" in msg
    assert 'line 3 lacks "file_name"' in msg and '{"file_name": "<image path' in msg
    assert "line 4 is a JSON list" in msg
    assert "line 5" in msg and "also on line 1" in msg
    assert "line 6" in msg and "outside the folder" in msg
    assert "line 7" in msg and "not an image of an accepted type" in msg
    assert len(err.problems) == 6


def test_metadata_naming_a_missing_image_is_reported(tmp_path, write_image):
    write_image(tmp_path / "a.png")
    _write_metadata(tmp_path, [{"file_name": "a.png", "text": "a"}, {"file_name": "gone.jpg", "text": "b"}])
    err = _error(tmp_path)
    assert str(tmp_path / "gone.jpg") in str(err)
    assert "metadata.jsonl line 2" in str(err) and "add the image or remove the line" in str(err)


def test_bad_subject_is_reported(tmp_path, write_image):
    write_image(tmp_path / "a.png")
    _write_metadata(tmp_path, [{"file_name": "a.png", "text": "a", "subject": ["x"]}])
    err = _error(tmp_path)
    assert "line 1" in str(err) and "subject" in str(err)


def test_ambiguous_stems_are_reported(tmp_path, write_image):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("which one?")
    err = _error(tmp_path)
    assert str(tmp_path / "a.png") in str(err) and str(tmp_path / "a.jpg") in str(err)
    assert "shares its caption file a.txt" in str(err)


def test_one_error_lists_every_offending_file(tmp_path, write_image):
    cut = _truncated_png(tmp_path / "cut.png", write_image)
    fake = tmp_path / "fake.png"
    fake.write_text("hello")
    uncaptioned = write_image(tmp_path / "uncaptioned.png")
    write_image(tmp_path / "sized.png", width=64, height=64)
    small_hint = write_image(tmp_path / "hints" / "sized.png", width=16, height=16)
    for p in (cut, fake, tmp_path / "sized.png"):
        p.with_suffix(".txt").write_text("caption")
    write_image(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("fine")
    _write_metadata(tmp_path, ["not json", {"file_name": "missing.png", "text": "x"}])

    err = _error(tmp_path)
    msg = str(err)
    offenders = {
        str(cut): DECODE_FIX,
        str(fake): DECODE_FIX,
        str(uncaptioned): "has no caption",
        str(small_hint): "resize the hint",
        str(tmp_path / "metadata.jsonl"): "line 1 is not valid JSON",
        str(tmp_path / "missing.png"): "add the image or remove the line",
    }
    for path, fix in offenders.items():
        assert path in msg and fix in msg
    assert {p for p, _ in err.problems} == set(offenders)
    assert len(err.problems) == 6
    assert msg.startswith("6 problem(s) in image folder")
    assert str(tmp_path / "good.png") not in msg
