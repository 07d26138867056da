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
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {MODES}.")
        if not self.snr_bound > 0:
            raise ValueError(f"snr_bound={self.snr_bound} must be positive.")
        if self.sigma_label < 0 or self.sigma_hint < 0:
            raise ValueError("sigma_label and sigma_hint must not be negative.")


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


def client_payload(*, pipeline, pixels: torch.Tensor, hint_pixels: torch.Tensor, sample_ids, step: int,
                   config: SplitConfig) -> dict[str, np.ndarray]:
    """What the client sends for one batch: numpy arrays ready for the wire.

    `pixels` and `hint_pixels` are [B, 3, H, W] in [-1, 1] (the hint as `2c - 1`); `sample_ids` the
    samples' stable ids (the draws depend on them, not on the batch's order).
    """
    from .dp_ldm import encode_latents

    if config.mode == "paper":
        warnings.warn("split mode 'paper' is the reference design: the server can reconstruct every private "
                      "image exactly from what it receives. Use mode='hardened' for private data.", stacklevel=2)
    vae, unet = pipeline.vae, pipeline.unet
    scheduler = pipeline.scheduler
    allowed = allowed_timesteps(scheduler=scheduler, config=config)
    with torch.no_grad():
        z0 = encode_latents(vae=vae, pixels=pixels.to(vae.dtype)).float()
        hint_latent = encode_latents(vae=vae, pixels=hint_pixels.to(vae.dtype)).float()
        draws = [_draw_generator(seed=config.seed, sample_id=int(i), step=step) for i in sample_ids]
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
            payload["conv_in_z_t"] = unet.conv_in(z_t.to(unet.dtype)).half()
        else:
            payload["z_t"] = z_t.half()
    return {name: value.cpu().numpy() for name, value in payload.items()}


@dataclass(frozen=True)
class ReconstructionReport:
    image_psnr: float  # the linked estimate of z_0, decoded, against D(E(x))
    image_psnr_first_epoch: float
    mean_image_psnr: float  # guessing the dataset's mean image
    hint_psnr: float  # the recovered hint latent, decoded, against D(E(hint))
    hint_mean_psnr: float
    epochs: int


def reconstruct_from_traffic(*, pipeline, payloads: list[dict], pixels: torch.Tensor, hint_pixels: torch.Tensor,
                             sigma_label: float = 0.0) -> ReconstructionReport:
    """Run the server-side attacks on the messages one image set produced over several epochs.

    `payloads[e]` is what the server received for the same samples (same order) in epoch e. The
    attacker knows the public weights and the design, including the label-noise scale `sigma_label`
    (0 in paper mode). Each message gives two independent estimates of z_0: z_t / sqrt(ab_t) (error
    variance 1/SNR_t) and the label's (error variance σ²/SNR_t, exact when σ = 0); all of them, over
    all epochs, are combined with inverse-variance weights.
    """
    from ..privacy.attacks import (estimate_z0, invert_conv_in, inverse_symsigmoid, link_epochs, mean_image_psnr,
                                   psnr, signal_to_noise)
    from .dp_ldm import encode_latents

    vae, alphas = pipeline.vae, pipeline.scheduler.alphas_cumprod
    estimates, weights, hints = [], [], []
    for payload in payloads:
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
            weights.append(torch.ones_like(snr))
            continue
        estimates += [from_label, z_t / alphas.double()[t].sqrt().view(-1, 1, 1, 1)]
        weights += [snr / sigma_label ** 2, snr]
    linked = link_epochs(estimates=estimates, weights=weights)
    if sigma_label > 0:
        # The stronger, empirical-Bayes attacker: shrink each noisy estimate towards the set's mean by
        # the signal's share of its variance (the linear MMSE estimate), never worse than the mean guess.
        error_variance = (1.0 / sum(weights)).view(-1, 1, 1, 1)
        mean = linked.mean(0, keepdim=True)
        signal_variance = (linked.var(0, keepdim=True) - error_variance.mean()).clamp(min=0)
        linked = mean + signal_variance / (signal_variance + error_variance) * (linked - mean)
    hint_latent = torch.stack(hints).mean(0)  # z_t is known exactly, so hint estimates only differ by quantisation

    def decode(latents):
        with torch.no_grad():
            images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
        return (images.float().clamp(-1, 1) + 1) / 2

    with torch.no_grad():
        reference = decode(encode_latents(vae=vae, pixels=pixels.to(vae.dtype)))
        hint_reference = decode(encode_latents(vae=vae, pixels=hint_pixels.to(vae.dtype)))
    return ReconstructionReport(
        image_psnr=psnr(estimate=decode(linked), reference=reference),
        image_psnr_first_epoch=psnr(estimate=decode(estimates[0]), reference=reference),
        mean_image_psnr=mean_image_psnr(reference=reference),
        hint_psnr=psnr(estimate=decode(hint_latent), reference=hint_reference),
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
                                                    conditioning_embedding_out_channels=(16,)).train()
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


def save_split_controlnet(*, controlnet, out, record=None) -> None:
    """Save in diffusers format; the config says how its hint input is formed, so loaders can tell a
    split ControlNet (hint = symsigmoid(E(2c - 1) + z_t), recomputed every step) from a stock one."""
    controlnet.register_to_config(**{SPLIT_CONFIG_KEY: {"version": 1, "hint_input": "symsigmoid(E(2c-1) + z_t)",
                                                        "context": "zeros"}})
    controlnet.save_pretrained(str(out))


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
            control_context = torch.zeros(len(prompts), 1, self.unet.config.cross_attention_dim, device=device,
                                          dtype=dtype)
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            latents = self.prepare_latents(len(prompts), self.unet.config.in_channels, hints.shape[2], hints.shape[3],
                                           dtype, device, generator)
            for t in self.progress_bar(self.scheduler.timesteps):
                model_input = self.scheduler.scale_model_input(latents, t)
                h = symsigmoid(hint_latent + model_input).half().to(dtype)
                down, mid = self.controlnet(model_input, t, encoder_hidden_states=control_context, controlnet_cond=h,
                                            conditioning_scale=controlnet_conditioning_scale, return_dict=False)
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
                       progress=None) -> int:
    """Send every batch of `dataset` for `epochs` epochs through `client`; returns the server's step count.

    Batches are cut in a fixed order, so after a failure the same call re-sends exactly the same
    messages and the server skips those it already applied."""
    from ..transport.codec import Message

    steps = 0
    for epoch in range(epochs):
        for start in range(0, len(dataset), batch_size):
            ids = list(range(start, min(start + batch_size, len(dataset))))
            items = [dataset[i] for i in ids]
            payload = client_payload(pipeline=pipeline, pixels=torch.stack([it["pixel_values"] for it in items]),
                                     hint_pixels=torch.stack([it["hint"] for it in items]) * 2 - 1,
                                     sample_ids=ids, step=epoch, config=config)
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
