import pytest
import torch

from privdiff.data import DatasetError, collate
from privdiff.data.tensors import ImageBatchDataset, split_captions


def test_image_batch_items_are_square_in_the_diffusers_range():
    images = torch.zeros(2, 40, 80, 3)
    images[:, :, 20:60] = 1.0  # a white centre band, which the centre crop keeps
    hints = torch.rand(2, 40, 80, 3)
    dataset = ImageBatchDataset(images=images, captions=["a", "b"], resolution=16, hints=hints, subjects=["p", "q"])
    item = dataset[1]
    assert item["pixel_values"].shape == (3, 16, 16) and item["hint"].shape == (3, 16, 16)
    assert torch.allclose(item["pixel_values"][:, :, 2:-2], torch.ones(3, 16, 12), atol=1e-3)  # white -> +1 (edges resampled)
    assert 0 <= item["hint"].min() and item["hint"].max() <= 1
    assert (item["caption"], item["subject"], dataset.captions(), dataset.has_hints) == ("b", "q", ["a", "b"], True)
    assert collate([dataset[0], dataset[1]])["pixel_values"].shape == (2, 3, 16, 16)


def test_captions_one_per_line_or_one_for_all():
    assert split_captions("a cat\n\n a dog \n", count=2) == ["a cat", "a dog"]
    assert split_captions("same", count=3) == ["same"] * 3
    with pytest.raises(DatasetError, match="one caption per image"):
        split_captions("a\nb\nc", count=2)


@pytest.mark.parametrize("images,captions,match", [
    (torch.zeros(2, 8, 8, 4), ["a", "b"], "RGB"),
    (torch.zeros(2, 8, 8, 3), ["a"], "one caption per image"),
])
def test_bad_batches_are_refused(images, captions, match):
    with pytest.raises(DatasetError, match=match):
        ImageBatchDataset(images=images, captions=captions)


def test_dataset_image_batches_round_trip_images_hints_and_captions():
    import torch

    from privdiff.data import load_dataset
    from privdiff.data.tensors import ImageBatchDataset, dataset_image_batches

    circles = load_dataset(data="circles", num_items=3, seed=0)
    images, hints, captions = dataset_image_batches(circles, count=5)
    assert images.shape == hints.shape == (3, 64, 64, 3) and len(captions) == 3
    assert 0 <= float(images.min()) and float(images.max()) <= 1 and hints.max() > 0
    again = ImageBatchDataset(images=images, captions=captions, resolution=64, hints=hints)
    assert torch.allclose(again[1]["pixel_values"], circles[1]["pixel_values"], atol=1e-5)
    assert torch.allclose(again[1]["hint"], circles[1]["hint"], atol=1e-5)
    _, no_hints, _ = dataset_image_batches(load_dataset(data="shapes", num_items=2, seed=0), count=2)
    assert no_hints is None
