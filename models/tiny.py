"""Tiny, seeded Stable-Diffusion-shaped components built in code.

They have the layouts of the real families (SD 1.x, SD 2.x, SDXL) at a size that runs a whole
pipeline in well under a second on a CPU, so every loader, key map and trainer is tested on the
same structure it meets in a real checkpoint. Weights are random but fixed by the seed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

Family = Literal["sd1", "sd2", "sdxl"]
FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl")


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny model. The defaults run a 32 px pipeline step in milliseconds."""

    family: Family = "sd1"
    resolution: int = 32
    unet_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    vae_channels: tuple[int, ...] = (8, 16, 16, 16)  # four blocks: x8 down-sampling, as in SD
    text_hidden: int = 32
    # SDXL's second encoder must differ in width from the first: diffusers' single-file loader tells
    # the two apart by their position-embedding width (768 vs 1280 in the real model).
    text_hidden_2: int = 48
    text_layers: int = 2
    text_heads: int = 2
    norm_groups: int = 8

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} is not one of {FAMILIES}.")
        down = 2 ** (len(self.vae_channels) - 1) * 2 ** (len(self.unet_channels) - 1)
        if self.resolution % down:
            raise ValueError(
                f"resolution={self.resolution} must be a multiple of {down} "
                f"(VAE x{2 ** (len(self.vae_channels) - 1)} then {len(self.unet_channels)} UNet levels)."
            )
        for name in ("unet_channels", "vae_channels"):
            bad = [c for c in getattr(self, name) if c % self.norm_groups]
            if bad:
                raise ValueError(f"{name}={getattr(self, name)}: every width must be a multiple of norm_groups={self.norm_groups}.")
        if self.family == "sdxl" and self.text_hidden == self.text_hidden_2:
            raise ValueError("For sdxl, text_hidden and text_hidden_2 must differ (see TinySpec).")

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae_channels) - 1)

    @property
    def context_dim(self) -> int:
        return self.text_hidden + self.text_hidden_2 if self.family == "sdxl" else self.text_hidden


@contextmanager
def _seeded(seed: int):
    """Seed torch for one component without disturbing the caller's global RNG."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_unet(spec: TinySpec, *, seed: int = 0):
    from diffusers import UNet2DConditionModel

    levels = len(spec.unet_channels)
    kwargs = dict(
        sample_size=spec.latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=spec.unet_channels,
        layers_per_block=spec.layers_per_block,
        norm_num_groups=spec.norm_groups,
        cross_attention_dim=spec.context_dim,
    )
    if spec.family == "sdxl":
        # SDXL: no attention at the first level, several transformer layers deeper, text_time embeds.
        kwargs.update(
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
            transformer_layers_per_block=[1] + [2] * (levels - 1),
            attention_head_dim=[2] * levels,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + spec.text_hidden_2,
        )
    else:
        # SD1/SD2: attention at every level but the last, like the real 4-level UNets.
        kwargs.update(
            down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
            attention_head_dim=2 if spec.family == "sd1" else [4] * levels,
            use_linear_projection=spec.family == "sd2",
        )
    with _seeded(seed):
        return UNet2DConditionModel(**kwargs)


def tiny_vae(spec: TinySpec, *, seed: int = 0):
    from diffusers import AutoencoderKL

    n = len(spec.vae_channels)
    with _seeded(seed + 1):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=spec.vae_channels,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=spec.norm_groups,
            sample_size=spec.resolution,
            scaling_factor=0.18215 if spec.family != "sdxl" else 0.13025,
        )


def tiny_text_encoder(spec: TinySpec, tokenizer, *, seed: int = 0, second: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hidden = spec.text_hidden_2 if second else spec.text_hidden
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=tokenizer.model_max_length,
        # OpenAI CLIP (SD1, SDXL's first encoder) uses quick_gelu; OpenCLIP (SD2, SDXL's second) gelu.
        hidden_act="gelu" if (spec.family == "sd2" or second) else "quick_gelu",
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if second else CLIPTextModel
    with _seeded(seed + (3 if second else 2)):
        return cls(config)


def tiny_scheduler(spec: TinySpec):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
        prediction_type="v_prediction" if spec.family == "sd2" else "epsilon",
    )


def tiny_components(*, spec: TinySpec = TinySpec(), seed: int = 0) -> dict:
    """Every component a pipeline of `spec.family` takes, seeded, in eval mode."""
    from .tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    components = {
        "unet": tiny_unet(spec, seed=seed),
        "vae": tiny_vae(spec, seed=seed),
        "text_encoder": tiny_text_encoder(spec, tokenizer, seed=seed),
        "tokenizer": tokenizer,
        "scheduler": tiny_scheduler(spec),
    }
    if spec.family == "sdxl":
        components["tokenizer_2"] = build_clip_tokenizer()
        components["text_encoder_2"] = tiny_text_encoder(spec, components["tokenizer_2"], seed=seed, second=True)
    for module in components.values():
        if hasattr(module, "eval"):
            module.eval()
    return components


def tiny_pipeline(*, spec: TinySpec = TinySpec(), seed: int = 0, controlnet: bool = False):
    """A diffusers pipeline of tiny seeded components (ControlNet initialised from the UNet if asked)."""
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLPipeline,
    )

    components = tiny_components(spec=spec, seed=seed)
    if controlnet:
        components["controlnet"] = ControlNetModel.from_unet(
            components["unet"],
            conditioning_embedding_out_channels=(8,) * len(spec.vae_channels),
        ).eval()
    if spec.family == "sdxl":
        cls = StableDiffusionXLControlNetPipeline if controlnet else StableDiffusionXLPipeline
        return cls(**components)
    cls = StableDiffusionControlNetPipeline if controlnet else StableDiffusionPipeline
    return cls(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
