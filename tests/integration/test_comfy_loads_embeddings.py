"""ComfyUI's own embedding loader reads privdiff's DP-TI files (ComfyUI format, and A1111 .pt)."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.comfyui


def test_comfy_load_embed_reads_the_released_vectors(comfyui_root, tmp_path):
    import comfy.sd1_clip

    from privdiff.models.tiny import TinySpec, tiny_pipeline
    from privdiff.pipelines.dp_ti import DPAggConfig, train_dpagg_ti
    from privdiff.data import load_dataset

    pipe = tiny_pipeline(spec=TinySpec(), seed=0)
    config = DPAggConfig(token="<stripes>", init_word="circle", num_vectors=2, steps=1, batch_size=3, secure_noise=False)
    with torch.inference_mode(False):
        result = train_dpagg_ti(base=pipe, data=load_dataset(data="style", num_items=6), out=tmp_path / "emb",
                                config=dataclasses.replace(config, a1111=True))
    expected = load_file(str(result.files["diffusers"]))["<stripes>"]
    for kind in ("comfyui", "a1111"):
        path = result.files[kind]
        loaded = comfy.sd1_clip.load_embed(path.stem, str(path.parent), expected.shape[1], "clip_l")
        assert loaded is not None and torch.allclose(loaded.float(), expected), kind


def test_comfy_load_embed_reads_an_sdxl_token_for_each_encoder(comfyui_root, tmp_path):
    """SDXL: ComfyUI's clip_l model asks for key clip_l, its clip_g model for clip_g (same file)."""
    import comfy.sd1_clip

    from privdiff.data import load_dataset
    from privdiff.models.tiny import TinySpec, tiny_pipeline
    from privdiff.pipelines.dp_ti import DPAggConfig, train_dpagg_ti

    pipe = tiny_pipeline(spec=TinySpec(family="sdxl"), seed=0)
    config = DPAggConfig(token="<stripes>", init_word="circle", steps=1, batch_size=3, secure_noise=False)
    with torch.inference_mode(False):
        result = train_dpagg_ti(base=pipe, data=load_dataset(data="style", num_items=6), out=tmp_path / "emb",
                                config=config)
    path = result.files["comfyui"]
    expected = load_file(str(path))
    for key in ("clip_l", "clip_g"):
        loaded = comfy.sd1_clip.load_embed(path.stem, str(path.parent), expected[key].shape[1], key)
        assert loaded is not None and torch.allclose(loaded.float(), expected[key]), key
