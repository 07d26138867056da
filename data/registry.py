"""Named procedural datasets and ``load_dataset``, the one entry for folders and names alike.

Adding a set (e.g. ``digits``) takes one line in its module::

    register_procedural_dataset(name="digits", factory=config_factory(DigitsConfig, DigitsDataset))

A factory is any callable ``factory(*, resolution, seed, num_items=None, **options)`` returning a
CaptionedImageDataset; ``num_items=None`` means the set's own default.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from .base import CaptionedImageDataset, DatasetError
from .folder import ImageCaptionDataset, ImageFolderConfig

__all__ = [
    "PROCEDURAL_DATASETS",
    "register_procedural_dataset",
    "config_factory",
    "procedural_dataset",
    "load_dataset",
]

Factory = Callable[..., CaptionedImageDataset]

#: name -> factory; filled by ``privdiff.data.procedural`` (and later modules) on import.
PROCEDURAL_DATASETS: dict[str, Factory] = {}


def register_procedural_dataset(*, name: str, factory: Factory, replace: bool = False) -> Factory:
    """Make ``factory`` available as ``procedural_dataset(name=name)`` and ``load_dataset(data=name)``."""
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"name={name!r} must be a non-empty word (letters, digits, '-', '_')")
    if not callable(factory):
        raise ValueError(f"factory={factory!r} must be callable as factory(*, resolution, seed, num_items, ...)")
    if name in PROCEDURAL_DATASETS and not replace and PROCEDURAL_DATASETS[name] is not factory:
        raise ValueError(f"a procedural dataset named {name!r} is already registered; pick another name "
                         "or pass replace=True")
    PROCEDURAL_DATASETS[name] = factory
    return factory


def config_factory(config_cls: type, dataset_cls: Callable[[Any], CaptionedImageDataset]) -> Factory:
    """A factory building ``dataset_cls(config_cls(**options))`` that names the accepted options
    when given an unknown one (instead of a bare TypeError from the dataclass)."""
    accepted = [f.name for f in dataclasses.fields(config_cls)]

    def factory(*, resolution: int, seed: int, num_items: int | None = None, **options: Any):
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for {config_cls.__name__}; accepted: {accepted}")
        if num_items is not None:
            options["num_items"] = num_items
        return dataset_cls(config_cls(resolution=resolution, seed=seed, **options))

    factory.__name__ = f"make_{dataset_cls.__name__}"
    factory.__doc__ = f"{dataset_cls.__name__}({config_cls.__name__}(...)); options: {accepted}"
    return factory


def _names() -> str:
    return ", ".join(sorted(PROCEDURAL_DATASETS)) or "(none registered)"


def procedural_dataset(*, name: str, resolution: int = 64, seed: int = 0, num_items: int | None = None,
                       **options: Any) -> CaptionedImageDataset:
    """Build the procedural set ``name`` (see PROCEDURAL_DATASETS) with the given options."""
    if name not in PROCEDURAL_DATASETS:
        raise ValueError(f"name={name!r} is not a procedural dataset; supported names: {_names()}")
    return PROCEDURAL_DATASETS[name](resolution=resolution, seed=seed, num_items=num_items, **options)


def load_dataset(*, data: str | os.PathLike, resolution: int = 64, seed: int = 0,
                 num_items: int | None = None, **options: Any) -> CaptionedImageDataset:
    """A dataset from a folder of images or a procedural set's name.

    For a folder, ``seed`` seeds random crops/flips and ``options`` go to ImageFolderConfig
    (e.g. ``caption_required=False``); for a name, they go to that set's config. A plain name
    that is also a folder in the working directory is refused as ambiguous: write ``./name``.
    """
    is_name = isinstance(data, str) and data in PROCEDURAL_DATASETS
    path = Path(data).expanduser() if isinstance(data, (str, os.PathLike)) and str(data) else None
    is_dir = path is not None and path.is_dir()
    if is_name and is_dir:
        raise DatasetError(f"data={data!r} is ambiguous:", [(str(data), (
            f"names both the procedural dataset {data!r} and a folder in {Path.cwd()}; pass "
            f"'./{data}' (or an absolute path) for the folder"))])
    if is_name:
        return procedural_dataset(name=data, resolution=resolution, seed=seed, num_items=num_items, **options)
    if is_dir:
        if num_items is not None:
            raise ValueError(f"num_items={num_items!r} applies only to procedural datasets; a folder "
                             "dataset has one item per image (leave num_items=None)")
        accepted = [f.name for f in dataclasses.fields(ImageFolderConfig) if f.name not in ("root", "augment_seed")]
        unknown = sorted(set(options) - set(accepted) - {"resolution"})
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for a folder dataset; accepted: {accepted}")
        config = ImageFolderConfig(root=path, resolution=resolution, augment_seed=seed, **options)
        return ImageCaptionDataset(config)
    what = "a file, not a folder" if path is not None and path.exists() else "not an existing folder"
    raise DatasetError(f"cannot load data={data!r}:", [(str(data), (
        f"is {what} and not a procedural dataset name; pass a folder of images or one of: {_names()}"))])
