"""Which UNet parameters a private fine-tune trains (DP-LDM trains only the attention parts).

Sets, from smallest to largest:
- `cross_attention`: the text-conditioning attention (attn2) projections;
- `attention`: self- and cross-attention (attn1, attn2) projections;
- `transformer`: whole transformer blocks (diffusers' Transformer2DModel, LDM's SpatialTransformer:
  norms, proj_in/out, attention, feed-forward), DP-LDM's own choice;
- `lora`: rank-r adapters (peft) on the self- and cross-attention projections, the UNet frozen;
- `full`: every UNet parameter.
`ablation_blocks=k` keeps only transformer blocks with index >= k, counted in forward order
(down, mid, up), as DP-LDM's ablations do.
"""

from __future__ import annotations

from dataclasses import dataclass

TRAINABLE_SETS = ("cross_attention", "attention", "transformer", "lora", "full")
_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class TrainableSet:
    name: str
    parameter_names: tuple[str, ...]
    num_trainable: int
    num_total: int
    lora_targets: tuple[str, ...] = ()  # for `lora`: the adapted Linear layers (diffusers names)
    lora_rank: int = 0

    @property
    def fraction(self) -> float:
        return self.num_trainable / self.num_total


def transformer_blocks(unet) -> list[str]:
    """Names of the UNet's transformer blocks (Transformer2DModel), in forward order."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    names = [name for name, module in unet.named_modules() if isinstance(module, Transformer2DModel)]
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(names, key=lambda n: (order[n.split(".")[0]], [int(p) for p in n.split(".") if p.isdigit()]))


def select_trainable(*, unet, trainable: str = "attention", ablation_blocks: int = 0, lora_rank: int = 4) -> TrainableSet:
    """Freeze the UNet except the chosen set (for `lora`, add adapters to it); returns what is trained."""
    if trainable not in TRAINABLE_SETS:
        raise ValueError(f"trainable={trainable!r} is not one of {', '.join(TRAINABLE_SETS)}.")
    blocks = transformer_blocks(unet)
    if not 0 <= ablation_blocks < max(len(blocks), 1):
        raise ValueError(
            f"ablation_blocks={ablation_blocks}: this UNet has {len(blocks)} transformer blocks (0..{len(blocks) - 1})."
        )
    if trainable != "full" and not blocks:
        raise ValueError(f"trainable={trainable!r} needs transformer blocks, and this UNet has none.")
    kept_blocks = blocks[ablation_blocks:]

    def wanted(name: str) -> bool:
        if trainable == "full":
            return True
        block = next((b for b in kept_blocks if name.startswith(b + ".")), None)
        if block is None:
            return False
        if trainable == "transformer":
            return True
        attention = ("attn2",) if trainable == "cross_attention" else ("attn1", "attn2")
        rest = name[len(block) + 1:]
        return any(f".{a}.{p}." in f".{rest}" for a in attention for p in _PROJECTIONS)

    if trainable == "lora":
        return _add_lora(unet=unet, kept_blocks=kept_blocks, rank=lora_rank)
    names = []
    total = trained = 0
    for name, param in unet.named_parameters():
        keep = wanted(name)
        param.requires_grad_(keep)
        total += param.numel()
        if keep:
            trained += param.numel()
            names.append(name)
    return TrainableSet(name=trainable, parameter_names=tuple(names), num_trainable=trained, num_total=total)


def _add_lora(*, unet, kept_blocks: list[str], rank: int) -> TrainableSet:
    """Freeze the UNet and add rank-`rank` LoRA adapters (alpha = rank, so scale 1) to attention."""
    if rank < 1:
        raise ValueError(f"lora_rank={rank} must be at least 1.")
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ImportError("trainable='lora' needs peft: pip install peft") from error
    targets = tuple(
        f"{block}.{rest}"
        for block in kept_blocks
        for rest, _ in unet.get_submodule(block).named_modules()
        if any(rest.endswith(f"{a}.{p}") for a in ("attn1", "attn2") for p in _PROJECTIONS)
    )
    unet.requires_grad_(False)
    # Gaussian A and zero B: the adapted model starts equal to the base model.
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets)))
    names, total, trained = [], 0, 0
    for name, param in unet.named_parameters():
        total += param.numel()
        if param.requires_grad:
            trained += param.numel()
            names.append(name)
    return TrainableSet(name="lora", parameter_names=tuple(names), num_trainable=trained, num_total=total,
                        lora_targets=targets, lora_rank=rank)
