"""The procedural registry and load_dataset."""

from __future__ import annotations

import pytest
import torch

from privdiff.data import (
    PROCEDURAL_DATASETS,
    CirclesDataset,
    DatasetError,
    ImageCaptionDataset,
    ShapesConfig,
    ShapesDataset,
    config_factory,
    load_dataset,
    procedural_dataset,
    register_procedural_dataset,
)


def test_builtin_sets_are_registered():
    assert {"circles", "shapes"} <= set(PROCEDURAL_DATASETS)
    ds = procedural_dataset(name="circles", resolution=32, seed=4, num_items=10)
    assert isinstance(ds, CirclesDataset) and len(ds) == 10 and ds.config.seed == 4
    assert ds[0]["pixel_values"].shape == (3, 32, 32)
    ds = procedural_dataset(name="shapes", shapes=["square"], num_items=3)
    assert isinstance(ds, ShapesDataset) and all("square" in c for c in ds.captions())
    assert len(procedural_dataset(name="circles")) == 50_000  # the set's own default


def test_unknown_name_and_option_are_explained():
    with pytest.raises(ValueError, match="supported names: circles, digits, glyphs, letters, mnist, public, shapes, style, textures"):
        procedural_dataset(name="squares")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\].*accepted: \[.*'palette'"):
        procedural_dataset(name="circles", colour="red")


def test_register_a_new_set(tmp_path):
    factory = config_factory(ShapesConfig, ShapesDataset)
    register_procedural_dataset(name="only-stars", factory=lambda **kw: factory(shapes=("star",), **kw))
    try:
        ds = load_dataset(data="only-stars", resolution=16, seed=1, num_items=4)
        assert all("star" in c for c in ds.captions()) and ds[0]["pixel_values"].shape == (3, 16, 16)
        with pytest.raises(ValueError, match="already registered"):
            register_procedural_dataset(name="only-stars", factory=factory)
        register_procedural_dataset(name="only-stars", factory=factory, replace=True)
        with pytest.raises(DatasetError, match="only-stars"):
            load_dataset(data=str(tmp_path / "nowhere"))
    finally:
        PROCEDURAL_DATASETS.pop("only-stars", None)
    with pytest.raises(ValueError, match="name="):
        register_procedural_dataset(name="bad name!", factory=factory)


def test_load_dataset_reads_folders(tmp_path, write_image):
    write_image(tmp_path / "a.png", width=80, height=64)
    (tmp_path / "a.txt").write_text("a caption")
    for data in (tmp_path, str(tmp_path)):
        ds = load_dataset(data=data, resolution=32, seed=0)
        assert isinstance(ds, ImageCaptionDataset)
        assert ds[0]["pixel_values"].shape == (3, 32, 32) and ds.captions() == ["a caption"]
    ds = load_dataset(data=tmp_path, resolution=32, seed=7, center_crop=False)
    assert ds.config.augment_seed == 7 and not ds.config.center_crop
    with pytest.raises(ValueError, match="num_items=3 applies only to procedural"):
        load_dataset(data=tmp_path, num_items=3)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['shapes'\]"):
        load_dataset(data=tmp_path, shapes=("star",))


def test_load_dataset_rejects_neither_folder_nor_name(tmp_path):
    for data in ("circlez", str(tmp_path / "missing")):
        with pytest.raises(DatasetError) as info:
            load_dataset(data=data)
        msg = str(info.value)
        assert data in msg and "circles" in msg and "shapes" in msg and "folder" in msg
    file = tmp_path / "file.png"
    file.write_bytes(b"x")
    with pytest.raises(DatasetError, match="a file, not a folder"):
        load_dataset(data=file)


def test_a_folder_named_like_a_set_is_ambiguous(tmp_path, monkeypatch, write_image):
    write_image(tmp_path / "circles" / "a.png")
    (tmp_path / "circles" / "a.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=r"'\./circles'"):
        load_dataset(data="circles")
    assert load_dataset(data="./circles").captions() == ["mine"]


def test_loader_over_a_procedural_set():
    from privdiff.data import collate

    ds = load_dataset(data="circles", resolution=16, seed=0, num_items=5)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate))
    assert batches[0]["hint"].shape == (4, 3, 16, 16) and len(batches[0]["circle"]) == 4
    assert batches[1]["index"].tolist() == [4]
