"""The one checkpoint unit every trainer and the split server write: tensors and state in one file.

A checkpoint is a single safetensors file whose metadata carries the JSON state (step, accountant,
settings fingerprint, ...) and a SHA-256 digest of the tensors. It is written to a temporary file,
fsynced, renamed over the old one and the folder fsynced (`privacy.record.atomic_target`), so a
crash at any moment leaves the previous checkpoint or the new one, never parameters of one step
with the step counter or accountant of another: a torn pair would let a resumed run under-record
ε. `load_checkpoint` refuses anything it cannot vouch for (another kind, other settings, a damaged
file, the two-file layout of privdiff 0.1) with a message that says what to do.

Checkpoints hold state computed on private data: they are by-products outside the DP guarantee,
kept in the run's by-products folder and never released.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from ..errors import public_name

CHECKPOINT_FILE = "checkpoint.safetensors"
METADATA_KEY = "privdiff_checkpoint"
_FORMAT = "privdiff-checkpoint"
_VERSION = 1
# privdiff 0.1 wrote tensors and JSON as two files renamed one after the other: a crash between the
# renames left them from different steps, so they are never trusted.
LEGACY_FILES = ("checkpoint.json", "job.json")


@public_name
class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, of another kind, or made with other settings."""


@dataclass(frozen=True)
class Checkpoint:
    tensors: dict  # name -> tensor (CPU)
    state: dict  # the JSON state saved with them


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(*, folder: str | Path, kind: str, tensors: Mapping[str, torch.Tensor], state: Mapping,
                    fingerprint: Mapping | None = None, name: str = CHECKPOINT_FILE) -> Path:
    """Write one checkpoint atomically; `fingerprint` (JSON settings) is checked again on load."""
    from safetensors.torch import save_file

    from ..privacy.record import atomic_target

    folder = Path(folder)
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    meta = {"format": _FORMAT, "version": _VERSION, "kind": kind, "digest": tensor_digest(tensors),
            "fingerprint": _plain(fingerprint or {}), "state": _plain(state),
            "note": "computed on private data; NOT covered by the differential-privacy guarantee; do not share"}
    path = folder / name
    with atomic_target(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta, allow_nan=False)})
    return path


def has_checkpoint(folder: str | Path, *, name: str = CHECKPOINT_FILE) -> bool:
    folder = Path(folder)
    return (folder / name).is_file() or any((folder / legacy).is_file() for legacy in LEGACY_FILES)


def load_checkpoint(*, folder: str | Path, kind: str, fingerprint: Mapping | None = None,
                    name: str = CHECKPOINT_FILE, resume_hint: str = "start without resume") -> Checkpoint:
    """Read a checkpoint back, refusing anything inconsistent: another kind, other settings
    (`fingerprint`; None: not checked, for a first look at the state), tensors that do not match
    their digest, or privdiff 0.1's two-file layout."""
    from safetensors import safe_open

    folder = Path(folder)
    path = folder / name
    if not path.is_file():
        legacy = [n for n in LEGACY_FILES if (folder / n).is_file()]
        if legacy:
            raise CheckpointError(
                f"{folder} holds a checkpoint in privdiff 0.1's two-file layout ({legacy[0]} beside a tensor file); "
                "a crash between its two writes can pair weights of one step with the step count and ε of "
                "another, so it is not resumed. Start a new run in another folder.")
        raise CheckpointError(f"no checkpoint in {folder}; {resume_hint}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[METADATA_KEY])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # safetensors and json raise their own types for damaged files
        raise CheckpointError(f"{path} is not a readable privdiff checkpoint ({type(error).__name__}: {error}); "
                              f"delete it and {resume_hint}.") from None
    if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
        raise CheckpointError(f"{path} is not a privdiff checkpoint of version {_VERSION}; {resume_hint}.")
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path} is a {meta.get('kind')!r} checkpoint, not {kind!r}; resume it with the "
                              "command that wrote it, or use another folder.")
    if tensor_digest(tensors) != meta.get("digest"):
        raise CheckpointError(f"{path} is damaged (its tensors do not match their digest); delete it and {resume_hint}.")
    expected = _plain(fingerprint) if fingerprint is not None else None
    saved = meta.get("fingerprint", {})
    if expected is not None and expected != saved:
        changed = sorted(k for k in set(expected) | set(saved) if expected.get(k) != saved.get(k))
        raise CheckpointError(f"the checkpoint in {folder} was made with other settings ({', '.join(changed)}); "
                              "resume with the same settings, or start a new run in another folder.")
    return Checkpoint(tensors=tensors, state=meta["state"])


def _plain(value):
    """JSON-normal form (tuples become lists, keys strings), so saved and current settings compare equal."""
    return json.loads(json.dumps(value, allow_nan=False, default=list))


# ---- what most checkpoints hold ----------------------------------------------------------------


def optimizer_tensors(optimizer: torch.optim.Optimizer, *, prefix: str = "optim.") -> tuple[dict, list]:
    """An optimizer's per-parameter state as tensors, and its param groups (JSON)."""
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            value = torch.as_tensor(value)
            tensors[f"{prefix}{index}.{key}"] = value.detach().cpu().contiguous().reshape(value.shape)
    return tensors, state["param_groups"]


def restore_optimizer(optimizer: torch.optim.Optimizer, *, tensors: Mapping, param_groups: Sequence,
                      prefix: str = "optim.") -> None:
    state: dict = {"state": {}, "param_groups": list(param_groups)}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, name = key[len(prefix):].split(".", 1)
            state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(state)


def generator_tensors(generators: Mapping[str, torch.Generator]) -> dict:
    return {f"rng.{name}": generator.get_state() for name, generator in generators.items()}


def restore_generators(generators: Mapping[str, torch.Generator], *, tensors: Mapping) -> None:
    for name, generator in generators.items():
        generator.set_state(tensors[f"rng.{name}"])
