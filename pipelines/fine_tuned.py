"""Load a base model plus a privdiff fine-tune (DP-LDM weight differences or LoRA) as one pipeline.

`DPLDMPipeline` is a `StableDiffusionPipeline` (SD1/SD2 bases) that knows where its weights came
from: `DPLDMPipeline.from_fine_tune(base=..., weights=...)` loads the base the way `--base` does,
applies the fine-tune and keeps its privacy record in `pipeline.privacy_record`. For other bases
(SDXL), `apply_fine_tune` does the same to any diffusers pipeline.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionPipeline

from ..training.release import find_fine_tune_weights


def _weights_file(weights: str | Path) -> Path:
    path = Path(weights)
    if path.is_dir():
        return find_fine_tune_weights(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    return path


def apply_fine_tune(*, pipeline, weights: str | Path, scale: float = 1.0, adapter_name: str = "privdiff"):
    """Apply a DP-LDM output to `pipeline` in place; returns its privacy record.

    LoRA files go through diffusers' own `load_lora_weights` (scale through `set_adapters`);
    weight differences are added to the UNet, times `scale`.
    """
    from safetensors import safe_open

    from ..models.lora import LORA_PREFIX
    from ..models.weight_diffs import (COMFY_PREFIX, TEXT_TABLE_DIFF_KEY, apply_differences,
                                       apply_token_table_difference)
    from ..privacy.record import read_record

    path = _weights_file(weights)
    record = read_record(path)
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        if keys and all(k.startswith(LORA_PREFIX) for k in keys):
            pipeline.load_lora_weights(str(path), adapter_name=adapter_name)
            pipeline.set_adapters([adapter_name], adapter_weights=[scale])
        elif keys and all(k.startswith(COMFY_PREFIX) for k in keys):
            raise ValueError(f"{path.name} is the ComfyUI-format file (load it with ComfyUI's LoRA loader); "
                             "for diffusers use the *_unet_diff.safetensors file from the same folder.")
        else:
            unet_keys = [k for k in keys if k != TEXT_TABLE_DIFF_KEY]
            apply_differences(unet=pipeline.unet, diffs={k: handle.get_tensor(k) for k in unet_keys}, scale=scale)
            if TEXT_TABLE_DIFF_KEY in keys:
                apply_token_table_difference(text_encoder=pipeline.text_encoder,
                                             table_diff=handle.get_tensor(TEXT_TABLE_DIFF_KEY), scale=scale)
    return record


class RecordInConfig:
    """A pipeline whose privacy record lives in its config (model_index.json), so `save_pretrained`
    and `from_pretrained` keep it; `privacy_record` reads and sets it as a PrivacyRecord."""

    @property
    def privacy_record(self):
        from ..privacy.record import PrivacyRecord

        data = self.config.get("privacy_record")
        return None if data is None else PrivacyRecord.from_dict(data)

    @privacy_record.setter
    def privacy_record(self, record) -> None:
        self.register_to_config(privacy_record=None if record is None else record.to_dict())


class DPLDMPipeline(RecordInConfig, StableDiffusionPipeline):
    """Stable Diffusion with a privdiff fine-tune applied; `privacy_record` says what ε it carries and
    survives `save_pretrained` / `DPLDMPipeline.from_pretrained`. `__call__` is diffusers' own."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None,
                 image_encoder=None, requires_safety_checker: bool = False, privacy_record: dict | None = None):
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                         safety_checker=safety_checker, feature_extractor=feature_extractor,
                         image_encoder=image_encoder, requires_safety_checker=requires_safety_checker)
        self.register_to_config(privacy_record=privacy_record)

    @classmethod
    def from_fine_tune(cls, *, base, weights: str | Path, scale: float = 1.0) -> "DPLDMPipeline":
        """`base`: 'tiny', a diffusers folder or a single-file checkpoint; `weights`: a DP-LDM or
        federated output folder, or its LoRA / weight-difference file."""
        from ..models.loading import load_pipeline

        loaded = load_pipeline(base=base)
        if not isinstance(loaded, StableDiffusionPipeline):
            raise TypeError(f"{type(loaded).__name__} is not an SD1/SD2 pipeline; use "
                            "privdiff.pipelines.fine_tuned.apply_fine_tune(pipeline=..., weights=...) on it.")
        components = {k: v for k, v in loaded.components.items() if k not in ("safety_checker", "feature_extractor")}
        pipeline = cls(**components)
        pipeline.privacy_record = apply_fine_tune(pipeline=pipeline, weights=weights, scale=scale)
        return pipeline
