"""What ComfyUI needs to build native MODEL/CLIP/VAE objects for an SD1-layout diffusers pipeline.

ComfyUI's checkpoint loader recognises only the full-size architectures, but its model classes take
configs: the UNet's is read from original-layout weights by `comfy.model_detection`, the CLIP text
model takes a transformers-style config dict, and the VAE a `ddconfig`. This module derives those
configs and the weights in ComfyUI's key layout from a diffusers pipeline, as plain data; only
`nodes/` imports ComfyUI and turns them into objects.
"""

from __future__ import annotations

from dataclasses import dataclass

from .original_layout import UNET_PREFIX, VAE_PREFIX, clip_to_original, pipeline_family, pipeline_to_original


COMFY_CLIP_VOCAB = 49408


@dataclass(frozen=True)
class ComfyNativeSpec:
    """Configs and original-layout weights for ComfyUI's own UNet, CLIP and VAE classes."""

    unet_state_dict: dict
    unet_extra_config: dict  # merged into what comfy.model_detection.detect_unet_config finds
    clip_config: dict  # for comfy.sd1_clip.SDClipModel(textmodel_json_config=...)
    clip_state_dict: dict  # for SDClipModel.load_sd: keys as comfy.clip_model.CLIPTextModel names them
    clip_special_tokens: dict
    clip_embedding_size: int
    vae_config: dict  # for comfy.sd.VAE(config=...)
    vae_state_dict: dict
    latent_scale_factor: float


def comfy_native_spec(pipeline) -> ComfyNativeSpec:
    """Everything ComfyUI needs to rebuild `pipeline` (SD 1.x layout, any size) natively."""
    family = pipeline_family(pipeline)
    if family != "sd1":
        raise ValueError(
            f"comfy_native_spec covers SD 1.x-layout models (privdiff-tiny among them), not {family}; "
            "full-size SD2/SDXL checkpoints load through ComfyUI's own CheckpointLoaderSimple."
        )
    state = pipeline_to_original(pipeline)
    unet_sd = {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    vae_sd = {k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}

    unet_config = pipeline.unet.config
    heads = unet_config.num_attention_heads or unet_config.attention_head_dim
    if not isinstance(heads, int):
        heads_per_level = set(heads)
        if len(heads_per_level) != 1:
            raise ValueError(f"ComfyUI's SD1 UNet takes one head count for every level, not {list(heads)}.")
        heads = heads_per_level.pop()

    text = pipeline.text_encoder.config
    tokenizer = pipeline.tokenizer
    clip_config = {
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "hidden_act": text.hidden_act,
        "vocab_size": text.vocab_size,
        "max_position_embeddings": text.max_position_embeddings,
        "projection_dim": text.projection_dim,
        "layer_norm_eps": text.layer_norm_eps,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "model_type": "clip_text_model",
    }
    import torch

    clip_sd = clip_to_original(pipeline.text_encoder.state_dict())
    # ComfyUI's CLIP always has a square projection (used only for pooled outputs, which SD1 ignores);
    # identity keeps it defined instead of leaving uninitialised memory there.
    clip_sd["text_projection.weight"] = torch.eye(text.hidden_size)
    # ComfyUI's CLIP embedding table always has OpenAI's 49408 rows; a smaller vocabulary is padded
    # with zero rows that no token id of ours ever reaches.
    table = clip_sd["text_model.embeddings.token_embedding.weight"]
    if table.shape[0] > COMFY_CLIP_VOCAB:
        raise ValueError(f"a vocabulary of {table.shape[0]} tokens does not fit ComfyUI's CLIP ({COMFY_CLIP_VOCAB}).")
    padded = torch.zeros(COMFY_CLIP_VOCAB, table.shape[1], dtype=table.dtype)
    padded[: table.shape[0]] = table
    clip_sd["text_model.embeddings.token_embedding.weight"] = padded

    vae_config = pipeline.vae.config
    widths = list(vae_config.block_out_channels)
    ddconfig = {
        "double_z": True,
        "z_channels": vae_config.latent_channels,
        "resolution": vae_config.sample_size,
        "in_channels": vae_config.in_channels,
        "out_ch": vae_config.out_channels,
        "ch": widths[0],
        "ch_mult": [w // widths[0] for w in widths],
        "num_res_blocks": vae_config.layers_per_block,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    if any(w % widths[0] for w in widths) or any(w % 32 for w in widths):
        raise ValueError(f"VAE widths {widths} must be multiples of the first and of 32 (ComfyUI's GroupNorm(32)).")
    return ComfyNativeSpec(
        unet_state_dict=unet_sd,
        unet_extra_config={"num_heads": heads, "num_head_channels": -1},
        clip_config=clip_config,
        clip_state_dict=clip_sd,
        clip_special_tokens={"start": tokenizer.bos_token_id, "end": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id},
        clip_embedding_size=text.hidden_size,
        vae_config={"params": {"ddconfig": ddconfig, "embed_dim": vae_config.latent_channels}},
        vae_state_dict=vae_sd,
        latent_scale_factor=float(vae_config.scaling_factor),
    )


def pipeline_from_original_state_dict(*, state_dict: dict, tokenizer=None, torch_dtype=None):
    """A diffusers pipeline from an original-layout checkpoint held in memory, such as ComfyUI's
    `MODEL.model.state_dict_for_saving(CLIP, VAE)` gives: it goes through the same offline loader as
    a single file on disk (`load_single_file`, bundled configs), after undoing what ComfyUI's layout
    adds for privdiff-tiny (the CLIP token table padded to 49408 rows). `tokenizer`: an object or folder
    (ComfyUI's CLIP carries one); default: the bundled config's own."""
    import copy
    import json
    import tempfile
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from .loading import CheckpointLayoutError, bundled_config_for, inspect_checkpoint, load_single_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if hasattr(v, "detach")}
    info = inspect_checkpoint("<in memory>", shapes={k: tuple(v.shape) for k, v in state.items()})
    if info.family is None:
        raise CheckpointLayoutError(f"the connected model is {info.describe()}; privdiff trains SD 1.x, SD 2.x, "
                                    "SDXL and privdiff-tiny models.")
    config_dir = bundled_config_for(info)
    table_key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    encoder_config = None if config_dir is None else config_dir / "text_encoder" / "config.json"
    if table_key in state and encoder_config is not None and encoder_config.is_file():
        vocab = json.loads(encoder_config.read_text())["vocab_size"]
        table = state[table_key]
        if table.shape[0] > vocab:
            if table[vocab:].abs().sum() != 0:
                raise CheckpointLayoutError(f"the CLIP token table has {table.shape[0]} rows with values past row "
                                            f"{vocab}, which this model's vocabulary does not have.")
            state[table_key] = table[:vocab].clone()
    with tempfile.TemporaryDirectory(prefix="privdiff-comfy-") as folder:
        path = Path(folder) / "model.safetensors"
        save_file(state, str(path))
        if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
            tokenizer = copy.deepcopy(tokenizer)  # the caller's object stays as it is
        pipeline = load_single_file(path, tokenizer=tokenizer, torch_dtype=torch_dtype or torch.float32)
    # ComfyUI's tokenizers claim a long model_max_length (ComfyUI splits long prompts itself); the
    # trainers pad to it, so it must be the text encoder's own context length.
    context = pipeline.text_encoder.config.max_position_embeddings
    if pipeline.tokenizer.model_max_length > context:
        pipeline.tokenizer.model_max_length = context
    return pipeline
