"""What every privdiff dataset shares: the item format, the error type and `collate`.

An item is a dict with these keys (procedural sets add their own, e.g. ``"circle"``):

==================  ==========================================================================
``pixel_values``    float32 tensor [3, H, W] in [-1, 1] (the range diffusers' VAEs expect)
``caption``         str
``hint``            float32 tensor [3, H, W] in [0, 1] (ControlNet's range), or None
``subject``         str or None: the person the image belongs to (the unit of per-person DP)
``index``           int: the item's position in its dataset
``path``            str: the image file, or ``"procedural:<name>/<index>"``
==================  ==========================================================================
"""

from __future__ import annotations

import abc

from typing import Any, Sequence

import torch
from torch.utils.data import Dataset
from ..errors import public_name

__all__ = ["CaptionedImageDataset", "DatasetError", "collate"]

# Keys every item has; collate() stacks or lists them, anything else is passed on as a list.
ITEM_KEYS = ("pixel_values", "caption", "hint", "subject", "index", "path")


@public_name
class DatasetError(ValueError):
    """A dataset could not be built. ``problems`` holds every (path, problem) pair found.

    Validation collects all problems before raising, so one run shows everything to fix.
    """

    def __init__(self, summary: str, problems: Sequence[tuple[str, str]] = ()):
        self.summary = summary
        self.problems: tuple[tuple[str, str], ...] = tuple((str(p), str(m)) for p, m in problems)
        lines = [summary]
        lines += [f"  - {path}: {problem}" for path, problem in self.problems]
        super().__init__("\n".join(lines))


class CaptionedImageDataset(Dataset, abc.ABC):
    """Base of privdiff's datasets: items as in the module docstring, plus cheap metadata access.

    Samplers (per-subject DP, Dirichlet splits) need captions and subjects for every item;
    ``caption``/``subject`` give them without decoding or drawing any pixels.
    """

    #: True when items carry a hint (all of them for procedural sets; see ImageCaptionDataset).
    has_hints: bool = False

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @abc.abstractmethod
    def caption(self, index: int) -> str: ...

    @abc.abstractmethod
    def subject(self, index: int) -> str | None: ...

    def captions(self) -> list[str]:
        """Every item's caption, in index order, without loading pixels."""
        return [self.caption(i) for i in range(len(self))]

    def subjects(self) -> list[str | None]:
        """Every item's subject id (None where unknown), in index order, without loading pixels."""
        return [self.subject(i) for i in range(len(self))]

    def _check_index(self, index: int) -> int:
        # Accept numpy/torch integers from samplers, and negative indices like a list.
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} is out of range for a dataset of {n} items")
        return i


def collate(items: Sequence[dict[str, Any]], /) -> dict[str, Any]:
    """Stack a list of items into a batch (usable as a DataLoader ``collate_fn``).

    ``pixel_values`` -> [B, 3, H, W]; ``hint`` -> [B, 3, H, W] only when every item has one,
    else None (a batch with half its hints is no use to a ControlNet); ``index`` -> int64 [B];
    ``caption``, ``subject``, ``path`` and any extra keys -> lists in item order.
    """
    # Positional on purpose: DataLoader calls collate_fn(batch).
    if len(items) == 0:
        raise ValueError("collate() got an empty list of items; pass at least one item")
    batch: dict[str, Any] = {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "caption": [it["caption"] for it in items],
        "subject": [it.get("subject") for it in items],
        "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.int64),
        "path": [it.get("path", "") for it in items],
    }
    hints = [it.get("hint") for it in items]
    batch["hint"] = torch.stack(hints) if all(h is not None for h in hints) else None
    for key in items[0]:
        if key not in ITEM_KEYS:
            batch[key] = [it.get(key) for it in items]
    return batch
