"""Datasets: image folders with captions, hints and subjects, and procedural sets drawn in code.

Every dataset yields the same items (see ``privdiff.data.base``) and batches with ``collate``::

    from privdiff.data import load_dataset, collate
    ds = load_dataset(data="circles", resolution=64, seed=0)     # or data="path/to/folder"
    loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate)
"""

from .base import CaptionedImageDataset, DatasetError, collate
from .folder import (
    HINT_FOLDERS,
    IMAGE_EXTENSIONS,
    METADATA_FILE,
    ImageCaptionDataset,
    ImageFolderConfig,
    ImageRecord,
    scan_image_folder,
)
from .registry import (
    PROCEDURAL_DATASETS,
    config_factory,
    load_dataset,
    procedural_dataset,
    register_procedural_dataset,
)
from .procedural import (  # noqa: E402  (registers 'circles' and 'shapes')
    PALETTE,
    SHAPES,
    CircleSpec,
    CirclesConfig,
    CirclesDataset,
    ProceduralDataset,
    ShapeSpec,
    ShapesConfig,
    ShapesDataset,
    caption_for,
)
from .transforms import Geometry, apply_geometry, plan_geometry

__all__ = [
    "CaptionedImageDataset",
    "DatasetError",
    "collate",
    "HINT_FOLDERS",
    "IMAGE_EXTENSIONS",
    "METADATA_FILE",
    "ImageCaptionDataset",
    "ImageFolderConfig",
    "ImageRecord",
    "scan_image_folder",
    "PROCEDURAL_DATASETS",
    "config_factory",
    "load_dataset",
    "procedural_dataset",
    "register_procedural_dataset",
    "PALETTE",
    "SHAPES",
    "CircleSpec",
    "CirclesConfig",
    "CirclesDataset",
    "ProceduralDataset",
    "ShapeSpec",
    "ShapesConfig",
    "ShapesDataset",
    "caption_for",
    "Geometry",
    "apply_geometry",
    "plan_geometry",
]
