"""DP-LDM outputs load back: LoRA through diffusers' own loader, weight differences through
DPLDMPipeline, both changing the model exactly as training left it, with the privacy record."""

import pytest
import torch
from safetensors.torch import load_file

from privdiff.models.lora import LORA_PREFIX, lora_weight_deltas
from privdiff.models.tiny import TinySpec, tiny_pipeline
from privdiff.pipelines.dp_ldm import WEIGHTS_COMFYUI, WEIGHTS_LORA, DPLDMConfig, train_dp_ldm
from privdiff.pipelines.fine_tuned import DPLDMPipeline
from privdiff.privacy.record import read_record

QUICK = dict(batch_size=4, physical_batch_size=4, epochs=1.0, secure_noise=False, num_samples=1,
             clip_norm=0.1, learning_rate=3e-3, epsilon=8.0)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base") / "tiny"
    tiny_pipeline(spec=TinySpec(), seed=0).save_pretrained(folder)
    return folder


def _unet_output(unet):
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 4, 4, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        return unet(z, torch.tensor([100, 700]), context).sample


def _train(base_folder, out, trainable):
    from diffusers import StableDiffusionPipeline

    trained = StableDiffusionPipeline.from_pretrained(base_folder, safety_checker=None)
    trained.set_progress_bar_config(disable=True)
    result = train_dp_ldm(base=trained, data="shapes", out=out,
                          config=DPLDMConfig(trainable=trainable, **QUICK, num_items=8))
    return trained, result


@pytest.mark.parametrize("trainable", ["lora", "attention"])
def test_released_weights_reproduce_the_trained_model(base_folder, tmp_path, trainable):
    trained, result = _train(base_folder, tmp_path / "run", trainable)
    loaded = DPLDMPipeline.from_fine_tune(base=base_folder, weights=tmp_path / "run")
    assert isinstance(loaded, DPLDMPipeline)
    assert loaded.privacy_record.epsilon == pytest.approx(result.epsilon) and result.epsilon <= 8.0
    expected = _unet_output(trained.unet)
    assert torch.allclose(_unet_output(loaded.unet), expected, atol=1e-5)
    base = DPLDMPipeline.from_pretrained(base_folder, safety_checker=None, requires_safety_checker=False)
    assert not torch.allclose(_unet_output(base.unet), expected, atol=1e-5), "the fine-tune changed nothing"


def test_lora_file_is_standard(base_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    trained, result = _train(base_folder, tmp_path / "run", "lora")
    path = result.files["lora"]
    assert path.name == WEIGHTS_LORA and not (tmp_path / "run" / WEIGHTS_COMFYUI).exists()
    lora = load_file(str(path))
    assert all(k.startswith(LORA_PREFIX) for k in lora)
    assert {k.rsplit(".", 2)[-2] if k.endswith("weight") else "alpha" for k in lora} == {"lora_down", "lora_up", "alpha"}
    assert read_record(path).mechanism == "dp-sgd"
    # diffusers' own loader, on a plain pipeline, gives the trained model.
    plain = StableDiffusionPipeline.from_pretrained(base_folder, safety_checker=None)
    plain.load_lora_weights(str(path))
    assert torch.allclose(_unet_output(plain.unet), _unet_output(trained.unet), atol=1e-5)
    # ComfyUI's rule, W + (alpha / r) up @ down on `lora_unet_<diffusers name>`, gives it too.
    merged = StableDiffusionPipeline.from_pretrained(base_folder, safety_checker=None)
    params = dict(merged.unet.named_parameters())
    with torch.no_grad():
        for name, delta in lora_weight_deltas(lora=lora, unet=merged.unet).items():
            params[name].add_(delta)
    assert torch.allclose(_unet_output(merged.unet), _unet_output(trained.unet), atol=1e-5)


def test_comfyui_file_is_refused_with_the_way_to_load_it(base_folder, tmp_path):
    _train(base_folder, tmp_path / "run", "attention")
    with pytest.raises(ValueError, match="ComfyUI's LoRA loader"):
        DPLDMPipeline.from_fine_tune(base=base_folder, weights=tmp_path / "run" / WEIGHTS_COMFYUI)
    with pytest.raises(FileNotFoundError, match="holds none of"):
        DPLDMPipeline.from_fine_tune(base=base_folder, weights=tmp_path)


def test_conditioning_rows_are_released_and_reloaded(base_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    from privdiff.models.weight_diffs import TEXT_TABLE_DIFF_KEY

    trained = StableDiffusionPipeline.from_pretrained(base_folder, safety_checker=None)
    trained.set_progress_bar_config(disable=True)
    words = ("circle", "red")
    result = train_dp_ldm(base=trained, data="shapes", out=tmp_path / "run",
                          config=DPLDMConfig(trainable="attention", conditioning_words=words, **QUICK, num_items=8))
    diffs = load_file(str(result.files["diffusers"]))
    table = diffs[TEXT_TABLE_DIFF_KEY]
    ids = [trained.tokenizer(w, add_special_tokens=False).input_ids[0] for w in words]
    changed = (table.abs().sum(dim=1) > 0).nonzero().flatten().tolist()
    assert sorted(changed) == sorted(ids), "only the chosen words' rows change"
    comfy = load_file(str(result.files["comfyui"]))
    key = "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.diff"
    assert comfy[key].shape[0] == 49408 and torch.equal(comfy[key][: table.shape[0]], table)

    loaded = DPLDMPipeline.from_fine_tune(base=base_folder, weights=tmp_path / "run")
    prompt = trained.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(loaded.text_encoder(prompt)[0], trained.text_encoder(prompt)[0], atol=1e-5)
    assert torch.allclose(_unet_output(loaded.unet), _unet_output(trained.unet), atol=1e-5)
    with pytest.raises(ValueError, match="not with lora"):
        DPLDMConfig(trainable="lora", conditioning_words=words)
