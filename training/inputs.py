"""What every trainer's `base` and `data` may be, resolved the same way for all of them.

`base`: a pipeline object (nodes pass the one they built), anything `load_pipeline` takes ('tiny',
a diffusers folder, a single-file checkpoint), or a `BaseSpec` (a base with its config folder and
tokenizers). `data`: a dataset object, a folder, or a built-in
set's name. The data is resolved first, at the base's resolution but without loading the model, so
that bad data is refused before minutes of loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BaseSpec:
    """A base to load when the trainer is ready for it, with the options `load_pipeline` takes beside
    it: a single file's config folder and its tokenizers (the CLI's --base, --config, --tokenizer,
    --tokenizer-2)."""

    base: str | Path
    config: str | Path | None = None
    tokenizer: str | Path | None = None
    tokenizer_2: str | Path | None = None


def is_unloaded(base) -> bool:
    """Whether `base` names a model still to be loaded (rather than being a pipeline object)."""
    return isinstance(base, (str, Path, BaseSpec))


def _spec(base) -> BaseSpec:
    return base if isinstance(base, BaseSpec) else BaseSpec(base=base)


def is_dataset(data) -> bool:
    return hasattr(data, "__getitem__") and not isinstance(data, (str, Path))


def resolve_data(*, base, data, seed: int = 0, num_items: int | None = None):
    """`data` as a dataset: loaded at `base`'s resolution when it is a folder or a set's name."""
    if is_dataset(data):
        return data
    from ..data import load_dataset
    from ..models.loading import base_resolution

    if is_unloaded(base):
        spec = _spec(base)
        resolution = base_resolution(base=spec.base, config=spec.config)
    else:
        resolution = base.unet.config.sample_size * base.vae_scale_factor
    return load_dataset(data=data, resolution=resolution, seed=seed, num_items=num_items)


def resolve_base(base, *, device: str | None = None):
    """`base` as a pipeline (loaded when it is a name or path), moved to `device` when one is given."""
    from ..models.loading import load_pipeline

    if is_unloaded(base):
        spec = _spec(base)
        pipeline = load_pipeline(base=spec.base, config=spec.config, tokenizer=spec.tokenizer,
                                 tokenizer_2=spec.tokenizer_2)
    else:
        pipeline = base
    if device is not None:
        pipeline.to(device)
    return pipeline
