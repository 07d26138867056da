"""Putting a released file where another program's loader finds it (ComfyUI's models/loras, ...)."""

from __future__ import annotations

import filecmp
import os
import re
import shutil
from pathlib import Path

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_release_name(name: str) -> str:
    """A name that is one safe file name on every system (no folders, no spaces)."""
    if not _SAFE_NAME.match(name or "") or name.endswith("."):
        raise ValueError(f"name={name!r}: use letters, digits, '.', '_' and '-' (at most 100, starting with a "
                         "letter or digit), e.g. 'my-style'.")
    return name


def publish_release(*, source: str | os.PathLike, destination: str | os.PathLike, replace: bool = False) -> Path:
    """Copy a released file (its privacy record travels inside a safetensors file, or as the
    `.privacy.json` sidecar, which is copied too) to `destination`, atomically. An existing different
    file is kept unless `replace`: a new name never overwrites someone's model by accident."""
    from ..privacy.record import sidecar_path

    source, destination = Path(source), Path(destination)
    if destination.exists() and not replace and not filecmp.cmp(source, destination, shallow=False):
        raise FileExistsError(f"{destination} already exists and holds another file; choose another name, "
                              "or delete that file first.")
    destination.parent.mkdir(parents=True, exist_ok=True)
    pairs = [(source, destination)]
    if sidecar_path(source).exists():
        pairs.append((sidecar_path(source), sidecar_path(destination)))
    for src, dst in pairs:
        partial = dst.with_name(f".{dst.name}.partial")
        shutil.copyfile(src, partial)
        os.replace(partial, dst)
    return destination
