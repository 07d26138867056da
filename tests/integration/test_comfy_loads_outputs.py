"""ComfyUI's own LoRA loader applies DP-LDM's outputs (the LoRA file and the `.diff` file) to
privdiff-tiny built from ComfyUI's classes, and the result computes what diffusers computes."""

import pytest
import torch

pytestmark = pytest.mark.comfyui

QUICK = dict(batch_size=4, physical_batch_size=4, epochs=1.0, secure_noise=False, num_samples=1,
             clip_norm=0.1, learning_rate=3e-3, epsilon=8.0, sample_prompts=("a red circle",))


def _patcher(model):
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.mark.parametrize("trainable,file_key", [("lora", "lora"), ("attention", "comfyui")])
def test_comfy_lora_loader_applies_the_output(comfy_tiny_model, tmp_path, trainable, file_key):
    import comfy.lora
    import comfy.utils

    from privdiff.models.comfy_layout import comfy_native_spec
    from privdiff.models.privdiff_tiny import load_privdiff_tiny
    from privdiff.pipelines.dp_ldm import DPLDMConfig, train_dp_ldm

    spec = comfy_native_spec(load_privdiff_tiny())
    trained = load_privdiff_tiny()
    trained.set_progress_bar_config(disable=True)
    with torch.inference_mode(False):  # what a ComfyUI node must do before training
        result = train_dp_ldm(base=trained, data="shapes", out=tmp_path / "run",
                              config=DPLDMConfig(trainable=trainable, **QUICK, num_items=8))

    patcher = _patcher(comfy_tiny_model(spec))
    lora = comfy.utils.load_torch_file(str(result.files[file_key]), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    patches = comfy.lora.load_lora(lora, key_map)
    expected_patches = len(lora) // 3 if trainable == "lora" else len(lora)  # down, up, alpha per layer
    assert len(patches) == expected_patches, "every key of the file must map to a ComfyUI weight"
    patched = patcher.clone()
    patched.add_patches(patches, 1.0)
    patched.patch_model()

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, spec.clip_embedding_size, generator=generator)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ours = trained.unet(x, t, context).sample
        theirs = patched.model.diffusion_model(x, timesteps=t, context=context)
        base = load_privdiff_tiny().unet(x, t, context).sample
    assert not torch.allclose(ours, base, atol=1e-4), "the fine-tune changed nothing"
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
