"""Split-learning ControlNet (arXiv 2409.08503), client side: what leaves the client, per sample.

The client holds the images, hints and prompts and only frozen parts (VAE encoder, noising, and in
`paper` mode the UNet's `conv_in`); the server trains the ControlNet from what is sent and sends
nothing back during training. Per sample and training step the client sends (DESIGN.md 3.1):

- `paper` (the reference design; it leaks): `conv_in(z_t)`, `h`, `t` and the label ε. `conv_in` is
  public and linear, so the server recovers z_t, then z_0 = (z_t - sqrt(1 - ab_t) ε) / sqrt(ab_t)
  exactly, and the image with the public VAE decoder;
- `hardened` (the default): z_t itself (same information as conv_in(z_t), far fewer bytes), `h`,
  `t` drawn only where the signal-to-noise ratio ab_t / (1 - ab_t) is at most `snr_bound`, and the
  label ε + σ_label·n (the MSE gradient stays unbiased in expectation); the hint latent may get
  Gaussian noise σ_hint before it is mixed into `h`.

h = fp16(symsigmoid(hint_latent + z_t)), symsigmoid(x) = |x|·(2·sigmoid(x) - 1): the privacy
activation. Every random draw is fixed by (seed, sample id, step), so a batch re-sent after a
reconnect shows the server nothing new.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..privacy.attacks import signal_to_noise, symsigmoid

MODES = ("hardened", "paper")


@dataclass(frozen=True)
class SplitConfig:
    mode: str = "hardened"
    # k: hardened mode draws t only where ab_t / (1 - ab_t) <= k. Each message tells the server z_0
    # up to an error of variance 1 / (SNR_t (1 + 1/σ_label²)) per latent value, and E linked epochs
    # divide it by E: 0.01 keeps ten linked epochs at an error of about 2 latent standard deviations.
    snr_bound: float = 0.01
    sigma_label: float = 1.0  # hardened: the label is ε + σ_label·n
    sigma_hint: float = 0.0  # hardened: Gaussian noise on the hint latent (a dial: hint privacy vs hint-following)
    # How many different noisings (t, ε, label and hint noise) one image ever gets: epoch e reuses draw
    # e mod M, so a server linking every message of a run learns no more than from M of them, however
    # long the run. None: a fresh draw every epoch (paper mode's behaviour). Measured (RESULTS.md): at
    # k = 0.01 one draw keeps the public-model attack within 1 dB of the mean-image guess, two do not.
    draws_per_image: int | None = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {MODES}.")
        if not self.snr_bound > 0:
            raise ValueError(f"snr_bound={self.snr_bound} must be positive.")
        if self.sigma_label < 0 or self.sigma_hint < 0:
            raise ValueError("sigma_label and sigma_hint must not be negative.")
        if self.draws_per_image is not None and (isinstance(self.draws_per_image, bool)
                                                 or not isinstance(self.draws_per_image, int)
                                                 or self.draws_per_image < 1):
            raise ValueError(f"draws_per_image={self.draws_per_image!r} must be a whole number >= 1, or None "
                             "for a fresh draw every epoch.")

    def draw_index(self, step: int) -> int:
        """Which of an image's draws its message at `step` (the epoch) uses."""
        if self.mode == "paper" or self.draws_per_image is None:
            return step
        return step % self.draws_per_image


def allowed_timesteps(*, scheduler, config: SplitConfig) -> torch.Tensor:
    """Timesteps the client may draw: all of them in paper mode, those with SNR <= k when hardened."""
    alphas = scheduler.alphas_cumprod.double()
    if config.mode == "paper":
        return torch.arange(len(alphas))
    allowed = (signal_to_noise(alphas) <= config.snr_bound).nonzero().flatten()
    if len(allowed) == 0:
        raise ValueError(f"no timestep has a signal-to-noise ratio at or below snr_bound={config.snr_bound}; "
                         f"raise it (the noisiest timestep's is {float(signal_to_noise(alphas)[-1]):.3g}).")
    return allowed


def _draw_generator(*, seed: int, sample_id: int, step: int) -> torch.Generator:
    digest = hashlib.sha256(f"privdiff-split/{seed}/{sample_id}/{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def client_latents(*, pipeline, pixels: torch.Tensor, hint_pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen VAE encoder's latents of images and hints ([B, 3, H, W] in [-1, 1]; the hint as
    `2c - 1`). They never change, so a client may compute them once and reuse them every epoch."""
    from .dp_ldm import encode_latents

    vae = pipeline.vae
    with torch.no_grad():
        return (encode_latents(vae=vae, pixels=pixels.to(vae.device, vae.dtype)).float().cpu(),
                encode_latents(vae=vae, pixels=hint_pixels.to(vae.device, vae.dtype)).float().cpu())


def client_payload(*, pipeline, sample_ids, step: int, config: SplitConfig, pixels: torch.Tensor | None = None,
                   hint_pixels: torch.Tensor | None = None, latents: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> dict[str, np.ndarray]:
    """What the client sends for one batch: numpy arrays ready for the wire.

    Give `pixels` and `hint_pixels` ([B, 3, H, W] in [-1, 1], the hint as `2c - 1`), or their
    `latents` from `client_latents`; `sample_ids` are the samples' stable ids (the draws depend on
    them, not on the batch's order).
    """
    if config.mode == "paper":
        warnings.warn("split mode 'paper' is the reference design: the server can reconstruct every private "
                      "image exactly from what it receives. Use mode='hardened' for private data.", stacklevel=2)
    if (latents is None) == (pixels is None or hint_pixels is None):
        raise ValueError("give either pixels and hint_pixels, or latents=(image latents, hint latents).")
    z0, hint_latent = latents if latents is not None else client_latents(pipeline=pipeline, pixels=pixels,
                                                                         hint_pixels=hint_pixels)
    unet, scheduler = pipeline.unet, pipeline.scheduler
    allowed = allowed_timesteps(scheduler=scheduler, config=config)
    with torch.no_grad():
        z0, hint_latent = z0.float().cpu(), hint_latent.float().cpu()
        draws = [_draw_generator(seed=config.seed, sample_id=int(i), step=config.draw_index(step)) for i in sample_ids]
        t = torch.stack([allowed[torch.randint(len(allowed), (1,), generator=g)][0] for g in draws])
        eps = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in draws])
        alphas = scheduler.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
        z_t = alphas.sqrt() * z0 + (1 - alphas).sqrt() * eps
        if config.mode == "hardened":
            hint_noise = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in draws])
            label_noise = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in draws])
            hint_latent = hint_latent + config.sigma_hint * hint_noise
            label = eps + config.sigma_label * label_noise
        else:
            label = eps
        h = symsigmoid(hint_latent + z_t).half()
        payload = {"h": h, "t": t.long(), "label": label.half()}
        if config.mode == "paper":
            payload["conv_in_z_t"] = unet.conv_in(z_t.to(unet.device, unet.dtype)).half().cpu()
        else:
            payload["z_t"] = z_t.half()
    return {name: value.cpu().numpy() for name, value in payload.items()}


@dataclass(frozen=True)
class ReconstructionReport:
    """What the server's attacks recover from one image set's traffic. PSNR (dB) and SSIM are against
    the VAE's own reconstructions D(E(x)); `image_*` is the best attack's, `attacks` every attack's."""

    image_psnr: float  # the best attack on all epochs linked
    image_ssim: float
    image_latent_error: float  # MSE of the linked z_0 estimate / the latents' variance (1.0 = mean guess)
    mean_image_psnr: float  # guessing the dataset's mean image: the floor an attack must beat
    mean_image_ssim: float
    image_psnr_by_epochs: tuple[float, ...]  # the linear + denoiser attacks on the first 1, 2, ... epochs
    attacks: dict  # attack name -> {"psnr": ..., "ssim": ...}
    hint_psnr: float  # the recovered hint latent, decoded, against D(E(hint))
    hint_ssim: float
    hint_mean_psnr: float
    epochs: int

    @property
    def image_psnr_first_epoch(self) -> float:
        return self.image_psnr_by_epochs[0]

    @property
    def gain_over_mean_guess(self) -> float:
        return self.image_psnr - self.mean_image_psnr

    def lines(self) -> list[str]:
        """Human-readable summary."""
        rows = [f"images, {self.epochs} epochs linked: {self.image_psnr:.1f} dB PSNR, SSIM {self.image_ssim:.3f} "
                f"(mean-image guess {self.mean_image_psnr:.1f} dB, SSIM {self.mean_image_ssim:.3f}); latent error "
                f"{self.image_latent_error:.3f} of the mean guess's"]
        rows += [f"  attack {name}: {v['psnr']:.1f} dB, SSIM {v['ssim']:.3f}" for name, v in self.attacks.items()]
        rows.append("  by epochs linked: " + ", ".join(f"{p:.1f}" for p in self.image_psnr_by_epochs) + " dB")
        rows.append(f"hints: {self.hint_psnr:.1f} dB PSNR, SSIM {self.hint_ssim:.3f} (mean guess {self.hint_mean_psnr:.1f} dB)")
        return rows


def _linked_estimate(*, pipeline, payloads: list[dict], sigma_label: float):
    """Each message gives two independent estimates of z_0: z_t / sqrt(ab_t) (error variance
    1/SNR_t) and the label's (σ²/SNR_t; exact when σ = 0); all of them are combined with
    inverse-variance weights. Returns (linked z_0, its error variance per image, hint latent)."""
    from ..privacy.attacks import estimate_z0, invert_conv_in, inverse_symsigmoid, link_epochs, signal_to_noise

    alphas = pipeline.scheduler.alphas_cumprod
    estimates, weights, hints = [], [], []
    distinct = []
    for payload in payloads:  # a message repeated in a later epoch (draws_per_image) adds nothing
        if not any(all(np.array_equal(payload[k], seen[k]) for k in payload) for seen in distinct):
            distinct.append(payload)
    for payload in distinct:
        t = torch.as_tensor(payload["t"]).long()
        if "z_t" in payload:
            z_t = torch.as_tensor(payload["z_t"]).double()
        else:
            z_t = invert_conv_in(conv_in=pipeline.unet.conv_in, output=torch.as_tensor(payload["conv_in_z_t"]))
        hints.append(inverse_symsigmoid(torch.as_tensor(payload["h"]).double()) - z_t)
        snr = signal_to_noise(alphas.double()[t])
        from_label = estimate_z0(z_t=z_t, label=torch.as_tensor(payload["label"]), t=t, alphas_cumprod=alphas)
        if sigma_label == 0:
            estimates.append(from_label)  # exact: nothing else can add to it
            weights.append(torch.full_like(snr, 1e12))
            continue
        estimates += [from_label, z_t / alphas.double()[t].sqrt().view(-1, 1, 1, 1)]
        weights += [snr / sigma_label ** 2, snr]
    linked = link_epochs(estimates=estimates, weights=weights)
    hint_latent = torch.stack(hints).mean(0)  # z_t is known exactly, so hint estimates only differ by quantisation
    return linked, 1.0 / sum(weights), hint_latent


def _shrink(linked: torch.Tensor, error_variance: torch.Tensor) -> torch.Tensor:
    """The empirical-Bayes attacker: shrink each noisy estimate towards the set's mean by the signal's
    share of its variance (the linear MMSE estimate), never worse than the mean guess."""
    mean = linked.mean(0, keepdim=True)
    signal_variance = (linked.var(0, keepdim=True) - error_variance.mean()).clamp(min=0)
    v = error_variance.view(-1, 1, 1, 1)
    return mean + signal_variance / (signal_variance + v) * (linked - mean)


def reconstruct_from_traffic(*, pipeline, payloads: list[dict], pixels: torch.Tensor, hint_pixels: torch.Tensor,
                             sigma_label: float = 0.0, sigma_hint: float = 0.0,
                             optimisation_steps: int = 100) -> ReconstructionReport:
    """Run the server-side attacks on the messages one image set produced over several epochs.

    `payloads[e]` is what the server received for the same samples (same order) in epoch e. The
    attacker knows the public weights and the design, including the label- and hint-noise scales
    `sigma_label` (0 in paper mode) and `sigma_hint`. Attacks on the linked estimate: `linear` (inverse-variance mean, shrunk
    towards the set's mean), `denoiser` (the public UNet's posterior mean, DESIGN.md 5) and, when
    `optimisation_steps` > 0, `tv-inversion` (an image optimised through the public VAE encoder under
    a total-variation prior, at two prior weights) and `hint-regions` (the estimate averaged over the
    flat regions the recovered hint outlines). The best of them, judged against the truth
    (the attacker's most favourable choice), is the headline.
    """
    from ..privacy.attacks import (denoiser_estimate, hint_regions, latent_error, mean_image_psnr, psnr,
                                   region_average, ssim, total_variation_inversion)
    from .dp_ldm import encode_latents

    vae, unet, alphas = pipeline.vae, pipeline.unet, pipeline.scheduler.alphas_cumprod

    def decode(latents):
        with torch.no_grad():
            images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
        return (images.float().clamp(-1, 1) + 1) / 2

    with torch.no_grad():
        true_latents = encode_latents(vae=vae, pixels=pixels.to(vae.dtype)).double()
        reference = decode(true_latents)
        hint_reference = decode(encode_latents(vae=vae, pixels=hint_pixels.to(vae.dtype)))
    if getattr(pipeline, "text_encoder", None) is not None:
        with torch.no_grad():  # the public model's unconditional context: the server has it too
            context = pipeline.encode_prompt([""], unet.device, 1, False)[0].expand(len(pixels), -1, -1)
    else:
        context = torch.zeros(len(pixels), 1, unet.config.cross_attention_dim)

    def linear_and_denoiser(epochs: int):
        linked, variance, hint_latent = _linked_estimate(pipeline=pipeline, payloads=payloads[:epochs],
                                                         sigma_label=sigma_label)
        if sigma_label == 0:
            return {"linear": linked}, linked, variance, hint_latent
        # The hint (recovered exactly when σ_hint = 0) outlines flat regions: pooling the estimate over
        # each region divides its noise by the region's area.
        regions = hint_regions(hint_images=decode(hint_latent), latent_size=tuple(linked.shape[-2:]))
        return ({"linear": _shrink(linked, variance),
                 "denoiser": denoiser_estimate(unet=unet, z0_estimate=linked, error_variance=variance,
                                               alphas_cumprod=alphas, context=context),
                 "hint-regions": region_average(estimate=_shrink(linked, variance), regions=regions)},
                linked, variance, hint_latent)

    by_epochs = []
    for epochs in range(1, len(payloads) + 1):  # the last pass is the whole run's, kept below
        latents, linked, variance, hint_latent = linear_and_denoiser(epochs)
        images = {name: decode(z) for name, z in latents.items()}
        by_epochs.append(max(psnr(estimate=x, reference=reference) for x in images.values()))
    if sigma_label > 0 and optimisation_steps > 0:
        def encode(x):
            return encode_latents(vae=vae, pixels=(x * 2 - 1).to(vae.dtype)).float()

        start = images["linear"]
        for weight in (1.0, 10.0):
            with torch.enable_grad():
                images[f"tv-inversion({weight:g})"] = total_variation_inversion(
                    encode=encode, z0_estimate=linked, error_variance=variance, start=start,
                    tv_weight=weight / float(variance.mean()), steps=optimisation_steps)
    attacks = {name: {"psnr": psnr(estimate=x, reference=reference), "ssim": ssim(estimate=x, reference=reference)}
               for name, x in images.items()}
    best = max(attacks, key=lambda name: attacks[name]["psnr"])
    mean_guess = reference.double().mean(0, keepdim=True).expand_as(reference)
    hint_images = decode(hint_latent)
    if sigma_hint > 0:  # the client's hint noise is known: shrink towards the hints' mean, as for images
        distinct = len({payload["h"].tobytes() for payload in payloads})
        shrunk = decode(_shrink(hint_latent, torch.full((len(hint_latent),), sigma_hint ** 2 / distinct)))
        if psnr(estimate=shrunk, reference=hint_reference) > psnr(estimate=hint_images, reference=hint_reference):
            hint_images = shrunk
    return ReconstructionReport(
        image_psnr=attacks[best]["psnr"], image_ssim=max(v["ssim"] for v in attacks.values()),
        image_latent_error=min(latent_error(estimate=z, reference=true_latents) for z in latents.values()),
        mean_image_psnr=mean_image_psnr(reference=reference),
        mean_image_ssim=ssim(estimate=mean_guess, reference=reference),
        image_psnr_by_epochs=tuple(by_epochs), attacks=attacks,
        hint_psnr=psnr(estimate=hint_images, reference=hint_reference),
        hint_ssim=ssim(estimate=hint_images, reference=hint_reference),
        hint_mean_psnr=mean_image_psnr(reference=hint_reference),
        epochs=len(payloads),
    )


class SplitTrainer:
    """The server's side of one training job: a frozen UNet and a trainable ControlNet initialised
    from it, whose hint input is the 4-channel latent-resolution `h` (no down-sampling in its hint
    embedding). It learns from client payloads only; its loss stays on the server and nothing it
    computes is ever sent to a client during training.
    """

    def __init__(self, *, unet, learning_rate: float = 1e-5, seed: int = 0):
        from diffusers import ControlNetModel

        torch.manual_seed(seed)
        self.unet = unet.requires_grad_(False).eval()
        self.controlnet = ControlNetModel.from_unet(unet, conditioning_channels=unet.config.in_channels,
                                                    conditioning_embedding_out_channels=(16,))
        if self.controlnet.dtype != unet.dtype:
            self.controlnet = self.controlnet.to(dtype=unet.dtype)
        self.controlnet = self.controlnet.to(device=unet.device).train()
        self.optimizer = torch.optim.AdamW(self.controlnet.parameters(), lr=learning_rate, weight_decay=0.0)
        self.steps = 0

    def _context(self, batch: int) -> torch.Tensor:
        # The server never sees a prompt: an all-zero text context, as in the reference design.
        return torch.zeros(batch, 1, self.unet.config.cross_attention_dim, dtype=self.unet.dtype,
                           device=self.unet.device)

    def train_on(self, payload: dict) -> float:
        """One AdamW step of the ControlNet on one received batch; returns the loss (server-side only)."""
        device, dtype = self.unet.device, self.unet.dtype

        def tensor(name):
            return torch.from_numpy(np.array(payload[name])).to(device)  # a copy: received buffers are read-only

        t, h, label = tensor("t").long(), tensor("h").to(dtype), tensor("label").float()
        paper = "conv_in_z_t" in payload
        sample = tensor("conv_in_z_t" if paper else "z_t").to(dtype)
        context = self._context(len(t))
        # Paper mode: the client already applied conv_in, so both networks start after it.
        swapped = [(m, m.conv_in) for m in (self.unet, self.controlnet)] if paper else []
        for module, _ in swapped:
            module.conv_in = torch.nn.Identity()
        try:
            down, mid = self.controlnet(sample, t, encoder_hidden_states=context, controlnet_cond=h,
                                        return_dict=False)
            prediction = self.unet(sample, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                                   mid_block_additional_residual=mid).sample
        finally:
            for module, conv_in in swapped:
                module.conv_in = conv_in
        loss = (prediction.float() - label).pow(2).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return float(loss.detach())


SPLIT_CONFIG_KEY = "privdiff_split_controlnet"  # in the saved ControlNet's config.json


def mark_split_controlnet(controlnet) -> None:
    """Write into the config how its hint input is formed, so loaders can tell a split ControlNet
    (hint = symsigmoid(E(2c - 1) + z_t), recomputed every step) from a stock one."""
    controlnet.register_to_config(**{SPLIT_CONFIG_KEY: {"version": 1, "hint_input": "symsigmoid(E(2c-1) + z_t)",
                                                        "context": "zeros"}})


def save_split_controlnet(*, controlnet, out, record=None) -> None:
    """Save in diffusers format, marked as a split ControlNet."""
    mark_split_controlnet(controlnet)
    controlnet.save_pretrained(str(out))


def split_control_residuals(*, controlnet, model_input, hint_latent, timestep, scale: float = 1.0):
    """A split ControlNet's residuals for the UNet's skip connections (down) and middle block at one
    denoising step: its hint input h = fp16(symsigmoid(hint latent + z_t)) is formed from the current
    latents, as in training, and it sees the zero text context it was trained with."""
    dtype = controlnet.dtype
    h = symsigmoid(hint_latent.to(model_input) + model_input).half().to(dtype)
    context = torch.zeros(len(model_input), 1, controlnet.config.cross_attention_dim, device=model_input.device,
                          dtype=dtype)
    return controlnet(model_input.to(dtype), timestep, encoder_hidden_states=context, controlnet_cond=h,
                      conditioning_scale=scale, return_dict=False)


def _split_pipeline_class():
    from diffusers import StableDiffusionControlNetPipeline

    class SplitControlNetPipeline(StableDiffusionControlNetPipeline):
        """Text-to-image with a split-learning ControlNet: its hint input h = fp16(symsigmoid(hint
        latent + z_t)) mixes the hint with the current latents, so it is recomputed at every step;
        the ControlNet sees the zero text context it was trained with, the UNet the prompt."""

        @torch.no_grad()
        def __call__(self, prompt, image, *, num_inference_steps: int = 30, guidance_scale: float = 5.0,
                     controlnet_conditioning_scale: float = 1.0, generator=None, output_type: str = "np"):
            from .dp_ldm import encode_latents

            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            device, dtype = self.unet.device, self.unet.dtype
            hints = self.image_processor.preprocess(image).to(device, self.vae.dtype)  # [-1, 1] = 2c - 1
            if hints.shape[0] != len(prompts):
                raise ValueError(f"{hints.shape[0]} hint images for {len(prompts)} prompts; give one per prompt.")
            hint_latent = encode_latents(vae=self.vae, pixels=hints).to(dtype)
            embeds, negative = self.encode_prompt(prompts, device, 1, guidance_scale > 1)
            text = torch.cat([negative, embeds]) if guidance_scale > 1 else embeds
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            latents = self.prepare_latents(len(prompts), self.unet.config.in_channels, hints.shape[2], hints.shape[3],
                                           dtype, device, generator)
            for t in self.progress_bar(self.scheduler.timesteps):
                model_input = self.scheduler.scale_model_input(latents, t)
                down, mid = split_control_residuals(controlnet=self.controlnet, model_input=model_input,
                                                    hint_latent=hint_latent, timestep=t,
                                                    scale=controlnet_conditioning_scale)
                if guidance_scale > 1:
                    down, mid = [torch.cat([d, d]) for d in down], torch.cat([mid, mid])
                    model_input = torch.cat([model_input, model_input])
                noise = self.unet(model_input, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                                  mid_block_additional_residual=mid).sample
                if guidance_scale > 1:
                    uncond, cond = noise.chunk(2)
                    noise = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(noise, t, latents).prev_sample
            from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

            images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
            return StableDiffusionPipelineOutput(images=self.image_processor.postprocess(images, output_type=output_type),
                                                 nsfw_content_detected=None)

    return SplitControlNetPipeline


def split_controlnet_pipeline(*, base, controlnet):
    """A SplitControlNetPipeline from a base text-to-image pipeline and a trained split ControlNet."""
    cls = _split_pipeline_class()
    return cls(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
               controlnet=controlnet, scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)


DOWNLOAD_CHUNK = 64 * 2**20  # values per chunk of a downloaded ControlNet


class SplitJob:
    """The server's training job: answers clients' requests (a SplitServer handler).

    `batch` trains one step unless its `batch_id` was already applied (a batch re-sent after a
    reconnect is acknowledged, not trained twice); `download` returns the ControlNet's weights, the
    only message that carries tensors back, sent only when a client asks at the end.
    """

    def __init__(self, *, trainer: SplitTrainer):
        self.trainer = trainer
        self.applied: set[str] = set()
        self.losses: list[float] = []  # server-side only; never sent

    def save_checkpoint(self, folder) -> None:
        """ControlNet, optimizer, step count and applied batch ids (safetensors + JSON, no pickle),
        written atomically: a server killed at any moment restarts from the last complete one."""
        from pathlib import Path

        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"controlnet.{k}": v.detach().cpu().contiguous() for k, v in self.trainer.controlnet.state_dict().items()}
        state = self.trainer.optimizer.state_dict()
        for index, values in state["state"].items():
            for key, value in values.items():
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous().reshape(value.shape)
        meta = {"steps": self.trainer.steps, "applied": sorted(self.applied), "losses": self.losses,
                "param_groups": state["param_groups"],
                "note": "server-side training state; the losses were computed on client data"}
        save_file(tensors, str(folder / "job.safetensors.tmp"))
        (folder / "job.json.tmp").write_text(json.dumps(meta))
        (folder / "job.safetensors.tmp").replace(folder / "job.safetensors")
        (folder / "job.json.tmp").replace(folder / "job.json")

    def load_checkpoint(self, folder) -> None:
        from pathlib import Path

        from safetensors.torch import load_file

        folder = Path(folder)
        tensors = load_file(str(folder / "job.safetensors"))
        meta = json.loads((folder / "job.json").read_text())
        self.trainer.controlnet.load_state_dict({k[len("controlnet."):]: v for k, v in tensors.items()
                                                 if k.startswith("controlnet.")})
        optimizer_state = {"state": {}, "param_groups": meta["param_groups"]}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                optimizer_state["state"].setdefault(int(index), {})[name] = value
        self.trainer.optimizer.load_state_dict(optimizer_state)
        self.trainer.steps, self.applied, self.losses = meta["steps"], set(meta["applied"]), list(meta["losses"])

    def __call__(self, client: str, message):
        from ..transport.codec import Message

        if message.kind == "batch":
            batch_id = f"{client}/{message.fields.get('batch_id')}"
            duplicate = batch_id in self.applied
            if not duplicate:
                self.losses.append(self.trainer.train_on(dict(message.tensors)))
                self.applied.add(batch_id)
            return Message(kind="ack", fields={"steps": self.trainer.steps, "duplicate": duplicate})
        if message.kind == "download":
            state = self.trainer.controlnet.state_dict()
            # One flat float32 vector in chunks of at most 64M values (256 MB, within the codec's
            # per-tensor limit), and an index of names and shapes: a few frames whatever the model.
            flat = torch.cat([v.detach().float().cpu().reshape(-1) for v in state.values()])
            chunks = {f"chunk_{i}": c.numpy() for i, c in enumerate(torch.split(flat, DOWNLOAD_CHUNK))}
            config = {k: v for k, v in self.trainer.controlnet.config.items() if not k.startswith("_")}
            return Message(kind="weights", tensors=chunks, fields={
                "config": json.loads(json.dumps(config, default=list)), "steps": self.trainer.steps,
                "index": [[name, list(value.shape)] for name, value in state.items()]})
        return Message(kind="bye")


def train_split_client(*, client, pipeline, dataset, epochs: int, batch_size: int, config: SplitConfig,
                       progress=None, cache_latents: bool = True, latent_cache: dict | None = None,
                       should_stop=None) -> int:
    """Send every batch of `dataset` for `epochs` epochs through `client`; returns the server's step count.

    Batches are cut in a fixed order, so after a failure the same call re-sends exactly the same
    messages and the server skips those it already applied. With `cache_latents` the client runs
    its VAE encoder once per image (two thirds of its work per batch) and keeps the latents in memory
    (privdiff-tiny: 0.5 KB per image and hint; SD1.5 at 512 px: 64 KB). Pass your own `latent_cache`
    (sample index -> (image latent, hint latent)) to keep it across calls, e.g. when a call is retried.
    `should_stop()` is asked before every batch; when it holds, the call returns early."""
    from ..transport.codec import Message

    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs={epochs} and batch_size={batch_size} must be at least 1.")
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {} if latent_cache is None else latent_cache
    steps = 0
    for epoch in range(epochs):
        for start in range(0, len(dataset), batch_size):
            if should_stop is not None and should_stop():
                return steps
            ids = list(range(start, min(start + batch_size, len(dataset))))
            missing = [i for i in ids if i not in cache]
            if missing:
                items = [dataset[i] for i in missing]
                z0, hint_latent = client_latents(pipeline=pipeline,
                                                 pixels=torch.stack([it["pixel_values"] for it in items]),
                                                 hint_pixels=torch.stack([it["hint"] for it in items]) * 2 - 1)
                fresh = {i: (z0[k], hint_latent[k]) for k, i in enumerate(missing)}
                if cache_latents:
                    cache.update(fresh)
            else:
                fresh = {}
            pairs = [cache[i] if i in cache else fresh[i] for i in ids]
            latents = (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
            payload = client_payload(pipeline=pipeline, latents=latents, sample_ids=ids, step=epoch, config=config)
            reply = client.request(Message(kind="batch", fields={"batch_id": f"{epoch}/{start}"}, tensors=payload))
            steps = reply.fields["steps"]
            if progress is not None:
                progress(epoch, start, steps)
    return steps


def download_controlnet(*, client):
    """Ask the server for the trained ControlNet (the explicit end-of-job request)."""
    from diffusers import ControlNetModel

    from ..transport.codec import Message

    reply = client.request(Message(kind="download"))
    flat = torch.cat([torch.from_numpy(np.array(reply.tensors[f"chunk_{i}"])) for i in range(len(reply.tensors))])
    state, offset = {}, 0
    for name, shape in reply.fields["index"]:
        size = int(np.prod(shape))
        state[name] = flat[offset:offset + size].reshape(shape)
        offset += size
    if offset != flat.numel():
        raise ValueError(f"the downloaded weights hold {flat.numel()} values; their index describes {offset}.")
    controlnet = ControlNetModel.from_config(reply.fields["config"])
    controlnet.load_state_dict(state)
    return controlnet


@dataclass
class LoopbackRun:
    """What `run_loopback_job` returns: the server's job, the downloaded ControlNet and, when recorded,
    every batch message each client sent, as the server received it (one list per client, in order)."""

    job: "SplitJob"
    controlnet: object
    traffic: dict


def run_loopback_job(*, pipeline, datasets: dict, config: SplitConfig, epochs: int, batch_size: int, folder,
                     learning_rate: float = 1e-4, seed: int = 0, record: bool = False, progress=None,
                     download: bool = True, latent_caches: dict | None = None) -> LoopbackRun:
    """A whole split job on this machine, over the real transport: a CurveZMQ server in a thread and one
    client per entry of `datasets` (name -> dataset), one after the other; the last downloads the
    ControlNet (unless `download` is off). Keys live in `folder`/keys. With `record`, the server also
    keeps a copy of every batch it receives (what an honest-but-curious server could store), for the
    attacks. `latent_caches` (name -> latent cache) is handed to each client's `train_split_client`."""
    import copy
    import threading
    from pathlib import Path

    from ..transport.keys import create_keys
    from ..transport.peer import SplitClient, SplitServer

    folder = Path(folder)
    keys, allowed = folder / "keys", folder / "allowed-clients"
    allowed.mkdir(parents=True, exist_ok=True)
    for name in ("server", *datasets):
        if not (keys / f"{name}.key").exists():
            create_keys(folder=keys, name=name)
        if name != "server":
            (allowed / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())
    job = SplitJob(trainer=SplitTrainer(unet=copy.deepcopy(pipeline.unet), learning_rate=learning_rate, seed=seed))
    traffic: dict[str, list[dict]] = {name: [] for name in datasets}

    def handler(client, message):
        if record and message.kind == "batch" and client in traffic:
            traffic[client].append({k: np.array(v) for k, v in message.tensors.items()})
        return job(client, message)

    server = SplitServer(bind="tcp://127.0.0.1:*", server_key=keys / "server.key_secret", allowed_clients=allowed,
                         handler=handler)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, kwargs={"should_stop": stop.is_set}, daemon=True)
    thread.start()
    controlnet = None
    try:
        for index, (name, dataset) in enumerate(datasets.items()):
            client = SplitClient(connect=server.endpoint, client_key=keys / f"{name}.key_secret",
                                 server_public_key=keys / "server.key", name=name)
            try:
                train_split_client(client=client, pipeline=pipeline, dataset=dataset, epochs=epochs,
                                   batch_size=batch_size, config=config, progress=progress,
                                   latent_cache=(latent_caches or {}).get(name))
                if download and index == len(datasets) - 1:
                    controlnet = download_controlnet(client=client)
            finally:
                client.close()
    finally:
        stop.set()
        thread.join()
        server.close()
    return LoopbackRun(job=job, controlnet=controlnet, traffic=traffic)


def traffic_by_epoch(*, messages: list[dict], num_samples: int, batch_size: int) -> list[dict]:
    """Regroup one client's recorded batch messages (in the order `train_split_client` sends them)
    into one payload per epoch covering all its samples in order."""
    per_epoch = -(-num_samples // batch_size)
    if len(messages) % per_epoch:
        raise ValueError(f"{len(messages)} recorded batches are not whole epochs of {per_epoch} batches.")
    return [{name: np.concatenate([m[name] for m in messages[e:e + per_epoch]]) for name in messages[e]}
            for e in range(0, len(messages), per_epoch)]
