"""LoRA adapters as one standard file: kohya-style keys that diffusers and ComfyUI both load.

For each adapted UNet Linear `<name>` (diffusers naming, e.g. `down_blocks.0.attentions.0.
transformer_blocks.0.attn1.to_q`), the file holds `lora_unet_<name with _>.lora_down.weight` (A,
[r, in]), `.lora_up.weight` (B, [out, r]) and `.alpha`; the layer becomes W + (alpha / r) B A.
diffusers' `load_lora_weights` converts these keys itself, and ComfyUI's LoRA loader maps
`lora_unet_<diffusers name>` for SD1/SD2/SDXL UNets.
"""

from __future__ import annotations

LORA_PREFIX = "lora_unet_"


def lora_state_dict(*, unet, targets, adapter: str = "default") -> dict:
    """The adapters peft added to `unet` (at `targets`), under kohya keys (float32, contiguous)."""
    import torch

    out = {}
    for name in targets:
        layer = unet.get_submodule(name)
        down = layer.lora_A[adapter].weight.detach().float().contiguous()
        up = layer.lora_B[adapter].weight.detach().float().contiguous()
        rank = down.shape[0]
        key = LORA_PREFIX + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.lora_up.weight"] = up
        out[f"{key}.alpha"] = torch.tensor(float(layer.scaling[adapter] * rank))
    return out


def lora_weight_deltas(*, lora: dict, unet) -> dict:
    """{diffusers parameter name: (alpha / r) up @ down}: what the file adds to each weight."""
    names = {LORA_PREFIX + n.replace(".", "_"): n for n, _ in unet.named_modules()}
    out = {}
    for key in lora:
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key[: -len(".lora_down.weight")]
        if stem not in names:
            raise KeyError(f"{stem} names no layer of this UNet: was the LoRA made for another base model?")
        down, up = lora[key].float(), lora[f"{stem}.lora_up.weight"].float()
        alpha = float(lora.get(f"{stem}.alpha", down.shape[0]))
        out[f"{names[stem]}.weight"] = (alpha / down.shape[0]) * (up @ down)
    return out
