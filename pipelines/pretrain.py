"""`privdiff pretrain`: train privdiff-tiny from scratch on the public corpus drawn in code.

The corpus (``privdiff.data.public_corpus``: shapes, printed glyphs, textures; no digits) is broad
enough that private sets show what a fine-tune adds. Two stages, as latent diffusion models are
built: an AutoencoderKL (first on 32 px crops, which teach the same local reconstruction at a quarter
of the cost, then at full 64 px), then the UNet and the text encoder jointly on the frozen
autoencoder's latents, with min-SNR loss weighting, caption dropout (for classifier-free guidance)
and an EMA of the weights, which is what gets saved. Every `checkpoint_every` steps the run saves
a checkpoint that `resume=True` (`privdiff pretrain --resume`) continues exactly. Only public data
is involved, so losses, samples and checkpoints are ordinary outputs here.
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
    num_images: int = 24_000
    vae_crop_steps: int = 4_000
    vae_full_steps: int = 600
    vae_batch_size: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6  # on the latent mean only (the variance is fixed near zero)
    unet_steps: int = 5_000
    unet_batch_size: int = 32
    unet_lr: float = 5e-4
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    warmup_steps: int = 100
    sample_steps: int = 50
    guidance_scale: float = 5.0
    checkpoint_every: int = 200

    def __post_init__(self) -> None:
        for name in ("num_images", "vae_batch_size", "unet_batch_size", "sample_steps", "checkpoint_every"):
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

    from ..data.public_corpus import PublicConfig, PublicDataset
    from ..models.privdiff_tiny import RESOLUTION

    dataset = PublicDataset(PublicConfig(num_items=config.num_images, seed=config.seed, resolution=RESOLUTION))
    images = torch.empty(len(dataset), 3, RESOLUTION, RESOLUTION, dtype=torch.uint8)
    captions = []
    for i in range(len(dataset)):
        item = dataset[i]
        images[i] = ((item["pixel_values"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        captions.append(item["caption"])
    return images, captions


def _to_model_range(images):
    return images.float() / 127.5 - 1.0


CHECKPOINT_FOLDER = ".pretrain"


class _Run:
    """The state of one pretraining run: what a checkpoint holds, and the two training loops.

    A checkpoint is written after every `checkpoint_every` steps of either stage and at the switch
    from autoencoder to UNet; a resumed run restores weights, optimizer, EMA, generator and losses,
    so it continues exactly where the stopped one would have gone on.
    """

    def __init__(self, *, components: dict, config: PretrainConfig, generator, folder: Path):
        self.components, self.config, self.generator, self.folder = components, config, generator, folder
        self.stage, self.step = "vae", 0
        self.vae_losses: list[float] = []
        self.unet_losses: list[float] = []
        self.scaling: float | None = None
        self.optimizer = None
        self.ema: list | None = None

    # ---- checkpoints -----------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        return {k: v for k, v in asdict(self.config).items() if k != "checkpoint_every"}

    def _trainable(self) -> list:
        if self.stage == "vae":
            return list(self.components["vae"].parameters())
        return list(self.components["unet"].parameters()) + list(self.components["text_encoder"].parameters())

    def save(self) -> None:
        import torch

        from ..training.checkpoint import generator_tensors, optimizer_tensors, save_checkpoint

        tensors = {f"{name}.{k}": v for name in ("vae", "unet", "text_encoder")
                   for k, v in self.components[name].state_dict().items()}
        groups = []
        if self.optimizer is not None:
            optim, groups = optimizer_tensors(self.optimizer)
            tensors.update(optim)
        for i, shadow in enumerate(self.ema or []):
            tensors[f"ema.{i}"] = shadow
        tensors.update(generator_tensors({"data": self.generator}))
        tensors["losses.vae"] = torch.tensor(self.vae_losses, dtype=torch.float64)
        tensors["losses.unet"] = torch.tensor(self.unet_losses, dtype=torch.float64)
        self.folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint(folder=self.folder, kind="pretrain", tensors=tensors, fingerprint=self._fingerprint(),
                        state={"stage": self.stage, "step": self.step, "scaling": self.scaling,
                               "param_groups": groups, "ema": self.ema is not None})

    def load(self) -> None:
        from ..training.checkpoint import load_checkpoint, restore_generators, restore_optimizer

        saved = load_checkpoint(folder=self.folder, kind="pretrain", fingerprint=self._fingerprint(),
                                resume_hint="start again in an empty folder")
        state, tensors = saved.state, saved.tensors
        for name in ("vae", "unet", "text_encoder"):
            prefix = f"{name}."
            self.components[name].load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.stage, self.step, self.scaling = state["stage"], state["step"], state["scaling"]
        if self.scaling is not None:
            self.components["vae"].register_to_config(scaling_factor=self.scaling)
        restore_generators({"data": self.generator}, tensors=tensors)
        self.vae_losses = tensors["losses.vae"].tolist()
        self.unet_losses = tensors["losses.unet"].tolist()
        self._make_optimizer()
        if state["param_groups"]:
            restore_optimizer(self.optimizer, tensors=tensors, param_groups=state["param_groups"])
        if state["ema"]:
            self.ema = [tensors[f"ema.{i}"].clone() for i in range(len(self.ema))]

    def _make_optimizer(self) -> None:
        import torch

        parameters = self._trainable()
        if self.stage == "vae":
            self.optimizer = torch.optim.AdamW(parameters, lr=self.config.vae_lr, weight_decay=0.0)
            self.ema = None
        else:
            self.optimizer = torch.optim.AdamW(parameters, lr=self.config.unet_lr, weight_decay=1e-2)
            self.ema = [p.detach().clone() for p in parameters]

    def _after_step(self, bar, loss: float, total: int) -> None:
        self.step += 1
        if self.step % self.config.checkpoint_every == 0 and self.step < total:
            self.save()  # before the progress report: an interrupt raised there loses nothing
        bar.set_postfix_str(f"{self.stage} loss {loss:.4f}")
        bar.update(1)

    # ---- stage 1: the autoencoder ---------------------------------------------------------------
    def fix_posterior_variance(self) -> None:
        """A deterministic autoencoder in AutoencoderKL's format: the log-variance half of
        quant_conv outputs a constant -20 (std 5e-5), so `latent_dist.sample()` equals the mean that
        training decodes, and those rows get no gradient (Adam leaves them where they are)."""
        import torch

        conv = self.components["vae"].quant_conv
        half = conv.out_channels // 2
        with torch.no_grad():
            conv.weight[half:].zero_()
            conv.bias[half:].fill_(-20.0)

    def train_vae(self, images, bar) -> None:
        import torch

        config, vae, generator = self.config, self.components["vae"], self.generator
        total = config.vae_crop_steps + config.vae_full_steps
        vae.train()
        while self.step < total:
            step = self.step
            for group in self.optimizer.param_groups:
                group["lr"] = config.vae_lr * _lr_factor(step, total, config.warmup_steps)
            crop = step < config.vae_crop_steps
            batch_size = config.vae_batch_size if crop else max(config.vae_batch_size // 2, 1)
            index = torch.randint(len(images), (batch_size,), generator=generator)
            x = _to_model_range(images[index])
            if crop:
                top, left = torch.randint(0, x.shape[-1] // 2 + 1, (2,), generator=generator).tolist()
                x = x[:, :, top:top + x.shape[-2] // 2, left:left + x.shape[-1] // 2]
            posterior = vae.encode(x).latent_dist
            # Decoding the mean: sampled latents at the start (std ~1) drown fine detail, and the
            # variance rows stay fixed near zero (see _fix_posterior_variance), so only the mean's
            # part of the KL term acts, keeping latents small.
            reconstruction = vae.decode(posterior.mode()).sample
            loss = (reconstruction - x).abs().mean() + (reconstruction - x).pow(2).mean()
            loss = loss + config.kl_weight * 0.5 * posterior.mean.pow(2).sum(dim=(1, 2, 3)).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.vae_losses.append(loss.item())
            self._after_step(bar, loss.item(), total)
        vae.eval()

    def switch_to_unet(self, images):
        """Fix the autoencoder, set its latent scaling and start stage 2; returns the unscaled latents."""
        latents = _encode_latents(self.components["vae"], images)
        self.scaling = float(1.0 / latents.std())
        self.components["vae"].register_to_config(scaling_factor=self.scaling)
        self.stage, self.step = "unet", 0
        self._make_optimizer()
        self.save()
        return latents

    # ---- stage 2: UNet and text encoder on latents ----------------------------------------------
    def train_unet(self, latents, caption_index, token_table, bar) -> None:
        import torch
        from diffusers import DDPMScheduler

        config, generator = self.config, self.generator
        unet, text_encoder = self.components["unet"], self.components["text_encoder"]
        noise_scheduler = DDPMScheduler.from_config(self.components["scheduler"].config)
        alphas_cumprod = noise_scheduler.alphas_cumprod
        snr = alphas_cumprod / (1 - alphas_cumprod)
        parameters = self._trainable()
        empty_index = len(token_table) - 1  # the last row holds the empty caption
        unet.train()
        text_encoder.train()
        while self.step < config.unet_steps:
            step = self.step
            for group in self.optimizer.param_groups:
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
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            self.optimizer.step()
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for shadow, p in zip(self.ema, parameters):
                    shadow.mul_(decay).add_(p.detach(), alpha=1 - decay)
            self.unet_losses.append(loss.item())
            self._after_step(bar, loss.item(), config.unet_steps)
        with torch.no_grad():
            for shadow, p in zip(self.ema, parameters):
                p.copy_(shadow)
        unet.eval()
        text_encoder.eval()


def _encode_latents(vae, images, batch_size: int = 256):
    import torch

    with torch.no_grad():
        return torch.cat(
            [vae.encode(_to_model_range(images[i:i + batch_size])).latent_dist.mean for i in range(0, len(images), batch_size)]
        )


def _checkpoint_folder(out: Path, *, resume: bool) -> Path:
    """Where the run's checkpoint lives, once `out` is known to suit a fresh run or a resumed one."""
    from ..training.checkpoint import has_checkpoint

    if (out / "model_index.json").exists():
        raise FileExistsError(f"{out} already holds a model; choose an empty --out folder.")
    folder = out / CHECKPOINT_FOLDER
    if has_checkpoint(folder) and not resume:
        raise FileExistsError(f"{out} holds a stopped pretraining run; continue it with --resume (resume=True), "
                              "or choose an empty --out folder.")
    if resume and not has_checkpoint(folder):
        raise FileNotFoundError(f"--resume: {out} holds no pretraining checkpoint; start without --resume.")
    return folder


def _start_run(*, config: PretrainConfig, folder: Path, resume: bool) -> _Run:
    """Seeded components and generator, then the checkpoint's state on resume (it overwrites both)."""
    import torch

    from ..models.privdiff_tiny import untrained_components

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    components = untrained_components(seed=config.seed)
    run = _Run(components=components, config=config, generator=generator, folder=folder)
    run._make_optimizer()
    if resume:
        run.load()
    else:
        run.fix_posterior_variance()
    return run


def _caption_tokens(tokenizer, captions: list[str]):
    """Each distinct caption tokenised once, the empty one last; returns (token table, row per image)."""
    import torch

    unique = sorted(set(captions))
    row_of = {caption: i for i, caption in enumerate(unique)}
    token_table = tokenizer(unique + [""], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
    return token_table, torch.tensor([row_of[c] for c in captions])


def _train(run: _Run, images, captions: list[str], *, show_progress: bool, seconds: dict[str, float]) -> None:
    """Both stages from wherever `run` stands, timing each into `seconds`."""
    from tqdm.auto import tqdm

    config = run.config
    vae_total = config.vae_crop_steps + config.vae_full_steps
    total_steps = vae_total + config.unet_steps
    done = run.step if run.stage == "vae" else vae_total + run.step
    with tqdm(total=total_steps, initial=done, desc="privdiff pretrain", disable=not show_progress) as bar:
        t0 = time.perf_counter()
        latents = None
        if run.stage == "vae":
            run.train_vae(images, bar)
            seconds["vae"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            latents = run.switch_to_unet(images)
        if latents is None:  # resumed in stage 2: the autoencoder is fixed, so its latents are too
            latents = _encode_latents(run.components["vae"], images)
        latents = latents * run.scaling
        token_table, caption_index = _caption_tokens(run.components["tokenizer"], captions)
        seconds["encode"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        run.train_unet(latents, caption_index, token_table, bar)
        seconds["unet"] = time.perf_counter() - t0


def _save_model(components: dict, out: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    from ..models.tokenizer import save_clip_tokenizer

    pipeline = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.to(torch.float16).save_pretrained(out, safe_serialization=True)
    save_clip_tokenizer(components["tokenizer"], out / "tokenizer")


def _save_samples(*, out: Path, config: PretrainConfig) -> Path:
    """Samples from the saved (fp16-rounded) weights: what users will get, on held-out public prompts."""
    import torch
    from diffusers import StableDiffusionPipeline

    from ..data.images import make_grid, save_png
    from ..data.public_corpus import PublicConfig, PublicDataset
    from ..models.loading import dtype_argument

    reloaded = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True,
                                                        **dtype_argument(torch.float32))
    reloaded.set_progress_bar_config(disable=True)
    held_out = PublicDataset(PublicConfig(num_items=20, seed=config.seed + 10_000))
    prompts = [held_out.caption(i) for i in range(16)]
    sample_images = reloaded(
        prompts, num_inference_steps=config.sample_steps, guidance_scale=config.guidance_scale,
        generator=torch.Generator().manual_seed(config.seed), output_type="np",
    ).images
    return save_png(make_grid(list(sample_images), labels=prompts, columns=4, cell_size=96), out / "samples.png")


def _write_record(*, out: Path, config: PretrainConfig, run: _Run, seconds: dict[str, float], resume: bool) -> None:
    import torch

    vae_losses, unet_losses = run.vae_losses, run.unet_losses
    record = {
        "config": asdict(config),
        "corpus": "privdiff.data.public_corpus: shapes, glyphs, textures (no digits)",
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "resumed": resume,
        "vae_scaling_factor": run.scaling,
        "final_vae_loss": sum(vae_losses[-50:]) / max(len(vae_losses[-50:]), 1),
        "final_unet_loss": sum(unet_losses[-100:]) / max(len(unet_losses[-100:]), 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")


def pretrain(*, out: str | Path, config: PretrainConfig = PretrainConfig(), resume: bool = False,
             show_progress: bool = True) -> PretrainResult:
    """Pretrain privdiff-tiny and save it (fp16 safetensors, diffusers layout) into `out`.

    A stopped run leaves a checkpoint in `out/.pretrain`; the same call with `resume=True` continues
    it exactly (same config required) and removes the checkpoint once the model is saved.
    """
    import shutil

    from ..data.images import line_chart, save_png

    out = Path(out)
    folder = _checkpoint_folder(out, resume=resume)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    run = _start_run(config=config, folder=folder, resume=resume)
    images, captions = _render_public_images(config)
    seconds["render"] = time.perf_counter() - start
    _train(run, images, captions, show_progress=show_progress, seconds=seconds)

    _save_model(run.components, out)
    grid = _save_samples(out=out, config=config)
    curve = save_png(
        line_chart({"autoencoder": run.vae_losses, "unet + text encoder": run.unet_losses},
                   title="privdiff-tiny pretraining loss (public data)"),
        out / "loss.png",
    )
    seconds["total"] = time.perf_counter() - start
    _write_record(out=out, config=config, run=run, seconds=seconds, resume=resume)
    shutil.rmtree(folder, ignore_errors=True)
    return PretrainResult(out=out, vae_losses=run.vae_losses, unet_losses=run.unet_losses, seconds=seconds,
                          sample_grid=grid, loss_curve=curve)
