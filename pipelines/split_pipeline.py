"""`SplitControlNetPipeline`: text-to-image with a split-learning ControlNet, as a diffusers pipeline.

A split ControlNet's hint input h = fp16(symsigmoid(hint latent + z_t)) mixes the hint with the
current latents, so it is recomputed at every denoising step; the ControlNet sees the zero text
context it was trained with, the UNet the prompt. Everything else is diffusers' own: the class
saves with `save_pretrained`, loads with `SplitControlNetPipeline.from_pretrained(path)` (the privacy
record of the ControlNet kept in its config), and `__call__` takes diffusers' usual arguments.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionControlNetPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

from ..privacy.attacks import symsigmoid
from ..training.diffusion import encode_latents
from .fine_tuned import RecordInConfig

SPLIT_CONFIG_KEY = "privdiff_split_controlnet"  # in the saved ControlNet's config.json


def mark_split_controlnet(controlnet) -> None:
    """Write into the config how its hint input is formed, so loaders can tell a split ControlNet
    (hint = symsigmoid(E(2c - 1) + z_t), recomputed every step) from a stock one."""
    controlnet.register_to_config(**{SPLIT_CONFIG_KEY: {"version": 1, "hint_input": "symsigmoid(E(2c-1) + z_t)",
                                                        "context": "zeros"}})


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


class _DropMarkerWarning:
    def filter(self, record) -> bool:
        return SPLIT_CONFIG_KEY not in record.getMessage()


class SplitControlNetPipeline(RecordInConfig, StableDiffusionControlNetPipeline):
    """Stable Diffusion guided by a privdiff split ControlNet; `privacy_record` says what its training
    released (and survives `save_pretrained` / `from_pretrained`)."""

    def __init__(self, vae, text_encoder, tokenizer, unet, controlnet, scheduler, safety_checker=None,
                 feature_extractor=None, image_encoder=None, requires_safety_checker: bool = False,
                 privacy_record: dict | None = None):
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, controlnet=controlnet,
                         scheduler=scheduler, safety_checker=safety_checker, feature_extractor=feature_extractor,
                         image_encoder=image_encoder, requires_safety_checker=requires_safety_checker)
        self.register_to_config(privacy_record=privacy_record)
        # diffusers drops config keys it does not know on load: mark it again so a re-save says so too
        mark_split_controlnet(controlnet)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """diffusers' `from_pretrained`, without its warning about the split marker in the ControlNet's
        config (privdiff's own key, re-written on every save)."""
        import logging

        config_logger = logging.getLogger("diffusers.configuration_utils")
        marker = _DropMarkerWarning()
        config_logger.addFilter(marker)
        try:
            return super().from_pretrained(*args, **kwargs)
        finally:
            config_logger.removeFilter(marker)

    @classmethod
    def from_split_file(cls, *, base, controlnet_file: str | Path) -> "SplitControlNetPipeline":
        """`base`: the base it was trained on (a pipeline, 'tiny', a diffusers folder or a single-file
        checkpoint); `controlnet_file`: the one file a split client releases (weights, config, record)."""
        from ..privacy.record import read_record
        from ..training.inputs import resolve_base
        from .split_run import load_split_controlnet_file

        loaded, controlnet = resolve_base(base), load_split_controlnet_file(controlnet_file)
        if abs(loaded.vae.config.scaling_factor - controlnet.latent_scale) > 1e-6:
            raise ValueError(f"{controlnet_file} was trained on latents scaled by {controlnet.latent_scale}, but this "
                             f"base's VAE scales by {loaded.vae.config.scaling_factor}: use the base it was trained on.")
        return split_controlnet_pipeline(base=loaded, controlnet=controlnet.controlnet,
                                         privacy_record=read_record(controlnet_file))

    def _hint_latents(self, image, *, num_prompts: int, height, width, device, dtype):
        hints = self.image_processor.preprocess(image, height=height, width=width).to(device, self.vae.dtype)
        if hints.shape[0] == 1 and num_prompts > 1:
            hints = hints.expand(num_prompts, -1, -1, -1)  # one hint for every prompt
        if hints.shape[0] != num_prompts:
            raise ValueError(f"{hints.shape[0]} hint images for {num_prompts} prompts; give one per prompt, or one "
                             "for all.")
        return encode_latents(vae=self.vae, pixels=hints).to(dtype), hints.shape[2], hints.shape[3]

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image=None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 30, guidance_scale: float = 5.0,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator=None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 controlnet_conditioning_scale: float = 1.0, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",)):
        """Generate one image per prompt and hint (times `num_images_per_prompt`). `image` holds the
        hints (images in [0, 1], as PIL, numpy or tensors): one per prompt, or one for all; `height`
        and `width` default to the hints' size. The defaults (30 steps, guidance 5) suit privdiff-tiny."""
        if image is None:
            raise ValueError("a split ControlNet needs hint images: pass image=[...] (one per prompt, or one for all).")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device, dtype = self.unet.device, self.unet.dtype
        hint_latent, height, width = self._hint_latents(image, num_prompts=len(prompts), height=height, width=width,
                                                        device=device, dtype=dtype)
        hint_latent = hint_latent.repeat_interleave(num_images_per_prompt, dim=0)
        guided = guidance_scale > 1
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompts)
        embeds, negative = self.encode_prompt(prompts, device, num_images_per_prompt, guided, negative_prompt)
        text = torch.cat([negative, embeds]) if guided else embeds
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(len(prompts) * num_images_per_prompt, self.unet.config.in_channels, height,
                                       width, dtype, device, generator, latents)
        # a stochastic scheduler (DDPM) draws its step noise from `generator` too: one seed, one image
        step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = self.scheduler.scale_model_input(latents, t)
            down, mid = split_control_residuals(controlnet=self.controlnet, model_input=model_input,
                                                hint_latent=hint_latent, timestep=t,
                                                scale=controlnet_conditioning_scale)
            if guided:
                down, mid = [torch.cat([d, d]) for d in down], torch.cat([mid, mid])
                model_input = torch.cat([model_input, model_input])
            noise = self.unet(model_input, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid).sample
            if guided:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise, t, latents, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                scope = locals()
                values = {name: scope[name] for name in callback_on_step_end_tensor_inputs}
                latents = callback_on_step_end(self, i, t, values).get("latents", latents)
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor).sample
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, None
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)


def split_controlnet_pipeline(*, base, controlnet, privacy_record=None) -> SplitControlNetPipeline:
    """A SplitControlNetPipeline from a base text-to-image pipeline and a trained split ControlNet
    (`privacy_record`: a PrivacyRecord, e.g. `read_record` of the downloaded file)."""
    pipeline = SplitControlNetPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                       unet=base.unet, controlnet=controlnet, scheduler=base.scheduler)
    pipeline.privacy_record = privacy_record
    return pipeline
