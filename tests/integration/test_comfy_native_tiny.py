"""privdiff-tiny rebuilt from ComfyUI's own UNet, CLIP and VAE classes computes what diffusers computes."""

import pytest
import torch

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def pipeline():
    from privdiff.models.privdiff_tiny import is_shipped, load_privdiff_tiny, untrained_components

    if is_shipped():
        return load_privdiff_tiny()
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**untrained_components(seed=0), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.fixture(scope="module")
def spec(pipeline):
    from privdiff.models.comfy_layout import comfy_native_spec

    return comfy_native_spec(pipeline)


def test_unet_matches(comfy_tiny_model, pipeline, spec):
    model = comfy_tiny_model(spec)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, spec.clip_embedding_size, generator=generator)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ours = pipeline.unet(x, t, context).sample
        theirs = model.diffusion_model(x, timesteps=t, context=context)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_clip_matches(comfyui_root, pipeline, spec, tmp_path):
    import comfy.sd1_clip

    from privdiff.models.tokenizer import save_clip_tokenizer

    tokenizer_dir = save_clip_tokenizer(pipeline.tokenizer, tmp_path / "tokenizer")
    clip = comfy.sd1_clip.SDClipModel(
        textmodel_json_config=spec.clip_config, special_tokens=spec.clip_special_tokens, layer="last",
        dtype=torch.float32,
    )
    clip.load_sd(spec.clip_state_dict)
    tokenizer = comfy.sd1_clip.SDTokenizer(tokenizer_path=str(tokenizer_dir), embedding_size=spec.clip_embedding_size,
                                           embedding_key="clip_l", max_length=77)
    prompt = "a red triangle on a blue background"
    tokens = tokenizer.tokenize_with_weights(prompt)
    ids = [t for t, _ in tokens[0]]
    expected_ids = pipeline.tokenizer(prompt, padding="max_length", max_length=77).input_ids
    assert ids == expected_ids
    with torch.no_grad():
        theirs, _pooled = clip.encode_token_weights(tokens)[:2]
        ours = pipeline.text_encoder(torch.tensor([expected_ids]))[0]
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_vae_matches(comfyui_root, pipeline, spec):
    import comfy.sd

    vae = comfy.sd.VAE(sd=spec.vae_state_dict, config=spec.vae_config)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    with torch.no_grad():
        ours = ((pipeline.vae.decode(latents).sample + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
        theirs = vae.decode(latents)
    assert theirs.shape == ours.shape
    assert torch.allclose(ours, theirs.float(), atol=1e-3), (ours - theirs).abs().max()
    image = torch.rand(1, 64, 64, 3, generator=generator)
    with torch.no_grad():
        ours_latent = pipeline.vae.encode(image.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode()
        theirs_latent = vae.encode(image)
    assert torch.allclose(ours_latent, theirs_latent.float(), atol=1e-3)
