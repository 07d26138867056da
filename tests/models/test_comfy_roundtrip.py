"""ComfyUI's objects -> a diffusers pipeline: the original-layout state dict ComfyUI's checkpoint saver
gives (for privdiff-tiny: a CLIP table padded to 49408 rows) loads back to the same model."""

import pytest
import torch

from privdiff.models.comfy_layout import COMFY_CLIP_VOCAB, pipeline_from_original_state_dict
from privdiff.models.original_layout import pipeline_to_original
from privdiff.models.privdiff_tiny import load_privdiff_tiny

TABLE = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


def _as_comfy_saves_it(pipeline):
    state = pipeline_to_original(pipeline)
    table = state[TABLE]
    padded = torch.zeros(COMFY_CLIP_VOCAB, table.shape[1])
    padded[: table.shape[0]] = table
    state[TABLE] = padded
    return state, table.shape[0]


def test_tiny_from_comfy_layout_computes_what_it_did():
    original = load_privdiff_tiny()
    state, _ = _as_comfy_saves_it(original)
    tokenizer = load_privdiff_tiny().tokenizer
    tokenizer.model_max_length = 8192  # what ComfyUI's tokenizers claim
    rebuilt = pipeline_from_original_state_dict(state_dict=state, tokenizer=tokenizer)
    assert tokenizer.model_max_length == 8192, "the caller's tokenizer is left alone"
    assert rebuilt.tokenizer.model_max_length == 77
    generator = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 64, generator=generator)
    with torch.no_grad():
        assert torch.allclose(rebuilt.unet(x, 500, context).sample, original.unet(x, 500, context).sample, atol=1e-5)
        ids = torch.tensor([original.tokenizer("a red circle", padding="max_length", max_length=77).input_ids])
        assert torch.allclose(rebuilt.text_encoder(ids)[0], original.text_encoder(ids)[0], atol=1e-5)
        assert torch.allclose(rebuilt.vae.decode(x).sample, original.vae.decode(x).sample, atol=1e-5)


def test_values_past_the_vocabulary_are_refused():
    state, vocab = _as_comfy_saves_it(load_privdiff_tiny())
    state[TABLE][vocab + 5] = 1.0
    with pytest.raises(ValueError, match="vocabulary"):
        pipeline_from_original_state_dict(state_dict=state)
