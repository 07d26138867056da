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


# ---- fine-tuned weights: the files DP-LDM and the federated release write, and the loaders read ----

# Released weight files are named <stem>_<kind>; a DP-LDM run writes the `dp_ldm` stem, a federated
# release the `federated` stem. `find_fine_tune_weights` reads exactly these names.
WEIGHT_SUFFIXES = {"lora": "_lora.safetensors",  # trainable='lora': one file for diffusers and ComfyUI
                   "diffusers": "_unet_diff.safetensors", "comfyui": "_comfyui.safetensors"}
FINE_TUNE_STEMS = ("dp_ldm", "federated")


def weight_file(stem: str, kind: str) -> str:
    """The file name of one released weight file: `weight_file("dp_ldm", "diffusers")`."""
    return stem + WEIGHT_SUFFIXES[kind]


def find_fine_tune_weights(folder) -> Path:
    """The diffusers-loadable weight file in a DP-LDM or federated output folder (LoRA or weight
    differences; the ComfyUI-keyed file is for ComfyUI's loader)."""
    folder = Path(folder)
    names = [weight_file(stem, kind) for stem in FINE_TUNE_STEMS for kind in ("lora", "diffusers")]
    found = [folder / name for name in names if (folder / name).is_file()]
    if not found:
        raise FileNotFoundError(f"{folder} holds none of {', '.join(names)}: give a DP-LDM or federated output "
                                "folder, or one of those files.")
    return found[0]


def write_fine_tune_weights(*, pipeline, chosen, base_state: dict, text_rows, record, out: Path,
                            stem: str = "dp_ldm") -> dict:
    """The released weight files of a fine-tune, each carrying `record`: one LoRA file
    (<stem>_lora) for `trainable='lora'`, else the trained tensors' differences from `base_state`
    (names as `training_modules` gives them) in diffusers names (<stem>_unet_diff) and in the keys
    ComfyUI's LoRA loader applies (<stem>_comfyui)."""
    from ..models.lora import lora_state_dict
    from ..models.weight_diffs import (TEXT_TABLE_DIFF_KEY, comfy_diff_keys, comfy_token_table_diff,
                                       token_table_difference, weight_differences)
    from ..privacy.record import write_safetensors

    from .diffusion import TEXT_ROWS_PARAM

    unet = pipeline.unet
    if chosen.lora_targets:
        lora = lora_state_dict(unet=unet, targets=chosen.lora_targets)
        return {"lora": write_safetensors(path=out / weight_file(stem, "lora"), tensors=lora, record=record)}
    tuned = {n: p.detach() for n, p in unet.named_parameters() if p.requires_grad}
    base = {n: base_state[f"unet.{n}"] for n in chosen.parameter_names}
    diffs = weight_differences(base=base, tuned=tuned, names=chosen.parameter_names)
    comfy = comfy_diff_keys(diffs=diffs, unet_config=unet.config)
    if text_rows is not None:
        table_diff = token_table_difference(rows=text_rows, base_rows=base_state[TEXT_ROWS_PARAM])
        diffs[TEXT_TABLE_DIFF_KEY] = table_diff
        comfy.update(comfy_token_table_diff(table_diff=table_diff, text_encoder=pipeline.text_encoder))
    return {"diffusers": write_safetensors(path=out / weight_file(stem, "diffusers"), tensors=diffs, record=record),
            "comfyui": write_safetensors(path=out / weight_file(stem, "comfyui"), tensors=comfy, record=record)}

