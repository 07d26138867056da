"""Fine-tunes released as weight differences, in diffusers and in ComfyUI/original key names.

A DP-LDM fine-tune changes a small set of UNet tensors. Releasing `tuned - base` for just those is
small, and applies to the user's own copy of the base model. ComfyUI's LoRA loader understands
full-weight differences under original-layout names: `diffusion_model.<key>.diff` for a weight and
`diffusion_model.<key>.diff_b` for the bias of the same layer (comfy/lora.py, "generic" format).
"""

from __future__ import annotations

from .original_layout import unet_key_map

COMFY_PREFIX = "diffusion_model."
# The token table's difference (trained conditioning rows, zeros elsewhere), in the diffusers-named file.
TEXT_TABLE_DIFF_KEY = "text_encoder.token_embedding.weight"
COMFY_MIN_VOCAB = 49408  # ComfyUI builds SD1/SD2 text encoders with CLIP's full vocabulary


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


def token_table_difference(*, rows, base_rows):
    """Full-table difference [V, d] of a `TrainableRows` module: its rows' change, zeros elsewhere."""
    table = rows.base.weight.detach().float()
    diff = table.new_zeros(table.shape)
    diff[rows.row_ids] = rows.rows.detach().float() - base_rows.float()
    return diff.contiguous()


def comfy_token_table_diff(*, table_diff, text_encoder) -> dict:
    """The table difference under ComfyUI's generic text-encoder key (`text_encoders.clip_l...` for
    SD1, `clip_h` for SD2), padded to ComfyUI's table size."""
    import torch

    width = text_encoder.config.hidden_size
    name = "clip_h" if width == 1024 else "clip_l"
    rows = max(COMFY_MIN_VOCAB, table_diff.shape[0])
    padded = torch.zeros(rows, table_diff.shape[1], dtype=table_diff.dtype)
    padded[: table_diff.shape[0]] = table_diff
    return {f"text_encoders.{name}.transformer.text_model.embeddings.token_embedding.diff": padded}


def apply_token_table_difference(*, text_encoder, table_diff, scale: float = 1.0) -> None:
    import torch

    weight = text_encoder.get_input_embeddings().weight
    if weight.shape != table_diff.shape:
        raise ValueError(f"token-table difference of shape {tuple(table_diff.shape)} for a table of shape "
                         f"{tuple(weight.shape)}: was the fine-tune made on another base model?")
    with torch.no_grad():
        weight.add_(table_diff.to(weight.dtype), alpha=scale)
