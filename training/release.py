"""Releases whose files appear together or not at all.

A release (weight files, samples, embeddings in several formats) is written into a staging folder
inside the output folder; each file is written atomically and fsynced. When all are there, a
`COMMIT` file listing them is written atomically: that is the moment the release exists. Then the
files are renamed into the output folder and the staging folder removed. A crash before `COMMIT`
leaves nothing but the staging folder, which the next run on that folder deletes; a crash after it
leaves a release that the next run completes (`recover_release`). A write that fails (a full disk,
a permission) raises, the staging folder is removed, and nothing of the release is visible.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

STAGING = ".release-staging"
COMMIT = "COMMIT"


class Release:
    """`with Release(out) as staging:` write every file of the release into `staging`; on a clean
    exit they are committed into `out` together (`files` then maps each name to its final path)."""

    def __init__(self, out):
        self.out = Path(out)
        self.staging = self.out / STAGING
        self.files: dict[str, Path] = {}

    def __enter__(self) -> Path:
        recover_release(self.out)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        return self.staging

    def __exit__(self, kind, error, trace) -> bool:
        if kind is not None:
            shutil.rmtree(self.staging, ignore_errors=True)  # nothing of a failed release is visible
            if isinstance(error, OSError):
                raise self._failed(error) from error
            return False
        from ..privacy.record import atomic_target

        names = sorted(p.name for p in self.staging.iterdir() if p.is_file())
        try:
            with atomic_target(self.staging / COMMIT) as tmp:
                tmp.write_text(json.dumps({"files": names}))
        except BaseException as failure:
            shutil.rmtree(self.staging, ignore_errors=True)
            if isinstance(failure, OSError):
                raise self._failed(failure) from failure
            raise
        self.files = _move_committed(self.out)
        return False

    def _failed(self, error: OSError) -> OSError:
        return OSError(error.errno, f"the release could not be written to {self.out} ({error.strerror or error}); "
                                    "nothing of it is visible and the run's final checkpoint is kept: free space, "
                                    "then resume the run (--resume)")

    def final(self, staged: Path | None) -> Path | None:
        """Where a file written into the staging folder lives once committed."""
        return None if staged is None else self.out / Path(staged).name


def recover_release(out) -> dict[str, Path]:
    """Finish a release a crash interrupted after its commit, or discard one interrupted before it."""
    staging = Path(out) / STAGING
    if not staging.is_dir():
        return {}
    if (staging / COMMIT).is_file():
        return _move_committed(Path(out))
    shutil.rmtree(staging, ignore_errors=True)
    return {}


def _move_committed(out: Path) -> dict[str, Path]:
    from ..privacy.record import fsync_folder

    staging = out / STAGING
    names = json.loads((staging / COMMIT).read_text())["files"]
    moved = {}
    for name in names:
        if (staging / name).exists():  # already moved by an interrupted earlier attempt otherwise
            os.replace(staging / name, out / name)
        moved[name] = out / name
    fsync_folder(out)
    shutil.rmtree(staging, ignore_errors=True)
    return moved
