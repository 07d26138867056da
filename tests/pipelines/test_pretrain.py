"""privdiff pretrain: end to end on a few steps, deterministic for a seed; the full run is a slow test."""

import json

import pytest
import torch

from privdiff.pipelines.pretrain import PretrainConfig, pretrain

QUICK = PretrainConfig(num_images=32, vae_crop_steps=2, vae_full_steps=1, unet_steps=3, warmup_steps=1,
                       sample_steps=2, vae_batch_size=4, unet_batch_size=4)


def _weights(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    return {f"{name}.{k}": v for name in ("unet", "vae", "text_encoder") for k, v in getattr(pipe, name).state_dict().items()}


def test_quick_pretrain_writes_a_loadable_model_and_is_deterministic(tmp_path):
    first = pretrain(out=tmp_path / "a", config=QUICK, show_progress=False)
    second = pretrain(out=tmp_path / "b", config=QUICK, show_progress=False)
    for name in ("model_index.json", "samples.png", "loss.png", "pretrain.json", "tokenizer/vocab.json",
                 "tokenizer/merges.txt", "unet/diffusion_pytorch_model.safetensors"):
        assert (first.out / name).is_file(), name
    record = json.loads((first.out / "pretrain.json").read_text())
    assert record["config"]["unet_steps"] == 3 and record["vae_scaling_factor"] > 0
    assert len(first.vae_losses) == 3 and len(first.unet_losses) == 3
    a, b = _weights(first.out), _weights(second.out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "same seed, same weights"
    # Saved in fp16 to halve the size; loaded back as float32 by default.
    assert next(iter(a.values())).dtype == torch.float32


def test_pretrain_refuses_to_overwrite(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already holds a model"):
        pretrain(out=tmp_path, config=QUICK, show_progress=False)


@pytest.mark.parametrize("bad", [{"num_images": 0}, {"unet_steps": -1}, {"caption_dropout": 1.0}, {"ema_decay": 1.0}])
def test_pretrain_config_is_validated(bad):
    with pytest.raises(ValueError):
        PretrainConfig(**bad)


@pytest.mark.parametrize("stop_after", [2, 5])  # inside the autoencoder stage, inside the UNet stage
def test_a_stopped_pretraining_resumes_to_the_same_weights(tmp_path, monkeypatch, stop_after):
    from privdiff.pipelines import pretrain as module

    config = PretrainConfig(**{**QUICK.__dict__, "checkpoint_every": 1})
    whole = pretrain(out=tmp_path / "whole", config=config, show_progress=False)

    original = module._Run._after_step
    calls = {"n": 0}

    def stop(self, bar, loss, total):
        original(self, bar, loss, total)
        calls["n"] += 1
        if calls["n"] == stop_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(module._Run, "_after_step", stop)
    with pytest.raises(KeyboardInterrupt):
        pretrain(out=tmp_path / "cut", config=config, show_progress=False)
    monkeypatch.setattr(module._Run, "_after_step", original)
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain(out=tmp_path / "cut", config=config, show_progress=False)
    with pytest.raises(Exception, match="other settings"):
        pretrain(out=tmp_path / "cut", config=PretrainConfig(**{**config.__dict__, "unet_lr": 1e-3}),
                 resume=True, show_progress=False)
    resumed = pretrain(out=tmp_path / "cut", config=config, resume=True, show_progress=False)
    assert resumed.vae_losses == whole.vae_losses and resumed.unet_losses == whole.unet_losses
    a, b = _weights(whole.out), _weights(resumed.out)
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed run ends where an uninterrupted one does"
    assert not (tmp_path / "cut" / ".pretrain").exists(), "the checkpoint goes once the model is saved"

