"""What an honest-but-curious split-learning server rebuilds from the traffic it recorded.

The attacker knows every public weight and the design, including the noise scales, and may link an
image's messages across epochs (the attacks below get the linkage for free: the most favourable case
for them). Scores are against the VAE's own reconstruction D(E(x)), next to guessing the mean image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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

    def figures(self) -> dict:
        """The report as plain JSON values."""
        import dataclasses

        return dataclasses.asdict(self)

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
    """Run the server-side attacks on the messages one image set produced over several epochs (see
    `_attack_traffic`); the report only."""
    return _attack_traffic(pipeline=pipeline, payloads=payloads, pixels=pixels, hint_pixels=hint_pixels,
                           sigma_label=sigma_label, sigma_hint=sigma_hint, optimisation_steps=optimisation_steps)[0]


def _decode(vae, latents) -> torch.Tensor:
    """Scaled latents as images in [0, 1]."""
    with torch.no_grad():
        images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
    return (images.float().clamp(-1, 1) + 1) / 2


def _unconditional_context(pipeline, batch: int) -> torch.Tensor:
    """The public model's unconditional context (the server has it too); zeros without a text encoder."""
    unet = pipeline.unet
    if getattr(pipeline, "text_encoder", None) is not None:
        with torch.no_grad():
            return pipeline.encode_prompt([""], unet.device, 1, False)[0].expand(batch, -1, -1)
    return torch.zeros(batch, 1, unet.config.cross_attention_dim)


def _linear_and_denoiser(*, pipeline, payloads: list[dict], sigma_label: float, context: torch.Tensor):
    """The cheap attacks on the linked estimate of `payloads`; returns (latents by attack name, linked
    z_0, its error variance, hint latent)."""
    from ..privacy.attacks import denoiser_estimate, hint_regions, region_average

    linked, variance, hint_latent = _linked_estimate(pipeline=pipeline, payloads=payloads, sigma_label=sigma_label)
    if sigma_label == 0:
        return {"linear": linked}, linked, variance, hint_latent
    # The hint (recovered exactly when σ_hint = 0) outlines flat regions: pooling the estimate over
    # each region divides its noise by the region's area.
    regions = hint_regions(hint_images=_decode(pipeline.vae, hint_latent), latent_size=tuple(linked.shape[-2:]))
    return ({"linear": _shrink(linked, variance),
             "denoiser": denoiser_estimate(unet=pipeline.unet, z0_estimate=linked, error_variance=variance,
                                           alphas_cumprod=pipeline.scheduler.alphas_cumprod, context=context),
             "hint-regions": region_average(estimate=_shrink(linked, variance), regions=regions)},
            linked, variance, hint_latent)


def _tv_inversions(*, vae, start: torch.Tensor, linked: torch.Tensor, variance: torch.Tensor,
                   optimisation_steps: int) -> dict[str, torch.Tensor]:
    """Images optimised through the public encoder from `start` under a total-variation prior, at two weights."""
    from ..privacy.attacks import total_variation_inversion
    from ..training.diffusion import encode_latents

    def encode(x):
        return encode_latents(vae=vae, pixels=(x * 2 - 1).to(vae.dtype)).float()

    images = {}
    for weight in (1.0, 10.0):
        with torch.enable_grad():
            images[f"tv-inversion({weight:g})"] = total_variation_inversion(
                encode=encode, z0_estimate=linked, error_variance=variance, start=start,
                tv_weight=weight / float(variance.mean()), steps=optimisation_steps)
    return images


def _recovered_hints(*, vae, hint_latent: torch.Tensor, payloads: list[dict], sigma_hint: float,
                     hint_reference: torch.Tensor) -> torch.Tensor:
    """The hint latent decoded, or its shrunk version where the client's hint noise makes that closer."""
    from ..privacy.attacks import psnr

    hint_images = _decode(vae, hint_latent)
    if sigma_hint > 0:  # the client's hint noise is known: shrink towards the hints' mean, as for images
        distinct = len({payload["h"].tobytes() for payload in payloads})
        shrunk = _decode(vae, _shrink(hint_latent, torch.full((len(hint_latent),), sigma_hint ** 2 / distinct)))
        if psnr(estimate=shrunk, reference=hint_reference) > psnr(estimate=hint_images, reference=hint_reference):
            hint_images = shrunk
    return hint_images


def _attack_traffic(*, pipeline, payloads: list[dict], pixels: torch.Tensor, hint_pixels: torch.Tensor,
                    sigma_label: float, sigma_hint: float, optimisation_steps: int):
    """Run the server-side attacks on the messages one image set produced over several epochs.

    `payloads[e]` is what the server received for the same samples (same order) in epoch e. The
    attacker knows the public weights and the design, including the label- and hint-noise scales
    `sigma_label` (0 in paper mode) and `sigma_hint`. Attacks on the linked estimate: `linear` (inverse-variance mean, shrunk
    towards the set's mean), `denoiser` (the public UNet's posterior mean, DESIGN.md 5) and, when
    `optimisation_steps` > 0, `tv-inversion` (an image optimised through the public VAE encoder under
    a total-variation prior, at two prior weights) and `hint-regions` (the estimate averaged over the
    flat regions the recovered hint outlines). The best of them, judged against the truth
    (the attacker's most favourable choice), is the headline. Returns (report, the best attack's
    images, the recovered hints), images in [0, 1].
    """
    from ..privacy.attacks import latent_error, mean_image_psnr, psnr, ssim
    from ..training.diffusion import encode_latents

    vae = pipeline.vae
    with torch.no_grad():
        true_latents = encode_latents(vae=vae, pixels=pixels.to(vae.dtype)).double()
        reference = _decode(vae, true_latents)
        hint_reference = _decode(vae, encode_latents(vae=vae, pixels=hint_pixels.to(vae.dtype)))
    context = _unconditional_context(pipeline, len(pixels))

    by_epochs = []
    for epochs in range(1, len(payloads) + 1):  # the last pass is the whole run's, kept below
        latents, linked, variance, hint_latent = _linear_and_denoiser(
            pipeline=pipeline, payloads=payloads[:epochs], sigma_label=sigma_label, context=context)
        images = {name: _decode(vae, z) for name, z in latents.items()}
        by_epochs.append(max(psnr(estimate=x, reference=reference) for x in images.values()))
    if sigma_label > 0 and optimisation_steps > 0:
        images.update(_tv_inversions(vae=vae, start=images["linear"], linked=linked, variance=variance,
                                     optimisation_steps=optimisation_steps))
    attacks = {name: {"psnr": psnr(estimate=x, reference=reference), "ssim": ssim(estimate=x, reference=reference)}
               for name, x in images.items()}
    best = max(attacks, key=lambda name: attacks[name]["psnr"])
    mean_guess = reference.double().mean(0, keepdim=True).expand_as(reference)
    hint_images = _recovered_hints(vae=vae, hint_latent=hint_latent, payloads=payloads, sigma_hint=sigma_hint,
                                   hint_reference=hint_reference)
    report = ReconstructionReport(
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
    return report, images[best], hint_images


def known_noise(config) -> dict[str, float]:
    """The noise scales an attacker of `config`'s traffic knows (they are public settings):
    `sigma_label` and `sigma_hint` for `reconstruct_from_traffic` (none in paper mode)."""
    hardened = config.mode == "hardened"
    return {"sigma_label": config.sigma_label if hardened else 0.0,
            "sigma_hint": config.sigma_hint if hardened else 0.0}


@dataclass(frozen=True)
class ServerView:
    """What a split server receives for some images and hints, and the best it rebuilds from that."""

    payloads: list  # per epoch: the messages' tensors (z_t, h, t, label; numpy), images in the order given
    images: torch.Tensor  # [B, 3, H, W] in [0, 1]: the best attack's reconstructions
    hints: torch.Tensor  # [B, 3, H, W] in [0, 1]: the recovered hints
    report: ReconstructionReport


def server_view(*, pipeline, pixels: torch.Tensor, hint_pixels: torch.Tensor, config, secret, epochs: int = 1,
                optimisation_steps: int = 0) -> ServerView:
    """Exactly what `train_split_client` would send for these images and hints (`pixels` in [-1, 1],
    `hint_pixels` in [0, 1], as dataset items hold them) under `config` and `secret` over `epochs`
    linked epochs, and the server's attacks on it. Nothing is sent and the ledger is not touched:
    this is the preview a user looks at before training."""
    payloads = client_messages(pipeline=pipeline, pixels=pixels, hint_pixels=hint_pixels, config=config,
                               secret=secret, epochs=epochs)
    report, images, hints = _attack_traffic(pipeline=pipeline, payloads=payloads, pixels=pixels,
                                            hint_pixels=hint_pixels * 2 - 1, optimisation_steps=optimisation_steps,
                                            **known_noise(config))
    return ServerView(payloads=payloads, images=images, hints=hints, report=report)


def client_messages(*, pipeline, pixels: torch.Tensor, hint_pixels: torch.Tensor, config, secret,
                    epochs: int = 1) -> list[dict]:
    """Per epoch, the tensors `train_split_client` sends for these images and hints (`pixels` in
    [-1, 1], `hint_pixels` in [0, 1]) under `config` and `secret`, images in the order given. Nothing
    is sent or recorded."""
    from ..privacy.split_secret import content_hash
    from .split_client import client_latents, client_payload

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r} must be a whole number >= 1.")
    if pixels.shape != hint_pixels.shape or pixels.ndim != 4:
        raise ValueError(f"images {list(pixels.shape)} and hints {list(hint_pixels.shape)} must be the same "
                         "[B, 3, H, W] size: one hint per image.")
    ids = [secret.image_id(content_hash(pixels=p, hint=h)) for p, h in zip(pixels, hint_pixels)]
    latents = client_latents(pipeline=pipeline, pixels=pixels, hint_pixels=hint_pixels * 2 - 1)
    return [client_payload(pipeline=pipeline, latents=latents, image_ids=ids, epoch=e, config=config, secret=secret)
            for e in range(epochs)]


def latent_picture(latents, *, size: tuple[int, int], scale: float = 3.0) -> torch.Tensor:
    """A [B, C, h, w] latent-sized tensor (z_t, h) as pictures [B, 3, H, W] in [0, 1]: its channels as
    grey tiles side by side in a square grid (C = 4: 2 x 2), values -scale..scale as black..white,
    nearest-neighbour upscaled so that one latent value stays one visible block."""
    values = torch.as_tensor(np.asarray(latents, dtype=np.float32))
    b, c, h, w = values.shape
    side = int(np.ceil(np.sqrt(c)))
    grid = torch.full((b, side * h, side * w), 0.5)
    grey = (values / (2 * scale) + 0.5).clamp(0, 1)
    for k in range(c):
        row, col = divmod(k, side)
        grid[:, row * h:(row + 1) * h, col * w:(col + 1) * w] = grey[:, k]
    big = torch.nn.functional.interpolate(grid[:, None], size=size, mode="nearest")
    return big.expand(-1, 3, -1, -1).contiguous()
