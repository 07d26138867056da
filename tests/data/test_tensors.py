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
