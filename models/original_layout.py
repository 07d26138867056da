"""diffusers <-> original (CompVis/Stability "LDM") key layout.

Single-file checkpoints (`.safetensors` / `.ckpt`), ComfyUI and A1111 all use the original layout:
`model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight` where diffusers
says `down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight`. Loading goes through
diffusers' own converter (`from_single_file`); this module provides the other direction, which
diffusers does not ship as a library function: writing single files, and naming weight differences
the way ComfyUI's LoRA loader expects them. The maps are derived from the model's config, so they
hold for every size of the same layout, from privdiff-tiny to SDXL.
"""

from __future__ import annotations

import re
from pathlib import Path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {
    "sd1": {"text_encoder": "cond_stage_model.transformer."},
    "sd2": {"text_encoder": "cond_stage_model.model."},
    "sdxl": {"text_encoder": "conditioner.embedders.0.transformer.", "text_encoder_2": "conditioner.embedders.1.model."},
}
# Which text encoders use OpenCLIP's layout (fused qkv, resblocks) in the original files.
OPEN_CLIP_ENCODERS = {("sd2", "text_encoder"), ("sdxl", "text_encoder_2")}

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_head(rest: str, table: dict[str, str]) -> str:
    """Rename the leading module name of `rest` (e.g. 'conv1.weight') through `table`."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_key_map(*, config, keys) -> dict[str, str]:
    """Map each diffusers UNet parameter name to its original-layout name (without prefix).

    `config` is the UNet's config (`unet.config`); `keys` its state-dict keys. A key that has no
    place in the original layout raises, naming it.
    """
    per_level = config["layers_per_block"] if isinstance(config, dict) else config.layers_per_block
    if not isinstance(per_level, int):
        raise ValueError(f"layers_per_block={per_level!r}: the original layout needs one value for every level.")
    stride = per_level + 1
    keys = list(keys)
    up_levels_with_attention = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}

    mapping: dict[str, str] = {}
    for key in keys:
        head, _, leaf = key.rpartition(".")
        if head in _UNET_FIXED:
            mapping[key] = f"{_UNET_FIXED[head]}.{leaf}"
            continue
        if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            mapping[key] = f"input_blocks.{1 + i * stride + j}.0.{_rename_head(rest, _UNET_RESNET)}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            mapping[key] = f"input_blocks.{1 + i * stride + j}.1.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            i, rest = int(m[1]), m[2]
            mapping[key] = f"input_blocks.{(i + 1) * stride}.0.op.{rest}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            j, rest = int(m[1]), m[2]
            mapping[key] = f"middle_block.{0 if j == 0 else 2}.{_rename_head(rest, _UNET_RESNET)}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            mapping[key] = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            mapping[key] = f"output_blocks.{i * stride + j}.0.{_rename_head(rest, _UNET_RESNET)}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            mapping[key] = f"output_blocks.{i * stride + j}.1.{rest}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            i, rest = int(m[1]), m[2]
            slot = 2 if i in up_levels_with_attention else 1
            mapping[key] = f"output_blocks.{i * stride + per_level}.{slot}.conv.{rest}"
        else:
            raise ValueError(f"UNet parameter {key!r} has no place in the original (LDM) layout.")
    return mapping


def vae_to_original(state_dict: dict, *, num_levels: int) -> dict:
    """diffusers AutoencoderKL state dict -> original layout (without prefix)."""
    out = {}
    for key, value in state_dict.items():
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            # The original decoder numbers its levels from the bottom up.
            level = num_levels - 1 - int(m[1])
            new = f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            new = f"{m[1]}.mid.attn_1.{_rename_head(m[2], _VAE_ATTENTION)}"
            if value.ndim == 2:  # the original attention uses 1x1 convolutions
                value = value[:, :, None, None]
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        elif re.fullmatch(r"(encoder|decoder)\.conv_(in|out)\.(weight|bias)|(post_)?quant_conv\.(weight|bias)", key):
            new = key
        else:
            raise ValueError(f"VAE parameter {key!r} has no place in the original (LDM) layout.")
        out[new] = value
    return out


def _strip_text_model(key: str) -> str:
    # transformers >= 5.6 flattened CLIPTextModel; CLIPTextModelWithProjection still has text_model.
    return key[len("text_model."):] if key.startswith("text_model.") else key


def clip_to_original(state_dict: dict) -> dict:
    """OpenAI-CLIP text encoder (SD1, SDXL's first) -> original layout (without prefix)."""
    return {f"text_model.{_strip_text_model(k)}": v for k, v in state_dict.items() if k != "text_projection.weight"}


_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def open_clip_to_original(state_dict: dict) -> dict:
    """CLIP text encoder in OpenCLIP's original layout (SD2, SDXL's second): fused qkv, resblocks."""
    import torch

    out, qkv = {}, {}
    for key, value in state_dict.items():
        key = _strip_text_model(key)
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()  # OpenCLIP multiplies x @ P
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key):
            out[f"transformer.resblocks.{m[1]}.{_rename_head(m[2], _OPEN_CLIP_LAYER)}"] = value
        else:
            raise ValueError(f"text encoder parameter {key!r} has no place in the OpenCLIP layout.")
    for (layer, kind), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def pipeline_family(pipeline) -> str:
    """'sdxl', 'sd2' or 'sd1', read from the pipeline's components."""
    if getattr(pipeline, "text_encoder_2", None) is not None:
        return "sdxl"
    act = getattr(pipeline.text_encoder.config, "hidden_act", "quick_gelu")
    return "sd2" if act == "gelu" else "sd1"


def pipeline_to_original(pipeline) -> dict:
    """The whole pipeline (UNet, VAE, text encoders) as one original-layout state dict."""
    family = pipeline_family(pipeline)
    unet_sd = pipeline.unet.state_dict()
    names = unet_key_map(config=pipeline.unet.config, keys=unet_sd.keys())
    out = {UNET_PREFIX + names[k]: v for k, v in unet_sd.items()}
    vae = vae_to_original(pipeline.vae.state_dict(), num_levels=len(pipeline.vae.config.block_out_channels))
    out.update({VAE_PREFIX + k: v for k, v in vae.items()})
    for attr, prefix in TEXT_PREFIXES[family].items():
        sd = getattr(pipeline, attr).state_dict()
        converted = open_clip_to_original(sd) if (family, attr) in OPEN_CLIP_ENCODERS else clip_to_original(sd)
        out.update({prefix + k: v for k, v in converted.items()})
    return out


def save_single_file(*, pipeline, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a pipeline as one original-layout checkpoint (`.safetensors`, or `.ckpt` for old tools)."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in pipeline_to_original(pipeline).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path), metadata=metadata or {})
    elif path.suffix == ".ckpt":
        torch.save({"state_dict": state}, path)
    else:
        raise ValueError(f"{path}: a single-file checkpoint ends in .safetensors (preferred) or .ckpt.")
    return path
