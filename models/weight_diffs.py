"""Fine-tunes released as weight differences, in diffusers and in ComfyUI/original key names.

A DP-LDM fine-tune changes a small set of UNet tensors. Releasing `tuned - base` for just those is
small, and applies to the user's own copy of the base model. ComfyUI's LoRA loader understands
full-weight differences under original-layout names: `diffusion_model.<key>.diff` for a weight and
`diffusion_model.<key>.diff_b` for the bias of the same layer (comfy/lora.py, "generic" format).
"""

from __future__ import annotations

from .original_layout import unet_key_map

COMFY_PREFIX = "diffusion_model."


def weight_differences(*, base: dict, tuned: dict, names) -> dict:
    """{diffusers name: tuned - base} for the given parameter names (float32, contiguous)."""
    out = {}
    for name in names:
        if name not in base or name not in tuned:
            raise KeyError(f"parameter {name!r} is missing from the base or the tuned UNet.")
        out[name] = (tuned[name].float() - base[name].float()).contiguous()
    return out


def comfy_diff_keys(*, diffs: dict, unet_config) -> dict:
    """Rename diffusers-named UNet differences to the keys ComfyUI's LoRA loader applies."""
    original = unet_key_map(config=unet_config, keys=diffs.keys())
    out = {}
    for name, value in diffs.items():
        key = original[name]
        if key.endswith(".weight"):
            out[f"{COMFY_PREFIX}{key[: -len('.weight')]}.diff"] = value
        elif key.endswith(".bias"):
            out[f"{COMFY_PREFIX}{key[: -len('.bias')]}.diff_b"] = value
        else:
            out[f"{COMFY_PREFIX}{key}.diff"] = value
    return out


def apply_differences(*, unet, diffs: dict, scale: float = 1.0) -> None:
    """Add diffusers-named differences to a UNet in place (what ComfyUI does at strength `scale`)."""
    import torch

    params = dict(unet.named_parameters())
    unknown = sorted(set(diffs) - set(params))
    if unknown:
        raise KeyError(f"{len(unknown)} differences name no parameter of this UNet (first: {unknown[0]!r}); "
                       "was the fine-tune made on another base model?")
    with torch.no_grad():
        for name, value in diffs.items():
            if params[name].shape != value.shape:
                raise ValueError(f"{name}: difference of shape {tuple(value.shape)} for a parameter of "
                                 f"shape {tuple(params[name].shape)}: another base model?")
            params[name].add_(value.to(params[name].dtype), alpha=scale)
