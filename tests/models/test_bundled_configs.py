"""Checks of the bundled diffusers config folders under ``models/configs``.

The folders hold configs only (no weights, no tokenizer files). They must let
``StableDiffusionPipeline.from_single_file(ckpt, config=<folder>, tokenizer=...)`` and the
SDXL equivalent build the architectures of the public releases offline. Every model here is
built on the ``meta`` device, so nothing is allocated and nothing is downloaded.

Reference parameter totals, checked against the public releases:
  * SD 1.5 UNet 859,520,964 (the figure in diffusers' ``ModelMixin.num_parameters`` docstring)
  * SD 2.x UNet 865,910,724
  * SDXL base UNet 2,567,463,684
  * KL-f8 VAE 83,653,863 (same architecture in SD 1.5, SD 2.x and SDXL)
  * CLIP ViT-L/14 text tower 123,060,480
  * OpenCLIP ViT-H/14 text tower with 23 of its 24 layers (the penultimate-layer setup of SD 2.x)
    340,387,840 = 23 * 12,596,224 + 49408*1024 + 77*1024 + 2*1024
  * OpenCLIP ViT-bigG/14 text tower with projection (SDXL text_encoder_2) 694,659,840
    = 693,021,440 + 1280*1280 projection; SDXL conditioning total 123,060,480 + 694,659,840 = 817,720,320
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "models" / "configs"

UNET_SD15 = 859_520_964
UNET_SD2 = 865_910_724
UNET_SDXL = 2_567_463_684
VAE_KL_F8 = 83_653_863
CLIP_L_TEXT = 123_060_480
OPENCLIP_H_TEXT_23 = 340_387_840
OPENCLIP_BIGG_TEXT_PROJ = 694_659_840

SPECS = {
    "sd15": dict(
        pipeline=StableDiffusionPipeline,
        unet=UNET_SD15,
        vae=VAE_KL_F8,
        text_encoders={"text_encoder": ("CLIPTextModel", CLIP_L_TEXT)},
        scheduler=("PNDMScheduler", "epsilon"),
        unet_cfg=dict(
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            block_out_channels=[320, 640, 1280, 1280],
        ),
        vae_cfg=dict(scaling_factor=0.18215),
        text_cfg={"text_encoder": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu")},
    ),
    "sd21": dict(
        pipeline=StableDiffusionPipeline,
        unet=UNET_SD2,
        vae=VAE_KL_F8,
        text_encoders={"text_encoder": ("CLIPTextModel", OPENCLIP_H_TEXT_23)},
        scheduler=("DDIMScheduler", "v_prediction"),
        unet_cfg=dict(
            sample_size=96,
            cross_attention_dim=1024,
            attention_head_dim=[5, 10, 20, 20],
            use_linear_projection=True,
            upcast_attention=True,
        ),
        vae_cfg=dict(scaling_factor=0.18215),
        text_cfg={"text_encoder": dict(hidden_size=1024, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu")},
    ),
    "sd21-base": dict(
        pipeline=StableDiffusionPipeline,
        unet=UNET_SD2,
        vae=VAE_KL_F8,
        text_encoders={"text_encoder": ("CLIPTextModel", OPENCLIP_H_TEXT_23)},
        scheduler=("PNDMScheduler", "epsilon"),
        unet_cfg=dict(
            sample_size=64,
            cross_attention_dim=1024,
            attention_head_dim=[5, 10, 20, 20],
            use_linear_projection=True,
            # the 2.1-base release leaves upcast_attention unset (False), unlike the 768px 2.1
            upcast_attention=False,
        ),
        vae_cfg=dict(scaling_factor=0.18215),
        text_cfg={"text_encoder": dict(hidden_size=1024, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu")},
    ),
    "sdxl": dict(
        pipeline=StableDiffusionXLPipeline,
        unet=UNET_SDXL,
        vae=VAE_KL_F8,
        text_encoders={
            "text_encoder": ("CLIPTextModel", CLIP_L_TEXT),
            "text_encoder_2": ("CLIPTextModelWithProjection", OPENCLIP_BIGG_TEXT_PROJ),
        },
        scheduler=("EulerDiscreteScheduler", "epsilon"),
        unet_cfg=dict(
            sample_size=128,
            cross_attention_dim=2048,
            attention_head_dim=[5, 10, 20],
            block_out_channels=[320, 640, 1280],
            transformer_layers_per_block=[1, 2, 10],
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            use_linear_projection=True,
        ),
        vae_cfg=dict(scaling_factor=0.13025, force_upcast=True),
        text_cfg={
            "text_encoder": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"),
            "text_encoder_2": dict(
                hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu", projection_dim=1280
            ),
        },
    ),
}

NAMES = sorted(SPECS)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _folder(name: str) -> Path:
    folder = CONFIGS / name
    assert folder.is_dir(), f"missing bundled config folder {folder}"
    return folder


@pytest.mark.parametrize("name", NAMES)
def test_configs_only_no_weights_or_tokenizers(name):
    folder = _folder(name)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    expected = {"model_index.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"}
    expected |= {f"{te}/config.json" for te in SPECS[name]["text_encoders"]}
    assert set(files) == expected
    for f in files:
        json.loads((folder / f).read_text())  # valid JSON


@pytest.mark.parametrize("name", NAMES)
def test_unet_builds_on_meta_with_release_param_count(name):
    spec = SPECS[name]
    config = UNet2DConditionModel.load_config(_folder(name), subfolder="unet", local_files_only=True)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    assert next(unet.parameters()).device.type == "meta"
    assert _n_params(unet) == spec["unet"]
    for key, value in spec["unet_cfg"].items():
        got = unet.config[key]
        got = list(got) if isinstance(got, (list, tuple)) else got
        if key == "upcast_attention":
            got = bool(got)
        assert got == value, (key, got, value)
    assert unet.config.in_channels == 4 and unet.config.out_channels == 4


@pytest.mark.parametrize("name", NAMES)
def test_vae_builds_on_meta_with_release_param_count(name):
    spec = SPECS[name]
    config = AutoencoderKL.load_config(_folder(name), subfolder="vae", local_files_only=True)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    assert _n_params(vae) == spec["vae"]
    assert vae.config.latent_channels == 4
    for key, value in spec["vae_cfg"].items():
        assert vae.config[key] == value, key


@pytest.mark.parametrize(
    "name,component",
    [(n, te) for n in NAMES for te in sorted(SPECS[n]["text_encoders"])],
)
def test_text_encoders_build_on_meta_with_release_param_count(name, component):
    class_name, expected = SPECS[name]["text_encoders"][component]
    # the same call diffusers' single-file CLIP loader makes with a local config folder
    config = CLIPTextConfig.from_pretrained(_folder(name), subfolder=component, local_files_only=True)
    for key, value in SPECS[name]["text_cfg"][component].items():
        assert getattr(config, key) == value, key
    assert config.max_position_embeddings == 77 and config.vocab_size == 49408
    cls = getattr(transformers, class_name)
    with torch.device("meta"):
        model = cls(config)
    assert _n_params(model) == expected


@pytest.mark.parametrize("name", NAMES)
def test_scheduler_loads_with_release_prediction_type(name):
    class_name, prediction_type = SPECS[name]["scheduler"]
    index = json.loads((_folder(name) / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", class_name]
    scheduler = getattr(diffusers, class_name).from_pretrained(
        _folder(name), subfolder="scheduler", local_files_only=True
    )
    assert type(scheduler).__name__ == class_name
    assert scheduler.config.prediction_type == prediction_type
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.beta_start == 0.00085 and scheduler.config.beta_end == 0.012


@pytest.mark.parametrize("name", NAMES)
def test_pipeline_load_config_lists_components(name):
    spec = SPECS[name]
    pipeline_cls = spec["pipeline"]
    config = pipeline_cls.load_config(_folder(name), local_files_only=True)
    assert config["_class_name"] == pipeline_cls.__name__
    assert config["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert config["vae"] == ["diffusers", "AutoencoderKL"]
    assert config["scheduler"] == ["diffusers", spec["scheduler"][0]]
    for component, (class_name, _) in spec["text_encoders"].items():
        assert config[component] == ["transformers", class_name]
    tokenizers = ["tokenizer", "tokenizer_2"] if pipeline_cls is StableDiffusionXLPipeline else ["tokenizer"]
    for tok in tokenizers:
        # listed, but no files bundled: the loader passes tokenizers explicitly
        assert config[tok] == ["transformers", "CLIPTokenizer"]
        assert not (_folder(name) / tok).exists()
    if pipeline_cls is StableDiffusionPipeline:
        assert config["feature_extractor"] == [None, None]
        assert config["safety_checker"] == [None, None]
        assert config["requires_safety_checker"] is False
    else:
        assert config["force_zeros_for_empty_prompt"] is True

    # what from_single_file would try to load from the folder: every non-null entry that is
    # not passed in must have its config here (tokenizers are passed explicitly)
    expected_modules, _ = pipeline_cls._get_signature_keys(pipeline_cls)
    init_dict, _, _ = pipeline_cls.extract_init_dict(config)
    to_load = {k for k, v in init_dict.items() if k in expected_modules and v[0] is not None} - set(tokenizers)
    assert to_load == {"unet", "vae", "scheduler", *spec["text_encoders"]}
    missing = set(expected_modules) - set(init_dict) - set(tokenizers)
    assert missing <= set(pipeline_cls._optional_components)
