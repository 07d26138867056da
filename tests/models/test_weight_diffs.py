"""Weight differences under ComfyUI's keys change the model exactly as the diffusers-named ones do."""

import pytest
import torch

from privdiff.models.original_layout import UNET_PREFIX, pipeline_to_original, unet_key_map
from privdiff.models.weight_diffs import COMFY_PREFIX, apply_differences, comfy_diff_keys, weight_differences
from privdiff.models.tiny import TinySpec, tiny_pipeline
from privdiff.training.trainable import select_trainable


def _apply_like_comfyui(original_state: dict, comfy_diffs: dict) -> dict:
    """ComfyUI's rule (comfy/lora.py, generic format): `<key>.diff` adds to `<key>.weight`,
    `<key>.diff_b` to `<key>.bias`, for keys under `diffusion_model.`."""
    out = dict(original_state)
    for key, value in comfy_diffs.items():
        assert key.startswith(COMFY_PREFIX)
        stem = UNET_PREFIX + key[len(COMFY_PREFIX):]
        if stem.endswith(".diff_b"):
            target = stem[: -len(".diff_b")] + ".bias"
        else:
            target = stem[: -len(".diff")] + ".weight"
        assert target in out, f"{key} names no tensor of the single-file checkpoint"
        out[target] = out[target] + value
    return out


@pytest.mark.parametrize("trainable", ["attention", "transformer"])
def test_comfy_keys_change_the_single_file_as_diffusers_keys_change_the_unet(trainable):
    base = tiny_pipeline(spec=TinySpec(), seed=0)
    chosen = select_trainable(unet=base.unet, trainable=trainable)
    base_state = {k: v.clone() for k, v in base.unet.state_dict().items()}
    tuned_state = dict(base_state)
    generator = torch.Generator().manual_seed(0)
    for name in chosen.parameter_names:
        tuned_state[name] = base_state[name] + torch.randn(base_state[name].shape, generator=generator)
    diffs = weight_differences(base=base_state, tuned=tuned_state, names=chosen.parameter_names)
    comfy = comfy_diff_keys(diffs=diffs, unet_config=base.unet.config)
    assert len(comfy) == len(diffs)
    assert any(k.endswith(".diff_b") for k in comfy) and any(k.endswith(".diff") for k in comfy)

    original_before = pipeline_to_original(base)
    patched_original = _apply_like_comfyui(original_before, comfy)
    apply_differences(unet=base.unet, diffs=diffs)
    original_after = pipeline_to_original(base)
    for key in original_after:
        assert torch.allclose(patched_original[key], original_after[key], atol=1e-6), key
    mapping = unet_key_map(config=base.unet.config, keys=diffs.keys())
    changed = {UNET_PREFIX + mapping[n] for n in diffs}
    unchanged = [k for k in original_before if k not in changed]
    assert all(torch.equal(original_before[k], original_after[k]) for k in unchanged)


def test_differences_from_another_model_are_refused():
    pipe = tiny_pipeline(spec=TinySpec(), seed=0)
    with pytest.raises(KeyError, match="another base model"):
        apply_differences(unet=pipe.unet, diffs={"not.a.param": torch.zeros(1)})
