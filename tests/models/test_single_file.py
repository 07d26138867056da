"""Round trips through the original single-file layout and the diffusers folder layout."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from privdiff.models.loading import (
    CheckpointLayoutError,
    MissingTokenizerError,
    inspect_checkpoint,
    load_pipeline,
    resolve_config_dir,
)
from privdiff.models.original_layout import pipeline_to_original, save_single_file, unet_key_map
from privdiff.models.tiny import TinySpec, tiny_pipeline
from privdiff.models.tokenizer import save_clip_tokenizer


def _images(pipe, seed=1):
    generator = torch.Generator().manual_seed(seed)
    kwargs = dict(num_inference_steps=3, generator=generator, output_type="np", height=32, width=32)
    return pipe("a red circle on a blue background", **kwargs).images


def _assert_same_weights(a, b, names):
    for name in names:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


def _config_folder(pipe, path):
    """A diffusers folder holding the architecture (and tokenizer) of `pipe`, as users' folders do."""
    pipe.save_pretrained(path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_sd1_single_file_round_trip_is_bit_identical(tmp_path, tiny_sd1, suffix):
    config = _config_folder(tiny_sd1, tmp_path / "config")
    path = save_single_file(pipeline=tiny_sd1, path=tmp_path / f"model{suffix}")
    info = inspect_checkpoint(path)
    assert (info.family, info.model_channels, info.context_dim, info.in_channels) == ("sd1", 32, 32, 4)
    loaded = load_pipeline(base=path, config=config)
    _assert_same_weights(tiny_sd1, loaded, ["unet", "vae", "text_encoder"])
    expected = _images(tiny_sd1)
    assert expected.std() > 0.01  # a real image, not a constant
    np.testing.assert_array_equal(_images(loaded), expected)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_sd2_and_sdxl_layouts_round_trip(tmp_path, family):
    pipe = tiny_pipeline(spec=TinySpec(family=family), seed=3)
    pipe.set_progress_bar_config(disable=True)
    config = _config_folder(pipe, tmp_path / "config")
    path = save_single_file(pipeline=pipe, path=tmp_path / "model.safetensors")
    assert inspect_checkpoint(path).family == family
    loaded = load_pipeline(base=path, config=config)
    encoders = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    _assert_same_weights(pipe, loaded, ["unet", "vae", *encoders])
    np.testing.assert_array_equal(_images(loaded), _images(pipe))


def test_original_key_names_follow_the_ldm_layout(tiny_sd1):
    keys = set(pipeline_to_original(tiny_sd1))
    # Level 0 has attention (input_blocks.1.1), level 1 has none; the down-sampler sits in input_blocks.2.
    for key in [
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",  # up-sampler of a level without attention
        "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ]:
        assert key in keys, key
    assert pipeline_to_original(tiny_sd1)["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4


def test_sdxl_openclip_layout_fuses_qkv():
    pipe = tiny_pipeline(spec=TinySpec(family="sdxl"))
    state = pipeline_to_original(pipe)
    te2 = pipe.text_encoder_2.state_dict()
    fused = state["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
    q = te2["text_model.encoder.layers.0.self_attn.q_proj.weight"]
    assert fused.shape == (3 * q.shape[0], q.shape[1])
    assert torch.equal(fused[: q.shape[0]], q)
    assert torch.equal(state["conditioner.embedders.1.model.text_projection"], te2["text_projection.weight"].T)
    assert "model.diffusion_model.label_emb.0.0.weight" in state


def test_unet_key_map_rejects_unknown_keys(tiny_sd1):
    with pytest.raises(ValueError, match="no place in the original"):
        unet_key_map(config=tiny_sd1.unet.config, keys=["some_adapter.weight"])


def test_diffusers_folder_round_trip(tmp_path, tiny_sd1):
    folder = tmp_path / "pipe"
    tiny_sd1.save_pretrained(folder)
    loaded = load_pipeline(base=folder)
    _assert_same_weights(tiny_sd1, loaded, ["unet", "vae", "text_encoder"])
    assert loaded.tokenizer.get_vocab() == tiny_sd1.tokenizer.get_vocab()
    np.testing.assert_array_equal(_images(loaded), _images(tiny_sd1))


def test_single_file_without_tokenizer_says_what_is_missing(tmp_path, tiny_sd1):
    config = _config_folder(tiny_sd1, tmp_path / "config")
    import shutil

    shutil.rmtree(config / "tokenizer")
    path = save_single_file(pipeline=tiny_sd1, path=tmp_path / "model.safetensors")
    with pytest.raises(MissingTokenizerError) as err:
        load_pipeline(base=path, config=config)
    message = str(err.value)
    assert "holds no tokenizer" in message and "'tokenizer'" in message
    assert "--tokenizer DIR" in message and "vocab.json and merges.txt" in message
    assert "openai/clip-vit-large-patch14" in message  # where the cache is searched

    # Naming a tokenizer folder fixes it, and gives the same images as the original pipeline.
    tokenizer_dir = save_clip_tokenizer(tiny_sd1.tokenizer, tmp_path / "my-tokenizer")
    loaded = load_pipeline(base=path, config=config, tokenizer=tokenizer_dir)
    np.testing.assert_array_equal(_images(loaded), _images(tiny_sd1))


def test_tokenizer_found_in_the_hugging_face_cache(tmp_path, tiny_sd1, monkeypatch):
    import huggingface_hub.constants as hf_constants

    config = _config_folder(tiny_sd1, tmp_path / "config")
    import shutil

    shutil.rmtree(config / "tokenizer")
    # A cache laid out as huggingface_hub writes it: models--org--name/snapshots/<rev>/..., refs/main.
    repo = tmp_path / "hub" / "models--openai--clip-vit-large-patch14"
    save_clip_tokenizer(tiny_sd1.tokenizer, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    path = save_single_file(pipeline=tiny_sd1, path=tmp_path / "model.safetensors")
    loaded = load_pipeline(base=path, config=config)
    assert loaded.tokenizer.get_vocab() == tiny_sd1.tokenizer.get_vocab()


def _fake_checkpoint(path, shapes):
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    return path


@pytest.mark.parametrize(
    ("text_key", "context", "expected"),
    [
        ("cond_stage_model.transformer.text_model.final_layer_norm.weight", 768, "sd15"),
        ("cond_stage_model.model.ln_final.weight", 1024, "sd21"),
        ("conditioner.embedders.1.model.ln_final.weight", 2048, "sdxl"),
    ],
)
def test_real_layouts_pick_their_bundled_config(tmp_path, text_key, context, expected):
    # Only names and shapes matter for detection, so a few small tensors stand in for a 2-7 GB file.
    path = _fake_checkpoint(
        tmp_path / "real.safetensors",
        {
            "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, context),
            text_key: (8,),
        },
    )
    assert resolve_config_dir(inspect_checkpoint(path), None).name == expected


def test_unknown_layout_names_what_was_found_and_what_is_supported(tmp_path):
    path = _fake_checkpoint(tmp_path / "odd.safetensors", {"transformer.blocks.0.weight": (4, 4), "head.bias": (4,)})
    with pytest.raises(CheckpointLayoutError) as err:
        load_pipeline(base=path)
    message = str(err.value)
    assert "odd.safetensors" in message and "transformer.blocks.0.weight" in message
    assert "SD 1.x" in message and "SD 2.x" in message and "SDXL" in message


def test_unbundled_size_asks_for_a_config_folder(tmp_path, tiny_sd1):
    path = save_single_file(pipeline=tiny_sd1, path=tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointLayoutError, match=r"model_channels=32.*pass config="):
        load_pipeline(base=path)


def test_inpainting_checkpoints_are_refused_clearly(tmp_path):
    path = _fake_checkpoint(
        tmp_path / "inpaint.safetensors",
        {
            "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": (8,),
        },
    )
    with pytest.raises(CheckpointLayoutError, match="in_channels=9"):
        load_pipeline(base=path)


def test_ckpt_is_read_without_unpickling_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Evil()}, path)
    with pytest.raises(CheckpointLayoutError, match="holds code or a format privdiff does not read") as refused:
        inspect_checkpoint(path)
    assert "weights_only" not in str(refused.value)  # never the advice to unpickle it anyway


@pytest.mark.parametrize(
    ("base", "message"),
    [("does/not/exist", "nothing exists"), ("notes.txt", "ends in")],
)
def test_bad_base_values(tmp_path, monkeypatch, base, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises((FileNotFoundError, CheckpointLayoutError), match=message):
        load_pipeline(base=base)


def test_folder_without_model_index_is_explained(tmp_path):
    with pytest.raises(CheckpointLayoutError, match="model_index.json"):
        load_pipeline(base=tmp_path)
