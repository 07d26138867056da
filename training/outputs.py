"""Output folders that are checked before any work starts, and written only when the work is real.

`check_out_folder` runs before anything loads: it refuses a path that is a file, a folder that
already holds a finished result (unless resuming), a resume with nothing to resume, and a place
this process cannot write to, without creating anything (a refused run leaves no file behind).
`prepare_out_folder` then creates the folder just before training starts and proves it can be
written (a probe file written, synced and removed), so a run never learns at its end that its
results have nowhere to go.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

# Where a run keeps what it computed on private data outside the DP guarantee (checkpoints, losses):
# labelled by its name, never released, deleted at the end unless kept on purpose.
BYPRODUCTS = "byproducts-not-covered-by-dp"


def check_out_folder(out, *, results: Iterable[str] = (), resume: bool = False, has_checkpoint: bool | None = None,
                     option: str = "--out") -> Path:
    """Refuse an output folder that cannot work, creating nothing. `results`: file names a finished
    run leaves there; `has_checkpoint`: whether a resumable checkpoint exists (None: not asked)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{option} {out} is a file; give a folder (it is created if missing).")
    if out.is_dir():
        finished = [name for name in results if (out / name).exists()]
        if finished and not resume:
            raise FileExistsError(f"{option} {out} already holds a finished result ({finished[0]}); choose another "
                                  "folder, or delete that one.")
        _probe(out, f"{option} {out}: this user cannot write there; choose a folder you can write to")
    else:
        parent = out.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise FileExistsError(f"{option} {out}: cannot be created ({parent} is a file); choose another place.")
        _probe(parent, f"{option} {out}: cannot be created ({parent} does not take new folders); choose another place")
    if resume and has_checkpoint is False:
        raise FileNotFoundError(f"--resume: {out} holds no checkpoint to continue; start without --resume.")
    return out


def _probe(folder: Path, message: str) -> None:
    """Really make (and at once remove) a folder in `folder`: permissions, read-only and special file
    systems (/proc) all answer truthfully, and nothing is left behind."""
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".privdiff-probe-", dir=folder))
    except OSError as error:
        raise PermissionError(f"{message} ({error.strerror}).") from None


def prepare_out_folder(out, *, option: str = "--out") -> Path:
    """Create the output folder and prove it takes a file (written, synced, removed)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".privdiff-write-probe"
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as error:
        raise OSError(error.errno, f"{option} {out} cannot be written ({error.strerror}); free space or choose "
                                   "another folder") from None
    return out
