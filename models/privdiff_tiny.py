"""privdiff-tiny: the small public text-to-image model privdiff ships and pretrains itself.

64 px images, an x8 AutoencoderKL (8x8x4 latents), a 2-level UNet with cross-attention at both
levels, and a 2-layer CLIP text encoder over the code-built vocabulary. Every width is a multiple of
32 and every norm has 32 groups, because ComfyUI's own UNet and VAE classes hard-code GroupNorm(32):
with that, ComfyUI builds native MODEL/CLIP/VAE objects for it from configs alone.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent / "privdiff_tiny"
RESOLUTION = 64
TEXT_HIDDEN = 64
UNET_CHANNELS = (64, 128)
VAE_CHANNELS = (32, 64, 128, 128)  # SD's multipliers (1, 2, 4, 4) at a quarter of its base width


def untrained_components(*, seed: int = 0) -> dict:
    """privdiff-tiny's architecture with fresh (seeded) weights, ready to pretrain."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
            up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
            block_out_channels=VAE_CHANNELS,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=RESOLUTION,
        )
        unet = UNet2DConditionModel(
            sample_size=RESOLUTION // 8,
            in_channels=4,
            out_channels=4,
            block_out_channels=UNET_CHANNELS,
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * len(UNET_CHANNELS),
            up_block_types=("CrossAttnUpBlock2D",) * len(UNET_CHANNELS),
            cross_attention_dim=TEXT_HIDDEN,
            attention_head_dim=4,  # diffusers' legacy name: this is the number of heads
            norm_num_groups=32,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=TEXT_HIDDEN,
                intermediate_size=4 * TEXT_HIDDEN,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=tokenizer.model_max_length,
                hidden_act="quick_gelu",
                projection_dim=TEXT_HIDDEN,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def is_shipped() -> bool:
    return (SHIPPED_DIR / "model_index.json").is_file()


def load_privdiff_tiny(*, torch_dtype=None):
    """The shipped, pretrained privdiff-tiny as a StableDiffusionPipeline (float32 unless asked)."""
    import torch
    from diffusers import StableDiffusionPipeline

    if not is_shipped():
        raise FileNotFoundError(
            f"privdiff-tiny's weights are missing from {SHIPPED_DIR}; reinstall privdiff, or recreate them "
            "with `privdiff pretrain --out DIR` and pass --base DIR."
        )
    from ..console import quiet_loading
    from .loading import dtype_argument

    with quiet_loading():
        pipeline = StableDiffusionPipeline.from_pretrained(
            str(SHIPPED_DIR), local_files_only=True, **dtype_argument(torch_dtype or torch.float32),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
