"""Image folders with captions, hints and subjects, in the diffusers / Hugging Face imagefolder layout.

::

    my_images/
        0001.png            images: .png .jpg .jpeg .webp .bmp (any case), read from the top level
        0001.txt            caption beside its image (sidecar), or ...
        metadata.jsonl      ... one JSON object per line:
                            {"file_name": "0001.png", "text": "a photo of ...",
                             "conditioning_image": "edges/0001.png", "subject": "alice"}
        hints/0001.png      hint with the image's stem (``conditioning/`` works too)

``metadata.jsonl`` may also name images in subfolders (``"file_name": "train/0001.png"``); a file
it names as a hint is never itself a training image. Where both give a caption or hint, the
metadata wins. ``caption`` is accepted for ``text`` and ``hint`` for ``conditioning_image``.
Hidden files (``.*``, e.g. macOS ``._0001.png``) are ignored.

Everything is checked when the dataset is built, each image and hint fully decoded, and every
problem found is reported in one DatasetError, so one run lists all the files to fix.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from .base import CaptionedImageDataset, DatasetError
from .transforms import RESAMPLE_FILTERS, apply_geometry, hint_to_tensor, image_to_tensor, plan_geometry, to_rgb

__all__ = [
    "IMAGE_EXTENSIONS",
    "METADATA_FILE",
    "HINT_FOLDERS",
    "ImageFolderConfig",
    "ImageRecord",
    "ImageCaptionDataset",
    "scan_image_folder",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
HINT_FOLDERS: tuple[str, ...] = ("hints", "conditioning")
_CAPTION_KEYS = ("text", "caption")
_HINT_KEYS = ("conditioning_image", "hint")
_EXIF_ORIENTATION = 0x0112

_CAPTION_FIX = (
    'add a caption file {stem}.txt beside it or a line {{"file_name": "{name}", "text": "..."}} '
    "in metadata.jsonl (captions train DP-LDM; Textual Inversion trains on its own template and needs none)"
)


@dataclass(frozen=True)
class ImageFolderConfig:
    """How to read an image folder. Validated on construction.

    root: the folder (see the module docstring for its layout).
    resolution: side of the square items, in pixels.
    caption_required: an image without caption is an error; if False it gets ``default_caption``.
    hint_required: an image without hint is an error (set it for ControlNet training).
    center_crop: crop the centre after resizing the short side; False crops at random.
    random_flip: mirror left-right with probability 1/2 (off by default: it changes text and
        asymmetric subjects).
    resample: PIL filter for resizing: "bicubic", "lanczos", "bilinear" or "nearest".
    augment_seed: seeds random crops and flips; item i in epoch e uses the numpy generator
        ``default_rng([augment_seed, e, i])``, so results do not depend on DataLoader workers.
    default_caption: the caption of images without one when ``caption_required`` is False.
    """

    root: str | os.PathLike
    resolution: int = 64
    caption_required: bool = True
    hint_required: bool = False
    center_crop: bool = True
    random_flip: bool = False
    resample: str = "bicubic"
    augment_seed: int = 0
    default_caption: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.root, (str, os.PathLike)) or str(self.root) == "":
            raise ValueError(f"root={self.root!r} must be the path of a folder of images")
        object.__setattr__(self, "root", Path(self.root).expanduser())
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or self.resolution < 8:
            raise ValueError(f"resolution={self.resolution!r} must be an int >= 8 (pixels), e.g. 64 or 512")
        for name in ("caption_required", "hint_required", "center_crop", "random_flip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"resample={self.resample!r} is not supported; use one of {sorted(RESAMPLE_FILTERS)}")
        if isinstance(self.augment_seed, bool) or not isinstance(self.augment_seed, int) or self.augment_seed < 0:
            raise ValueError(f"augment_seed={self.augment_seed!r} must be an int >= 0")
        if not isinstance(self.default_caption, str):
            raise ValueError(f"default_caption={self.default_caption!r} must be a str")


@dataclass(frozen=True)
class ImageRecord:
    """One validated image: where it is, its caption, hint, subject and (EXIF-oriented) size."""

    path: Path
    caption: str
    hint_path: Path | None
    subject: str | None
    size: tuple[int, int]


@dataclass
class _MetaEntry:
    line: int
    caption: str | None = None
    hint_path: Path | None = None
    subject: str | None = None


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _inside(root: Path, relative: str) -> Path | None:
    """root/relative, or None when `relative` is absolute or climbs out of root."""
    pure = PurePosixPath(relative.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (len(relative) > 1 and relative[1] == ":"):
        return None
    return root.joinpath(*pure.parts)


def _decode(path: Path) -> tuple[int, int] | str:
    """Fully decode one image; its size after EXIF orientation, or why it cannot be read."""
    try:
        with Image.open(path) as im:
            im.load()  # load(), not just open(): open() reads only the header, so truncation passes
            w, h = im.size
            if im.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):  # rotated by 90 degrees
                w, h = h, w
            return (w, h)
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, zlib.error)
        return f"{type(exc).__name__}: {exc}"


def _read_metadata(root: Path, problems: list[tuple[str, str]]) -> dict[Path, _MetaEntry]:
    meta_path = root / METADATA_FILE
    entries: dict[Path, _MetaEntry] = {}
    if not meta_path.is_file():
        return entries
    where = str(meta_path)
    try:
        lines = meta_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        problems.append((where, f"cannot be read as UTF-8 text ({exc}); save it as UTF-8 JSON Lines"))
        return entries
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            problems.append((where, f"line {number} is not valid JSON ({exc.msg}); "
                                    'write one object per line, e.g. {"file_name": "0001.png", "text": "..."}'))
            continue
        if not isinstance(obj, dict):
            problems.append((where, f"line {number} is a JSON {type(obj).__name__}, not an object; "
                                    'write {"file_name": "...", "text": "..."}'))
            continue
        name = obj.get("file_name")
        if not isinstance(name, str) or not name.strip():
            problems.append((where, f'line {number} lacks "file_name"; every line needs '
                                    '{"file_name": "<image path relative to the folder>", "text": "..."}'))
            continue
        image_path = _inside(root, name)
        if image_path is None:
            problems.append((where, f"line {number}: file_name {name!r} points outside the folder; "
                                    "use a path relative to the folder"))
            continue
        if not _is_image_name(image_path.name):
            problems.append((where, f"line {number}: file_name {name!r} is not an image of an accepted "
                                    f"type ({', '.join(IMAGE_EXTENSIONS)}); convert it or remove the line"))
            continue
        if image_path in entries:
            problems.append((where, f"line {number}: file_name {name!r} is also on line "
                                    f"{entries[image_path].line}; keep one line per image"))
            continue
        entry = _MetaEntry(line=number)
        entries[image_path] = entry
        if not image_path.is_file():
            problems.append((str(image_path), f"is listed in {METADATA_FILE} line {number} but missing; "
                                              "add the image or remove the line"))
        caption = next((obj[k] for k in _CAPTION_KEYS if obj.get(k) is not None), None)
        if caption is not None and not isinstance(caption, str):
            problems.append((where, f'line {number}: the caption of {name!r} is {caption!r}, not a string; '
                                    'write "text": "..."'))
        elif caption is not None:
            entry.caption = caption.strip()
        hint = next((obj[k] for k in _HINT_KEYS if obj.get(k) is not None), None)
        if hint is not None:
            hint_path = _inside(root, hint) if isinstance(hint, str) and hint.strip() else None
            if hint_path is None:
                problems.append((where, f"line {number}: the hint of {name!r} is {hint!r}; "
                                        "give a path relative to the folder"))
            elif not hint_path.is_file():
                problems.append((str(hint_path), f"hint of {name} (metadata.jsonl line {number}) is missing; "
                                                 "add the file or remove the reference"))
            else:
                entry.hint_path = hint_path
        subject = obj.get("subject")
        if subject is not None:
            if isinstance(subject, bool) or not isinstance(subject, (str, int)) or str(subject).strip() == "":
                problems.append((where, f"line {number}: subject {subject!r} of {name!r} must be a non-empty "
                                        "string or an integer id"))
            else:
                entry.subject = str(subject).strip()
    return entries


_Pending = tuple[Path, str, Path | None, str | None]  # image, caption, hint, subject


def _problems_error(root: Path, problems: list[tuple[str, str]]) -> DatasetError:
    return DatasetError(f"{len(problems)} problem(s) in image folder {root}; fix them all and retry:", problems)


def _find_images(root: Path, meta: dict[Path, _MetaEntry], problems: list[tuple[str, str]]) -> list[Path]:
    """The images in a stable order; raises at once when there are none (nothing else can be checked)."""
    meta_hints = {e.hint_path for e in meta.values() if e.hint_path is not None}
    # Images: the top level plus whatever metadata.jsonl names; a file used as a hint is no image.
    images = {p for p in root.iterdir() if p.is_file() and _is_image_name(p.name)}
    images |= {p for p in meta if p.is_file()}
    images -= meta_hints
    images_sorted = sorted(images, key=lambda p: p.relative_to(root).as_posix())
    if not images_sorted:
        others = sorted({p.suffix.lower() for p in root.iterdir() if p.is_file() and p.suffix}
                        - {".txt", ".jsonl"})
        seen = f" (found only {', '.join(others)} files)" if others else ""
        problems.append((str(root), f"contains no images{seen}; accepted extensions are "
                                    f"{', '.join(IMAGE_EXTENSIONS)} (any case), at the top level or "
                                    f"named in {METADATA_FILE}"))
        raise _problems_error(root, problems)
    return images_sorted


def _hint_files_by_stem(root: Path) -> dict[str, list[Path]]:
    """Hints found by stem in hints/ or conditioning/."""
    hint_files: dict[str, list[Path]] = defaultdict(list)
    for folder in HINT_FOLDERS:
        if (root / folder).is_dir():
            for p in sorted((root / folder).iterdir()):
                if p.is_file() and _is_image_name(p.name):
                    hint_files[p.stem].append(p)
    return hint_files


def _caption_of(path: Path, *, name: str, entry: _MetaEntry | None, same_dir_stem: list[Path],
                config: ImageFolderConfig, problems: list[tuple[str, str]]) -> str:
    """The metadata caption, else the sidecar's; ``same_dir_stem`` are the images sharing that sidecar."""
    caption = entry.caption if entry is not None and entry.caption else None
    if caption is None:
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            if len(same_dir_stem) > 1:
                others = ", ".join(p.name for p in same_dir_stem)
                problems.append((str(path), f"shares its caption file {sidecar.name} with {others}; "
                                            "rename one image or caption them in metadata.jsonl"))
                caption = ""
            else:
                try:
                    caption = sidecar.read_text(encoding="utf-8").strip()
                except (OSError, UnicodeDecodeError) as exc:
                    problems.append((str(sidecar), f"cannot be read as UTF-8 text ({exc}); save it as UTF-8"))
                    caption = ""
                if caption == "" and config.caption_required:
                    problems.append((str(sidecar), f"caption file of {name} is empty; write the caption "
                                                   "into it"))
    if caption is None:
        if config.caption_required:
            problems.append((str(path), "has no caption; " + _CAPTION_FIX.format(stem=path.stem, name=name)))
        caption = config.default_caption
    elif caption == "" and not config.caption_required:
        caption = config.default_caption
    return caption


def _hint_of(path: Path, *, root: Path, entry: _MetaEntry | None, hint_files: dict[str, list[Path]],
             same_stem: list[Path], config: ImageFolderConfig, problems: list[tuple[str, str]]) -> Path | None:
    """The metadata hint, else the one hint file with the image's stem; ``same_stem`` are the images
    sharing that stem anywhere (a hint folder cannot tell them apart)."""
    hint = entry.hint_path if entry is not None else None
    if hint is None and hint_files.get(path.stem):
        candidates = hint_files[path.stem]
        if len(candidates) > 1:
            problems.append((str(path), "has several hint files ("
                                        + ", ".join(str(c.relative_to(root)) for c in candidates)
                                        + "); keep one"))
        elif len(same_stem) > 1:
            problems.append((str(path), f"shares the stem {path.stem!r} with "
                                        + ", ".join(str(p.relative_to(root)) for p in same_stem if p != path)
                                        + f", so {candidates[0].relative_to(root)} is ambiguous; rename "
                                          "one image or name hints in metadata.jsonl"))
        else:
            hint = candidates[0]
    if hint is None and config.hint_required:
        problems.append((str(path), f"has no hint; add hints/{path.stem}.png or "
                                    f'"conditioning_image" to its line in {METADATA_FILE}, '
                                    "or pass hint_required=False"))
    return hint


def _decode_all(paths: list[Path]) -> dict[Path, tuple[int, int] | str]:
    """Decode everything once, in threads (PIL's decoders release the GIL)."""
    workers = max(1, min(8, os.cpu_count() or 1, len(paths)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(paths, pool.map(_decode, paths)))


def _check_decoded(pending: list[_Pending], decoded: dict[Path, tuple[int, int] | str],
                   problems: list[tuple[str, str]]) -> list[ImageRecord]:
    """Records of the readable images; unreadable files and hints of another size are problems."""
    decode_fix = "re-save it as PNG or JPEG, or delete it"
    records: list[ImageRecord] = []
    for path, caption, hint, subject in pending:
        size = decoded[path]
        if isinstance(size, str):
            problems.append((str(path), f"is not a readable image ({size}); {decode_fix}"))
        if hint is not None:
            hint_size = decoded[hint]
            if isinstance(hint_size, str):
                problems.append((str(hint), f"hint of {path.name} is not a readable image ({hint_size}); "
                                            f"{decode_fix}"))
            elif not isinstance(size, str) and hint_size != size:
                problems.append((str(hint), f"hint is {hint_size[0]}x{hint_size[1]} pixels but its image "
                                            f"{path.name} is {size[0]}x{size[1]}; resize the hint to its "
                                            "image's size"))
        if not isinstance(size, str):
            records.append(ImageRecord(path, caption, hint, subject, size))
    return records


def scan_image_folder(*, config: ImageFolderConfig) -> tuple[ImageRecord, ...]:
    """Find, decode and pair every image of ``config.root`` with its caption, hint and subject.

    Raises DatasetError listing every problem found (not just the first).
    """
    if getattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False):
        warnings.warn(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process, so truncated images cannot "
            "be detected; something imported before privdiff set it",
            RuntimeWarning,
            stacklevel=2,
        )
    root = config.root.absolute()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DatasetError(f"cannot read image folder {root}:",
                           [(str(root), f"{what}; pass the folder that holds your images")])

    problems: list[tuple[str, str]] = []
    meta = _read_metadata(root, problems)
    images = _find_images(root, meta, problems)
    hint_files = _hint_files_by_stem(root)
    # Sidecar captions and hint folders are matched by stem, so two images sharing one are ambiguous.
    by_dir_stem: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for p in images:
        by_dir_stem[(p.parent, p.stem)].append(p)
        by_stem[p.stem].append(p)

    # Each image's caption problems before its hint problems, image by image.
    pending: list[_Pending] = []
    for path in images:
        entry = meta.get(path)
        caption = _caption_of(path, name=path.relative_to(root).as_posix(), entry=entry,
                              same_dir_stem=by_dir_stem[(path.parent, path.stem)], config=config,
                              problems=problems)
        hint = _hint_of(path, root=root, entry=entry, hint_files=hint_files, same_stem=by_stem[path.stem],
                        config=config, problems=problems)
        pending.append((path, caption, hint, entry.subject if entry is not None else None))

    decoded = _decode_all(sorted({p for p, *_ in pending} | {h for _, _, h, _ in pending if h is not None}))
    records = _check_decoded(pending, decoded, problems)
    if problems:
        raise _problems_error(root, problems)
    return tuple(records)


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return to_rgb(ImageOps.exif_transpose(im))


class ImageCaptionDataset(CaptionedImageDataset):
    """A validated image folder as a torch Dataset; items as described in ``privdiff.data.base``.

    ``has_hints`` is True only when every image has a hint; otherwise items without one carry
    ``hint=None``. Call ``set_epoch`` each epoch when random crops or flips are on.
    """

    def __init__(self, config: ImageFolderConfig):
        if not isinstance(config, ImageFolderConfig):
            raise TypeError(f"config={config!r} must be an ImageFolderConfig(root=..., ...)")
        self.config = config
        self.records: tuple[ImageRecord, ...] = scan_image_folder(config=config)
        self.has_hints = all(r.hint_path is not None for r in self.records)
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw fresh random crops/flips for a new epoch (a no-op with centre crops and no flips)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch={epoch!r} must be an int >= 0")
        self._epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def caption(self, index: int) -> str:
        return self.records[self._check_index(index)].caption

    def subject(self, index: int) -> str | None:
        return self.records[self._check_index(index)].subject

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = self._check_index(index)
        rec = self.records[i]
        cfg = self.config
        image = _load_rgb(rec.path)
        rng = None
        if not cfg.center_crop or cfg.random_flip:
            rng = np.random.default_rng([cfg.augment_seed, self._epoch, i])
        geometry = plan_geometry(size=image.size, resolution=cfg.resolution, center_crop=cfg.center_crop,
                                 random_flip=cfg.random_flip, rng=rng)
        pixel_values = image_to_tensor(apply_geometry(image, geometry, resample=cfg.resample))
        hint: torch.Tensor | None = None
        if rec.hint_path is not None:
            hint = hint_to_tensor(apply_geometry(_load_rgb(rec.hint_path), geometry, resample=cfg.resample))
        return {
            "pixel_values": pixel_values,
            "caption": rec.caption,
            "hint": hint,
            "subject": rec.subject,
            "index": i,
            "path": str(rec.path),
        }
