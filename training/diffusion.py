"""The diffusion core every trainer shares: latents, targets, the training scheduler, the trained modules.

DP-LDM, the federated clients, the DP-TI trainers, the split client and the membership audit all
encode images, draw (t, noise) and score a prediction the same way; this module is that one way.
"""

from __future__ import annotations

# The conditioning rows' parameter name, in the container `training_modules` builds.
TEXT_ROWS_PARAM = "text_encoder.embeddings.token_embedding.rows"


def encode_latents(*, vae, pixels):
    """Scaled VAE latent means, in the standard memory layout.

    The posterior mean is a channel slice of the encoder output; its strides make torch treat it as
    channels-last, and torch 2.13's CPU GroupNorm backward for channels-last input crashes (segfault)
    on such a slice. A plain contiguous copy avoids that kernel.
    """
    import torch

    latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    return latents.contiguous(memory_format=torch.contiguous_format)


def denoising_target(*, scheduler, z0, noise, t):
    """What the UNet is trained to predict: the noise (ε-prediction) or the velocity (v-prediction)."""
    return noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(z0, noise, t)


def training_scheduler(pipeline):
    """The DDPM scheduler training draws (t, noise) from, with the pipeline's own schedule."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipeline.scheduler.config)


def attach_conditioning_rows(*, pipeline, words):
    """Make the token-table rows of `words` (public, single-token) trainable; the rest stays frozen."""
    from ..models.embedding_rows import attach_trainable_rows, single_token_ids

    pipeline.text_encoder.requires_grad_(False)
    rows = attach_trainable_rows(text_encoder=pipeline.text_encoder,
                                 row_ids=single_token_ids(tokenizer=pipeline.tokenizer, words=words))
    rows.rows.requires_grad_(True)
    return rows


def training_modules(pipeline):
    """Everything a run may train, in one container: the UNet set and the text encoder's rows. Its
    parameter names ("unet.<param>", "text_encoder.<param>") are the names runs save and exchange."""
    import torch

    return torch.nn.ModuleDict({"unet": pipeline.unet, "text_encoder": pipeline.text_encoder})


def trained_parameters(*, pipeline) -> dict:
    """The trainable set's current values, by name (LoRA adapters included), for a pipeline whose set
    has been chosen (`select_trainable`, conditioning rows attached)."""
    return {name: p.detach().cpu().clone() for name, p in training_modules(pipeline).named_parameters()
            if p.requires_grad}


def diffusion_losses(*, pipeline, dataset, indices, timesteps, noise_draws: int = 2, batch_size: int = 32,
                     seed: int = 0):
    """Per-example denoising loss (numpy, one per index) under identical timesteps and noise draws, so
    that only the image and caption differ between examples."""
    import numpy as np
    import torch

    scheduler = training_scheduler(pipeline)
    if max(timesteps) >= scheduler.config.num_train_timesteps:
        raise ValueError(f"timesteps must be below {scheduler.config.num_train_timesteps}.")
    unet, vae = pipeline.unet, pipeline.vae
    device = unet.device
    out = []
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            items = [dataset[int(i)] for i in indices[start:start + batch_size]]
            pixels = torch.stack([item["pixel_values"] for item in items]).to(device, vae.dtype)
            z0 = encode_latents(vae=vae, pixels=pixels)
            ids = pipeline.tokenizer([item["caption"] for item in items], padding="max_length",
                                     max_length=pipeline.tokenizer.model_max_length, truncation=True,
                                     return_tensors="pt").input_ids.to(device)
            context = pipeline.text_encoder(ids)[0]
            generator = torch.Generator().manual_seed(seed)
            total = torch.zeros(len(items), dtype=torch.float64)
            for t in timesteps:
                for _ in range(noise_draws):
                    noise = torch.randn(z0.shape[1:], generator=generator).to(device, z0.dtype).expand_as(z0)
                    steps = torch.full((len(items),), t, dtype=torch.long, device=device)
                    zt = scheduler.add_noise(z0, noise, steps)
                    target = denoising_target(scheduler=scheduler, z0=z0, noise=noise, t=steps)
                    prediction = unet(zt, steps, context).sample
                    total += (prediction - target).pow(2).mean(dim=(1, 2, 3)).double().cpu()
            out.append((total / (len(timesteps) * noise_draws)).numpy())
    return np.concatenate(out) if out else np.zeros(0)
