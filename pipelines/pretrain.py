"""`privdiff pretrain`: train privdiff-tiny from scratch on public procedural shapes.

Two stages, as latent diffusion models are built: an AutoencoderKL (first on 32 px crops, which
teach the same local reconstruction at a quarter of the cost, then at full 64 px), then the UNet and
the text encoder jointly on the frozen autoencoder's latents, with min-SNR loss weighting, caption
dropout (for classifier-free guidance) and an EMA of the weights, which is what gets saved. Only
public data is involved, so losses and samples are ordinary outputs here.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class PretrainConfig:
    seed: int = 0
    num_images: int = 16_000
    vae_crop_steps: int = 1_200
    vae_full_steps: int = 200
    vae_batch_size: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    unet_steps: int = 4_000
    unet_batch_size: int = 32
    unet_lr: float = 5e-4
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    warmup_steps: int = 100
    sample_steps: int = 50
    guidance_scale: float = 5.0

    def __post_init__(self) -> None:
        for name in ("num_images", "vae_batch_size", "unet_batch_size", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
        for name in ("vae_crop_steps", "vae_full_steps", "unet_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must not be negative.")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout={self.caption_dropout} must lie in [0, 1).")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must lie in [0, 1).")


@dataclass(frozen=True)
class PretrainResult:
    out: Path
    vae_losses: list[float]
    unet_losses: list[float]
    seconds: dict[str, float]
    sample_grid: Path
    loss_curve: Path


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _render_public_images(config: PretrainConfig):
    import torch

    from ..data import ShapesDataset
    from ..data.private_sets import public_shapes_config
    from ..models.privdiff_tiny import RESOLUTION

    dataset = ShapesDataset(public_shapes_config(num_items=config.num_images, seed=config.seed, resolution=RESOLUTION))
    images = torch.empty(len(dataset), 3, RESOLUTION, RESOLUTION, dtype=torch.uint8)
    captions = []
    for i in range(len(dataset)):
        item = dataset[i]
        images[i] = ((item["pixel_values"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        captions.append(item["caption"])
    return images, captions


def _to_model_range(images):
    return images.float() / 127.5 - 1.0


def _train_vae(vae, images, config: PretrainConfig, generator, bar) -> list[float]:
    import torch

    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    total = config.vae_crop_steps + config.vae_full_steps
    losses = []
    vae.train()
    for step in range(total):
        for group in optimizer.param_groups:
            group["lr"] = config.vae_lr * _lr_factor(step, total, config.warmup_steps)
        crop = step < config.vae_crop_steps
        batch_size = config.vae_batch_size if crop else max(config.vae_batch_size // 2, 1)
        index = torch.randint(len(images), (batch_size,), generator=generator)
        x = _to_model_range(images[index])
        if crop:
            top, left = torch.randint(0, x.shape[-1] // 2 + 1, (2,), generator=generator).tolist()
            x = x[:, :, top:top + x.shape[-2] // 2, left:left + x.shape[-1] // 2]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = (reconstruction - x).abs().mean() + (reconstruction - x).pow(2).mean()
        loss = loss + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix_str(f"vae loss {loss.item():.4f}")
        bar.update(1)
    vae.eval()
    return losses


def _encode_latents(vae, images, batch_size: int = 256):
    import torch

    with torch.no_grad():
        return torch.cat(
            [vae.encode(_to_model_range(images[i:i + batch_size])).latent_dist.mean for i in range(0, len(images), batch_size)]
        )


def _train_unet(components, latents, caption_index, token_table, config: PretrainConfig, generator, bar) -> list[float]:
    import torch
    from diffusers import DDPMScheduler

    unet, text_encoder = components["unet"], components["text_encoder"]
    noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    alphas_cumprod = noise_scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.unet_lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in parameters]
    empty_index = len(token_table) - 1  # the last row holds the empty caption
    losses = []
    unet.train()
    text_encoder.train()
    for step in range(config.unet_steps):
        for group in optimizer.param_groups:
            group["lr"] = config.unet_lr * _lr_factor(step, config.unet_steps, config.warmup_steps)
        index = torch.randint(len(latents), (config.unet_batch_size,), generator=generator)
        rows = caption_index[index].clone()
        dropped = torch.rand(len(rows), generator=generator) < config.caption_dropout
        rows[dropped] = empty_index
        z0 = latents[index]
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(z0),), generator=generator)
        zt = noise_scheduler.add_noise(z0, noise, t)
        context = text_encoder(token_table[rows])[0]
        prediction = unet(zt, t, context).sample
        # min-SNR weighting: the same quality in fewer steps (Hang et al., 2023).
        weight = torch.clamp(snr[t], max=config.min_snr_gamma) / snr[t]
        loss = (weight * (prediction - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for shadow, p in zip(ema, parameters):
                shadow.mul_(decay).add_(p.detach(), alpha=1 - decay)
        losses.append(loss.item())
        bar.set_postfix_str(f"unet loss {loss.item():.4f}")
        bar.update(1)
    with torch.no_grad():
        for shadow, p in zip(ema, parameters):
            p.copy_(shadow)
    unet.eval()
    text_encoder.eval()
    return losses


def pretrain(*, out: str | Path, config: PretrainConfig = PretrainConfig(), show_progress: bool = True) -> PretrainResult:
    """Pretrain privdiff-tiny and save it (fp16 safetensors, diffusers layout) into `out`."""
    import torch
    from diffusers import StableDiffusionPipeline
    from tqdm.auto import tqdm

    from ..data.images import line_chart, make_grid, save_png
    from ..models.privdiff_tiny import untrained_components
    from ..models.tokenizer import save_clip_tokenizer

    out = Path(out)
    if (out / "model_index.json").exists():
        raise FileExistsError(f"{out} already holds a model; choose an empty --out folder.")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    components = untrained_components(seed=config.seed)
    images, captions = _render_public_images(config)
    seconds["render"] = time.perf_counter() - start

    total_steps = config.vae_crop_steps + config.vae_full_steps + config.unet_steps
    with tqdm(total=total_steps, desc="privdiff pretrain", disable=not show_progress) as bar:
        t0 = time.perf_counter()
        vae_losses = _train_vae(components["vae"], images, config, generator, bar)
        seconds["vae"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        latents = _encode_latents(components["vae"], images)
        scaling = float(1.0 / latents.std())
        components["vae"].register_to_config(scaling_factor=scaling)
        latents = latents * scaling
        tokenizer = components["tokenizer"]
        unique = sorted(set(captions))
        row_of = {caption: i for i, caption in enumerate(unique)}
        token_table = tokenizer(unique + [""], padding="max_length", max_length=tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids
        caption_index = torch.tensor([row_of[c] for c in captions])
        seconds["encode"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        unet_losses = _train_unet(components, latents, caption_index, token_table, config, generator, bar)
        seconds["unet"] = time.perf_counter() - t0

    pipeline = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.to(torch.float16).save_pretrained(out, safe_serialization=True)
    save_clip_tokenizer(tokenizer, out / "tokenizer")

    # Samples from the saved (fp16-rounded) weights: what users will get.
    from ..data import ShapesDataset
    from ..data.private_sets import public_shapes_config

    reloaded = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True, torch_dtype=torch.float32)
    reloaded.set_progress_bar_config(disable=True)
    held_out = ShapesDataset(public_shapes_config(num_items=16, seed=config.seed + 10_000))
    prompts = [held_out.caption(i) for i in range(len(held_out))]
    sample_images = reloaded(
        prompts, num_inference_steps=config.sample_steps, guidance_scale=config.guidance_scale,
        generator=torch.Generator().manual_seed(config.seed), output_type="np",
    ).images
    grid = save_png(make_grid(list(sample_images), labels=prompts, columns=4, cell_size=96), out / "samples.png")
    curve = save_png(
        line_chart({"autoencoder": vae_losses, "unet + text encoder": unet_losses},
                   title="privdiff-tiny pretraining loss (public data)"),
        out / "loss.png",
    )
    seconds["total"] = time.perf_counter() - start
    record = {
        "config": asdict(config),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "vae_scaling_factor": scaling,
        "final_vae_loss": sum(vae_losses[-50:]) / max(len(vae_losses[-50:]), 1),
        "final_unet_loss": sum(unet_losses[-100:]) / max(len(unet_losses[-100:]), 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    return PretrainResult(out=out, vae_losses=vae_losses, unet_losses=unet_losses, seconds=seconds,
                          sample_grid=grid, loss_curve=curve)
